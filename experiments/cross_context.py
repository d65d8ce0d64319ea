"""Grid runs' final weights tested with another segment length and XL cache than they were trained with.

    python experiments/cross_context.py --threads 1

The relative position bias is length-free and the XL cache adds no weights, so a model
trained with segments of 512 can be tested with segments of 128 and an XL cache of 128,
and the other way round. This separates what a longer context gives at test time from
what training with it gave the weights. Reads the final checkpoints of the runs
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
from memorizing_transformers.training.checkpoint import resolve_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid import GRIDS, initialise_from  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
# (grid, run, segment length, XL length) at test time
CASES = [
    ("table4-pycode", "4L-s0", 128, 128),
    ("table4-pycode", "4L-s0", 256, 256),
    ("table4-pycode", "L-xl-s0", 512, 0),
    ("table4-pycode", "L-xl-s0", 128, 128),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/grids", help="where the grids' checkpoints are")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for grid_name, run, segment, xl in CASES:
        grid = GRIDS[grid_name]
        trained = MemorizingTransformer.from_pretrained(resolve_model_dir(Path(args.runs) / grid_name / run))
        config = dataclasses.replace(trained.config, segment_length=segment, xl_length=xl)
        model = MemorizingTransformer(config, tokenizer=trained.tokenizer)
        initialise_from(model, trained)
        documents = load_tokenized(grid.corpus, "test", trained.tokenizer)
        result = evaluate(model, documents, max_tokens=grid.eval_tokens)
        rows.append({
            "grid": grid_name, "run": run, "trained_segment": trained.config.segment_length,
            "trained_xl": trained.config.xl_length, "tested_segment": segment, "tested_xl": xl,
            "tokens": result.tokens, "perplexity": result.perplexity,
        })
        print(f"{grid_name}/{run} tested with segment {segment}, XL {xl}: {result.perplexity:.3f}", flush=True)
    command = "python experiments/cross_context.py"
    write_atomically(OUT / "cross_context.json", lambda tmp: Path(tmp).write_text(json.dumps(
        {"command": command, "threads": torch.get_num_threads(), "rows": rows}, indent=2)))
    lines = [f"Made by `{command}`: final weights tested with another context than they were trained with.", "",
             "| run | trained: segment / XL | tested: segment / XL | test tokens | perplexity |",
             "|---|---|---|---:|---:|"]
    lines += [f"| {r['grid']}/{r['run']} | {r['trained_segment']} / {r['trained_xl']} | {r['tested_segment']} / "
              f"{r['tested_xl']} | {r['tokens']:,} | {r['perplexity']:.3f} |" for r in rows]
    write_atomically(OUT / "cross_context.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
