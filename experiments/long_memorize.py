"""A long document learned at inference time, timed: `mt memorize` then `mt generate` on a prompt
of about --tokens tokens (the `mt longbench` passkey format: a five-digit key hidden at --depth
in filler), the question asked after the memorized text.

The document is written to --out/document.txt; the two commands run in this process, each
timed, with the options given (the memory's layers, search backend and storage dtype, the
position mode); the generated continuation is checked for the key. The model's own forward pass
over the same tokens, window by window, is timed in the same run for comparison, and so is
generation apart from loading: the saved memory loaded once, the question's first token and
each token after it, with the full memory and with the memory disabled (the window alone),
in alternating rounds.

    python experiments/long_memorize.py --checkpoint models/smollm2-135m --tokens 102400 \\
        --knn-layers 7,14,17,18,20,21 --memory-backend faiss_ivf --memory-dtype bfloat16

Writes --out/long_memorize.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memorizing_transformers.atomic import write_atomically
from memorizing_transformers.cli import main as mt
from memorizing_transformers.data.long_tasks import make_task
from memorizing_transformers.devices import describe_device
from memorizing_transformers.evaluation.peak_memory import PeakMemory
from memorizing_transformers.hf.files import memory_file_settings
from memorizing_transformers.hf.retrofit import add_memory

RESULTS = Path(__file__).resolve().parent / "results" / "long-memorize-smollm2"
QUESTION = "What is the pass key? The pass key is"


def timed_command(arguments: list[str]) -> tuple[float, str, int]:
    """Run `mt ARGUMENTS` here; its wall time, what it printed and the process's peak resident set
    while it ran (bytes)."""
    printed = StringIO()
    tick = time.perf_counter()
    with redirect_stdout(printed), PeakMemory("cpu") as peak:
        mt(arguments)
    return time.perf_counter() - tick, printed.getvalue().strip(), peak.before + peak.peak_bytes


@torch.no_grad()
def plain_seconds(checkpoint: str, text: str, window: int) -> float:
    """The model's own forward pass over the document's tokens, window by window (no memory)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(checkpoint)(text, return_tensors="pt")["input_ids"]
    tick = time.perf_counter()
    for start in range(0, ids.shape[1], window):
        model(ids[:, start : start + window], logits_to_keep=1)
    return time.perf_counter() - tick


@torch.no_grad()
def generation_seconds(checkpoint: str, memory: Path, window: int, new_tokens: int = 16, rounds: int = 3) -> dict:
    """Generating after the question with the saved memory loaded (as `mt generate` loads it) and
    with it disabled: the medians over `rounds` alternating rounds of the first token's time (the
    question read) and of each later token's (greedy, `new_tokens` forced)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    handle = add_memory(model, **memory_file_settings(memory))
    handle.load(memory)
    question = AutoTokenizer.from_pretrained(checkpoint)(QUESTION, return_tensors="pt")["input_ids"]

    def seconds(tokens: int) -> float:
        tick = time.perf_counter()
        handle.generate(question, window, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return time.perf_counter() - tick

    times: dict[str, list[tuple[float, float]]] = {"memory": [], "window": []}
    for _ in range(rounds):
        for name in times:
            with handle.disabled() if name == "window" else contextlib.nullcontext():
                first, whole = seconds(1), seconds(1 + new_tokens)
            times[name].append((first, (whole - first) / new_tokens))
    return {
        f"{name}_{part}": statistics.median(pair[i] for pair in pairs)
        for name, pairs in times.items()
        for i, part in enumerate(("first_token_seconds", "token_seconds"))
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="models/smollm2-135m")
    parser.add_argument("--tokens", type=int, default=102400)
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--knn-layers", default="all")
    parser.add_argument("--memory-backend", default="exact")
    parser.add_argument("--memory-dtype", default="float32")
    parser.add_argument("--positions", default="fixed")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument(
        "--write-only", action="store_true", help="memorize without searching (mt memorize --write-only)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    sample = make_task("passkey", tokenizer, args.tokens, args.depth, 0)
    document = sample.prompt.removesuffix(QUESTION)  # the text to memorize; the question is the prompt
    out = Path(os.path.relpath(args.out))  # the commands as a user in this folder would type them
    path, memory = out / "document.txt", out / "kb.safetensors"
    path.write_text(document)
    options = ["--knn-layers", args.knn_layers, "--memory-backend", args.memory_backend]
    options += ["--memory-dtype", args.memory_dtype, "--positions", args.positions, "--window", str(args.window)]
    options += ["--write-only"] if args.write_only else []
    memorize = ["memorize", args.checkpoint, str(path), "--out", str(memory), *options, "--device", "cpu"]
    generate = ["generate", args.checkpoint, "--memory", str(memory), "--prompt", QUESTION]
    generate += ["--max-new-tokens", "8", "--device", "cpu"]
    memorize_seconds, memorized, memorize_peak = timed_command(memorize)
    generate_seconds, answer, generate_peak = timed_command(generate)
    result = {
        "settings": vars(args) | {"out": str(args.out)},
        "device": describe_device(torch.device("cpu")),
        "tokens": len(tokenizer(document)["input_ids"]),
        "key": sample.answer,
        "commands": [shlex.join(["mt", *memorize]), shlex.join(["mt", *generate])],
        "memorize_seconds": memorize_seconds,
        "memorized": memorized,
        "memorize_peak_bytes": memorize_peak,
        "generate_seconds": generate_seconds,
        "generate_peak_bytes": generate_peak,
        "answer": answer,
        "found": sample.answer in answer,
        "plain_seconds": plain_seconds(args.checkpoint, document, args.window),
        "memory_file_bytes": memory.stat().st_size,
        "generation": generation_seconds(args.checkpoint, memory, args.window),
    }
    memory.unlink()  # large, and made again by the command
    write_atomically(args.out / "long_memorize.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    gen = result["generation"]
    text = "\n".join(
        [
            f"Made by `python experiments/long_memorize.py {shlex.join(argv)}` on {result['device']}.",
            "",
            f"A {result['tokens']:,}-token document (a passkey at depth {args.depth:g} in filler), memorized, asked:",
            "",
            *(f"    {command}" for command in result["commands"]),
            "",
            "| step | seconds | peak resident set of the process |",
            "|---|---:|---:|",
            f"| `mt memorize` (model loading included) | {memorize_seconds:.0f} | {memorize_peak / 2**30:.2f} GiB |",
            f"| `mt generate` (loading the model and the memory file included) | {generate_seconds:.0f} "
            f"| {generate_peak / 2**30:.2f} GiB |",
            f"| the model's own forward pass over the same tokens, window by window | {result['plain_seconds']:.0f} "
            "| |",
            "",
            "Generating after the question, the model and the memory file loaded once (medians of 3 alternating "
            "rounds, 16 tokens forced after the first):",
            "",
            "| | first token (the question read) | each token after it |",
            "|---|---:|---:|",
            *(
                f"| {label} | {gen[name + '_first_token_seconds'] * 1000:,.0f} ms "
                f"| {gen[name + '_token_seconds'] * 1000:,.0f} ms |"
                for name, label in (("memory", "the full memory"), ("window", "the window alone (memory disabled)"))
            ),
            f"| ratio | {gen['memory_first_token_seconds'] / gen['window_first_token_seconds']:.2f}x "
            f"| {gen['memory_token_seconds'] / gen['window_token_seconds']:.2f}x |",
            "",
            f"The key {sample.answer}: the model answered `{answer}` ({'found' if result['found'] else 'not found'}); "
            f"the memory file held {result['memory_file_bytes'] / 2**20:,.0f} MiB.",
            "",
        ]
    )
    (args.out / "long_memorize.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
