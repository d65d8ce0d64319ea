import json

from benchmarks import long_stream, memory_use, search, train_step


def test_search_benchmark_quick(tmp_path):
    search.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "search-quick.json").read_text())
    assert [r["memory_size"] for r in results["exact"]] == [1024, 4096]
    assert all(r["same_neighbours_as_faiss"] == 1.0 for r in results["exact"])
    # 4,096 keys make 16 IVF lists; nprobe 16 searches them all: exact.
    assert [(r["memory_size"], r["recall_at_k"]) for r in results["approximate"]] == [(4096, 1.0)]
    assert "| random unit vectors | 4,096 |" in (tmp_path / "search-quick.md").read_text()


def test_train_step_benchmark_quick(tmp_path):
    train_step.main(["--quick", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "train_step-quick.json").read_text())["configs"]["quick"]["rows"]
    assert [r["variant"] for r in rows] == [
        "vanilla", "XL only", "memory 512", "memory 2K", "memory 2K + XL", "memory 2K IVF", "memory 2K IVF + XL",
    ]
    assert next(r for r in rows if r["variant"] == "XL only")["ratio_to_xl"] == 1.0


def test_memory_use_benchmark_quick(tmp_path):
    memory_use.main(["--quick", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "memory_use-quick.json").read_text())["rows"]
    assert [(r["dtype"], r["backend"]) for r in rows] == [
        ("float32", "exact"), ("float32", "faiss_ivf"), ("bfloat16", "exact"), ("bfloat16", "faiss_ivf"),
    ]
    # A memory can never take less than its keys and values.
    assert all(r["bytes_per_token"] >= r["store_bytes_per_token"] for r in rows)


def test_long_stream_benchmark_quick(tmp_path):
    long_stream.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "long_stream-quick.json").read_text())
    assert results["memory_fill"] == 4096 and results["tokens"] == 8192
    assert len(results["segment_times"]) == 8192 // 256
