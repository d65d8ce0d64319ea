"""Memory retrofitted into a pretrained model, with zero training: how much of the
window-to-full-prefix gap does it win?

SmolLM2-135M (converted once by `mt pretrained smollm2`), long documents made of
standard-library source files, the first `--tokens` tokens of each; the last
`--score-last` tokens are scored three ways:
- window: a sliding window of `--window` tokens advancing by `--stride` (each scored
  token sees between window - stride and window tokens), no memory;
- window + memory: the same, with `add_memory` (joint softmax, zero training) in the
  chosen layers, each holding every token that has left the window;
- full prefix: one pass over all `--tokens` tokens (the upper bound).

    mt pretrained smollm2 --out models/smollm2-135m
    python experiments/pretrained_memory.py --checkpoint models/smollm2-135m

Writes experiments/results/pretrained_memory[-TAG].json and .md (the table, with the
command); `--summarize` rewrites the .md from an existing .json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sysconfig
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memorizing_transformers.atomic import write_atomically
from memorizing_transformers.hf.retrofit import add_memory

RESULTS = Path(__file__).resolve().parent / "results"
DOCUMENTS = {
    "typing + dataclasses": ["typing.py", "dataclasses.py"],
    "argparse": ["argparse.py"],
    "email message + header parser": ["email/message.py", "email/_header_value_parser.py"],
}


def document_ids(tokenizer, files: list[str], tokens: int) -> torch.Tensor:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((stdlib / f).read_text(encoding="utf-8", errors="replace") for f in files)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"{files} hold {ids.shape[1]:,} tokens, fewer than {tokens:,}")
    return ids


def perplexity(losses: torch.Tensor) -> float:
    return math.exp(float(losses.mean()))


@torch.no_grad()
def run(args: argparse.Namespace) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if args.layers == "all" else [int(i) for i in args.layers.split(",")]
    handle = add_memory(model, layers=layers, memory_size=args.tokens, k=args.k, combine="joint")
    rows = []
    for name, files in DOCUMENTS.items():
        ids = document_ids(tokenizer, files, args.tokens)
        scored = slice(args.tokens - 1 - args.score_last, args.tokens - 1)  # losses predict tokens 1..tokens-1
        began = time.perf_counter()
        with handle.disabled():
            logits = model(input_ids=ids, logits_to_keep=args.score_last + 1).logits[:, :-1]
            full = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, -args.score_last :], reduction="none")
            window = handle.stream(ids, args.window, args.stride, losses=True)[:, scored]
        handle.reset()
        memory = handle.stream(ids, args.window, args.stride, losses=True)[:, scored]
        handle.reset()
        row = {"document": name, "files": files, "window": perplexity(window), "window_memory": perplexity(memory),
               "full_prefix": perplexity(full), "seconds": time.perf_counter() - began}
        gap = row["window"] - row["full_prefix"]
        row["gap_closed"] = (row["window"] - row["window_memory"]) / gap if gap > 0 else float("nan")
        print(f"{name}: window {row['window']:.3f}, window + memory {row['window_memory']:.3f}, "
              f"full prefix {row['full_prefix']:.3f}, gap closed {row['gap_closed']:.0%}")
        rows.append(row)
    return {"settings": vars(args), "layers": layers, "rows": rows}


def table(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"Perplexity of the last {s['score_last']:,} of {s['tokens']:,} tokens; window {s['window']} with stride {s['stride']}; "
        f"memory (joint softmax, zero training, k {s['k']}) in layers {s['layers']}.",
        "",
        "| document | window | window + memory | full prefix | share of the gap closed |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['document']} | {r['window']:.3f} | {r['window_memory']:.3f} | {r['full_prefix']:.3f} | {r['gap_closed']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="models/smollm2-135m")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--score-last", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tag", default="")
    parser.add_argument("--summarize", action="store_true", help="only rewrite the .md from the existing .json")
    args = parser.parse_args()
    out = RESULTS / f"pretrained_memory{'-' + args.tag if args.tag else ''}.json"
    if args.summarize:
        results = json.loads(out.read_text())
    else:
        results = run(args)
        results["platform"] = platform.platform()
        results["command"] = "python experiments/pretrained_memory.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v != parser.get_default(k)
        )
        write_atomically(out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    text = f"Made by `{results['command'].strip()}` on {results.get('platform', platform.platform())}.\n\n{table(results)}\n"
    print(text)
    write_atomically(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
