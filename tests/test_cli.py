import json

import pytest

from benchmarks.faults import write_texts
from memorizing_transformers.cli import main


@pytest.fixture
def corpus_folder(tmp_path):
    """Eight small 'long documents' of pseudo-code, enough for three splits."""
    return write_texts(tmp_path / "texts")


def test_prepare_train_resume_evaluate(tmp_path, corpus_folder, capsys, cli_error):
    main(["data", "prepare", "files", "--source", str(corpus_folder)])
    run = tmp_path / "run"
    common = [
        "train",
        "--out",
        str(run),
        "--corpus",
        "files",
        "--preset",
        "tiny",
        "--vocab-size",
        "300",
        "--eval-tokens",
        "64",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "2",
        "--log-every",
        "1",
    ]
    main(common + ["--steps", "2"])
    assert "already holds a run" in cli_error(common + ["--steps", "4"])
    main(common + ["--steps", "4", "--resume"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert (run / "checkpoints" / "latest").read_text() == "step-0000004"

    main(["evaluate", str(run), "--corpus", "files", "--split", "test", "--memory-size", "512", "--knn-k", "2"])
    report = json.loads((run / "eval-files-test" / "eval.json").read_text())
    labels = [r["label"] for r in report["results"]]
    assert labels == ["with memory", "memory off"]
    assert report["results"][0]["memory_size"] == 512 and report["results"][0]["knn_k"] == 2
    assert report["results"][1]["memory_size"] == 0
    assert (run / "eval-files-test" / "loss_by_position.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| with memory |" in out and "| memory off |" in out


def test_train_rejects_unknown_config_keys(tmp_path, cli_error):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"presett": "tiny"}))
    assert "unknown keys" in cli_error(["train", "--config", str(config), "--out", str(tmp_path / "r")])


def test_demo_without_its_pretrained_weights_says_where_they_should_be(tmp_path, cli_error):
    message = cli_error(["demo", "--quick", "--out", str(tmp_path), "--pretrained", str(tmp_path / "absent")])
    assert "pre-trained weights" in message and "--pretrained DIR" in message


@pytest.mark.slow
def test_demo_quick_runs_every_stage(tmp_path, capsys):
    main(["demo", "--quick", "--out", str(tmp_path), "--docs", str(tmp_path / "docs")])
    out = capsys.readouterr().out
    assert "| XL + kNN memory | 128 | 128 | 8,192 | 32 |" in out and "| XL only | 128 | 128 | - | - |" in out
    report = json.loads((tmp_path / "quick" / "demo.json").read_text())
    labels = ["XL + kNN memory", "XL + kNN memory, memory off", "XL only"]
    assert [r["label"] for r in report["code"]["results"]] == labels
    assert all(r["tokens"] == 512 for r in report["code"]["results"])
    recall = report["recall"]["results"]
    assert [r["label"] for r in recall] == ["XL + kNN memory", "XL only"]
    assert all(r["accuracy"]["memory"]["count"] > 0 for r in recall)  # the task does ask beyond the XL window
    published = (tmp_path / "docs" / "demo.md").read_text()
    assert published.startswith("# Demo results") and "only in memory" in published
    # The same command on the same machine gives the same figures (timings aside).
    main(["demo", "--quick", "--out", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again" / "quick" / "demo.json").read_text())

    def figures(part):
        return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in part["results"]]

    assert figures(again["code"]) == figures(report["code"]) and figures(again["recall"]) == figures(report["recall"])
