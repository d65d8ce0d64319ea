"""experiments/grid.py: runs to their budgets, resumes, skips finished runs, tabulates."""

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from benchmarks.faults import write_texts
from memorizing_transformers.cli import main as mt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import grid as grid_script  # noqa: E402


@pytest.fixture
def quick_grid(tmp_path):
    mt(["data", "prepare", "files", "--source", str(write_texts(tmp_path / "texts"))])
    return dataclasses.replace(grid_script.GRIDS["quick"], corpus="files", vocab_size=300)


def test_the_command_names_its_refusals():
    with pytest.raises(SystemExit, match="unknown grid 'nope'"):
        grid_script.main(["quick", "nope"])
    with pytest.raises(SystemExit, match="--only names runs of one grid"):
        grid_script.main(["quick", "table4-books", "--only", "xl"])
    with pytest.raises(SystemExit, match="name a grid"):
        grid_script.main([])


def test_gate_history_spreads_its_points_over_training_and_keeps_the_last(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 1.0, "memory_gates": {"1": [s / 100]}} for s in range(1, 47)]
    log.write_text("\n".join(json.dumps(r) for r in [{"step": 0, "loss": 2.0}, *lines]) + "\n")
    history = grid_script.gate_history(log, points=10)
    assert [h["step"] for h in history] == [*range(1, 47, 4), 46]
    assert history[-1]["gates"] == {"1": [0.46]}
    assert grid_script.gate_history(log, points=100) == [{"step": s, "gates": {"1": [s / 100]}} for s in range(1, 47)]


@pytest.mark.slow
def test_a_grid_resumes_across_invocations_and_skips_finished_runs(quick_grid, tmp_path, monkeypatch, capsys):
    runs, results = tmp_path / "runs", tmp_path / "results"
    # A first invocation with no time left trains nothing and finishes nothing.
    assert not grid_script.run_grid(quick_grid, runs, results, "cpu", max_minutes=0)
    assert grid_script.run_grid(quick_grid, runs, results, "cpu", max_minutes=None)
    rows = {r.name: json.loads((results / "quick" / f"{r.name}.json").read_text()) for r in quick_grid.runs}
    assert rows["pretrain"]["steps"] == 6 and rows["xl"]["steps"] == 4
    assert set(rows["mem-xl"]["test"]) == {"with memory", "memory off", "memory 512"} and set(rows["xl"]["test"]) == {
        "no memory"
    }
    assert rows["xl"]["train_tokens"] == 4 * 32 * 4 and rows["xl"]["train_seconds"] > 0
    # Fine-tunes start from the pre-training's final weights (memory gates at the grid's value).
    out = capsys.readouterr().out
    assert out.count(f"starting from the weights of {results / 'quick' / 'pretrain-weights'}") == 3
    # A run of 0 tokens is its source evaluated as it is: the pre-training's own figures, no training.
    assert rows["as-is"]["test"] == rows["pretrain"]["test"] and rows["as-is"]["train_tokens"] == 0
    assert rows["as-is"]["steps"] == 0 and "train_bytes" not in rows["as-is"]["peak_memory"]
    assert rows["mem-xl"]["settings"]["model"]["memory_gate_init"] == -3.0
    attention = rows["mem-xl"]["memory_attention"]
    (layer,) = rows["mem-xl"]["memory_gates"]  # the one memory layer, 2 heads
    assert list(attention) == [layer]
    # The gates over training, from the trainer's log: the last logged step is the run's last.
    history = rows["mem-xl"]["memory_gates_by_step"]
    assert (
        history[-1] == {"step": 4, "gates": rows["mem-xl"]["memory_gates"]}
        and rows["xl"]["memory_gates_by_step"] is None
    )
    assert len(attention[layer]["farthest_bias"]) == len(attention[layer]["qk_scale"]) == 2
    # The same command on the same machine gives the same figures: the pre-training run again
    # from nothing, into other folders, matches to the last bit.
    assert not grid_script.run_grid(quick_grid, tmp_path / "runs2", tmp_path / "results2", "cpu", None, ["pretrain"])
    again = json.loads((tmp_path / "results2" / "quick" / "pretrain.json").read_text())
    assert again["test"] == rows["pretrain"]["test"]
    # Peak memory, measured in a fresh process: training until the memory is full (256 slots of
    # 32-token segments: 8 steps) plus 20, at most the run's own 4 steps.
    peak = rows["mem-xl"]["peak_memory"]
    assert peak["train_steps"] == 4 and peak["train_bytes"] > 0 and peak["test_bytes"] >= 0
    assert peak["test_tokens"] == 256  # the grid's test budget, under memory size + 4 segments
    # How the memory heads read their k = 32 retrieved entries (the quick grid's k)
    readout = rows["mem-xl"]["memory_readout"][layer]
    assert all(1 / 32 - 1e-6 <= w <= 1 for w in readout["best_entry_weight"])
    assert all(0 <= e <= readout["uniform_entropy"] + 1e-6 for e in readout["entropy"])
    assert readout["uniform_entropy"] == pytest.approx(math.log(32)) and rows["xl"]["memory_readout"] is None
    # Finished runs are skipped: a second call trains nothing, but measures what a JSON lacks
    # (as in a JSON written before these were measured), from the run's final checkpoint.
    del rows["xl"]["peak_memory"], rows["mem-xl"]["memory_readout"]
    (results / "quick" / "xl.json").write_text(json.dumps(rows["xl"]))
    (results / "quick" / "mem-xl.json").write_text(json.dumps(rows["mem-xl"]))
    train_run = grid_script.train_run
    monkeypatch.setattr(grid_script, "train_run", lambda *a, **k: pytest.fail("trained a finished run"))
    assert grid_script.run_grid(quick_grid, runs, results, "cpu", max_minutes=None)
    assert json.loads((results / "quick" / "xl.json").read_text())["peak_memory"]["train_steps"] == 4
    assert json.loads((results / "quick" / "mem-xl.json").read_text())["memory_readout"][layer] == readout
    table = grid_script.summarize(quick_grid, results)
    assert table.count("| ") > 3 and "| mem-xl | memory + XL |" in table and "peak MB train / test" in table
    gain = rows["mem-xl"]["token_gain"]
    assert gain["tokens"] == rows["mem-xl"]["test"]["with memory"]["tokens"] and rows["xl"]["token_gain"] is None
    assert (
        sum(g["tokens"] for g in gain["by_kind"])
        == gain["tokens"]
        == sum(g["tokens"] for g in gain["by_training_frequency"])
    )
    assert abs(sum(g["share_of_gain"] for g in gain["by_distance_to_previous_occurrence"]) - 1) < 1e-6
    assert "### mem-xl: memory + XL" in table and "| top tokens by total gain |" in table
    assert (results / "quick-token-gain.png").stat().st_size > 1000
    assert (results / "quick.png").stat().st_size > 1000
    # A source whose final weights were not kept (a result older than keeping them) is trained again,
    # from its checkpoint here, before a run that starts from it.
    monkeypatch.setattr(grid_script, "train_run", train_run)
    shutil.rmtree(results / "quick" / "pretrain-weights")
    (results / "quick" / "xl.json").unlink()
    capsys.readouterr()
    assert grid_script.run_grid(quick_grid, runs, results, "cpu", None, ["xl"])
    assert "-- pretrain: its final weights were not kept; training it again for xl" in capsys.readouterr().out
    assert (results / "quick" / "pretrain-weights" / "config.json").is_file()
    assert json.loads((results / "quick" / "pretrain.json").read_text())["test"] == rows["pretrain"]["test"]
    # A run whose recorded settings differ from the grid's is refused, not reused.
    changed = dataclasses.replace(quick_grid, batch_size=2)
    with pytest.raises(SystemExit, match="other settings"):
        grid_script.run_grid(changed, runs, results, "cpu", max_minutes=None)


@pytest.mark.slow
def test_synthetic_recall_trains_through_the_trainer_and_resumes(tmp_path):
    import synthetic_recall

    args = [
        "--quick",
        "--steps",
        "40",
        "--eval-every",
        "20",
        "--results",
        str(tmp_path),
        "--runs",
        str(tmp_path / "runs"),
    ]
    path = synthetic_recall.main(args)
    result = json.loads(path.read_text())
    memory, baseline = result["runs"]["memory"], result["runs"]["no_memory"]
    assert [p["step"] for p in memory["curve"]] == [0, 20, 40] and baseline["steps"] == 40
    assert set(memory["final"]) >= {"acc_segment", "acc_xl", "acc_memory", "memory_gate"}
    first = memory["final"]
    # Run again: the runs are finished (resumed at step 40) and give the same figures.
    again = json.loads(synthetic_recall.main(args).read_text())["runs"]["memory"]
    assert again["final"]["acc_memory"] == first["acc_memory"] and again["steps"] == 40
    with pytest.raises(SystemExit, match="other settings"):
        synthetic_recall.main(args[:2] + ["30"] + args[3:])


def test_rows_start_from_another_grid_and_short_documents_are_cut():
    import torch

    from memorizing_transformers.data.streaming import TokenizedDocument

    grid = grid_script.GRIDS["questions-pycode"]
    source_grid, source = grid_script.source_of(grid, grid.run("linformer64"))
    assert (source_grid.name, source.name) == ("table4-pycode", "pretrain")
    assert grid_script.started_from(source_grid, source) and not grid_script.started_from(grid, grid.run("2L"))
    pieces = grid_script.cut_documents([TokenizedDocument("d", torch.arange(10))], 4)
    assert [(p.name, p.ids.tolist()) for p in pieces] == [("d#0", [0, 1, 2, 3]), ("d#1", [4, 5, 6, 7]), ("d#2", [8, 9])]
    # a pre-training without the compression starts the causal Linformer row (its projections at their init)
    from memorizing_transformers import MemorizingConfig, MemorizingTransformer

    plain = MemorizingTransformer(MemorizingConfig.preset("tiny", knn_layers=()))
    MemorizingTransformer(MemorizingConfig.preset("tiny", xl_compression=4)).take_weights(plain)
