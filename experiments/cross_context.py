"""Grid runs' final weights tested with another segment length and XL cache than they were trained with,
and with a memory added at test time.

    python experiments/cross_context.py --threads 1

The relative position bias is length-free and the XL cache adds no weights, so a model
trained with segments of 512 can be tested with segments of 128 and an XL cache of 128,
and the other way round. This separates what a longer context gives at test time from
what training with it gave the weights. A memory added at test time, with the joint
softmax and no training (as `add_memory` gives one to a pretrained model), asks whether a
model trained here to attend far can read far through a memory too. Reads the final checkpoints of the runs
(runs/grids/GRID/RUN, made by experiments/grid.py); writes
experiments/results/cross_context.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from memorizing_transformers import MemorizingTransformer
from memorizing_transformers.atomic import write_atomically
from memorizing_transformers.data.pipeline import load_tokenized
from memorizing_transformers.evaluation.perplexity import evaluate
from memorizing_transformers.runs import resolve_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid import GRIDS  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
JOINT = dict(memory_size=8192, memory_combine="joint")  # a memory added at test time: no gate to learn
# (grid, run, what changes at test time)
CASES = [
    ("table4-pycode", "4L-s0", dict(segment_length=128, xl_length=128)),
    ("table4-pycode", "4L-s0", dict(segment_length=256, xl_length=256)),
    ("table4-pycode", "L-xl-s0", dict(segment_length=512, xl_length=0)),
    ("table4-pycode", "L-xl-s0", dict(segment_length=128, xl_length=128)),
    # the retrofit's experiment on a model trained here: memory added with zero training, in one layer or all
    ("table4-pycode", "4L-s0", dict(segment_length=128, xl_length=128, knn_layers=(-2,), **JOINT)),
    ("table4-pycode", "4L-s0", dict(segment_length=128, xl_length=128, knn_layers=(0, 1, 2, 3), **JOINT)),
    # the same with a memory of what left the XL cache only (no token in both; the retrofit's rule)
    (
        "table4-pycode",
        "4L-s0",
        dict(segment_length=128, xl_length=128, knn_layers=(-2,), memory_writes="evicted", **JOINT),
    ),
    (
        "table4-pycode",
        "4L-s0",
        dict(segment_length=128, xl_length=128, knn_layers=(0, 1, 2, 3), memory_writes="evicted", **JOINT),
    ),
]


def memory_added(row: dict) -> str:
    if not row["tested_memory"]:
        return "-"
    writes = "what leaves the XL cache" if row.get("tested_memory_writes") == "evicted" else "each segment"
    return f"{row['tested_memory']:,} entries of {writes}, joint softmax, layers {row['tested_memory_layers']}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/grids", help="where the grids' checkpoints are")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = OUT / "cross_context.json"
    done = {}  # rows measured before, by what they measured (a row is only measured once)
    if path.is_file():
        done = {(r["grid"], r["run"], json.dumps(r.get("changes"))): r for r in json.loads(path.read_text())["rows"]}
    rows = []
    for grid_name, run, changes in CASES:
        key = (grid_name, run, json.dumps(json.loads(json.dumps(changes))))
        if key in done:
            rows.append(done[key])
            continue
        grid = GRIDS[grid_name]
        trained = MemorizingTransformer.from_pretrained(resolve_model_dir(Path(args.runs) / grid_name / run))
        config = dataclasses.replace(trained.config, **changes)
        model = MemorizingTransformer(config, tokenizer=trained.tokenizer)
        model.take_weights(trained)
        documents = load_tokenized(grid.corpus, "test", trained.tokenizer)
        result = evaluate(model, documents, max_tokens=grid.eval_tokens)
        rows.append(
            {
                "grid": grid_name,
                "run": run,
                "changes": changes,
                "trained_segment": trained.config.segment_length,
                "trained_xl": trained.config.xl_length,
                "tested_segment": config.segment_length,
                "tested_xl": config.xl_length,
                "tested_memory_layers": list(config.memory_layer_indices),
                "tested_memory": changes.get("memory_size"),
                "tested_memory_writes": config.memory_writes,
                "tokens": result.tokens,
                "perplexity": result.perplexity,
            }
        )
        print(f"{grid_name}/{run} tested with {changes}: {result.perplexity:.3f}", flush=True)
    command = "python experiments/cross_context.py"
    write_atomically(
        path,
        lambda tmp: Path(tmp).write_text(
            json.dumps({"command": command, "threads": torch.get_num_threads(), "rows": rows}, indent=2)
        ),
    )
    lines = [
        f"Made by `{command}`: final weights tested with another context than they were trained with.",
        "",
        "| run | trained: segment / XL | tested: segment / XL | memory added at test time | test tokens | perplexity |",
        "|---|---|---|---|---:|---:|",
    ]
    lines += [
        f"| {r['grid']}/{r['run']} | {r['trained_segment']} / {r['trained_xl']} | {r['tested_segment']} / "
        f"{r['tested_xl']} | {memory_added(r)} | {r['tokens']:,} | {r['perplexity']:.3f} |"
        for r in rows
    ]
    write_atomically(OUT / "cross_context.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
