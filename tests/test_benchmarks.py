import json

from benchmarks import search, train_step


def test_search_benchmark_quick(tmp_path):
    search.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "search-quick.json").read_text())
    assert [r["memory_size"] for r in results["rows"]] == [1024, 4096]
    assert all(r["same_neighbours_as_faiss"] == 1.0 for r in results["rows"])
    assert "| 4,096 |" in (tmp_path / "search-quick.md").read_text()


def test_train_step_benchmark_quick(tmp_path):
    train_step.main(["--quick", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "train_step-quick.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["vanilla", "XL only", "memory 512", "memory 2K", "memory 2K + XL"]
    assert next(r for r in rows if r["variant"] == "XL only")["ratio_to_xl"] == 1.0
