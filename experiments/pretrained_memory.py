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
With `--wide-window W`, also a window of W tokens without memory (a wider window instead
of a memory); with `--memory-sizes`, the memory at each of those sizes per layer (the
paper's Table 5 in kind); with `--corpus NAME`, the first `--documents` documents of that
corpus holding at least `--tokens` tokens instead of the standard-library ones.

    mt pretrained smollm2 --out models/smollm2-135m
    python experiments/pretrained_memory.py --checkpoint models/smollm2-135m
    python experiments/pretrained_memory.py --corpus pycode --wide-window 2048 --tag pycode

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
from memorizing_transformers.data.corpora import load_corpus
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


TRAINING_FILES = [
    "inspect.py",
    "subprocess.py",
    "tarfile.py",
    "pydoc.py",
    "difflib.py",
    "ast.py",
    "enum.py",
    "functools.py",
    "threading.py",
    "zipfile.py",
    "logging/__init__.py",
    "collections/__init__.py",
]


def trained_parameters(model, handle, train: str) -> list[torch.nn.Parameter]:
    """memory-parameters: the gates (gate) or retrieved-logit biases (joint) add_memory adds;
    memory-layers: those and the attention of the memory layers; all: every weight."""
    if train == "all":
        return list(model.parameters())
    memory_layers = {f".layers.{i}.self_attn." for i in handle.layers}
    added = handle.memory_parameters()
    return [
        p
        for n, p in model.named_parameters()
        if n in added or (train == "memory-layers" and any(m in n for m in memory_layers))
    ]


def finetune(model, handle, tokenizer, args) -> list[float]:
    """A short fine-tune on other long stdlib files. Each step takes a chunk of
    `--finetune-tokens`, streams all but its last window into an emptied memory without
    gradients, then scores the last `--stride` tokens of the last window (which, as in the
    evaluation, see at least window - stride tokens locally and the rest through memory)
    and updates the chosen parameters: the memory is as full as in long documents while
    the graph holds one window."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [
        (stdlib / f).read_text(encoding="utf-8", errors="replace") for f in TRAINING_FILES if (stdlib / f).is_file()
    ]
    chunks = [
        ids
        for ids in (tokenizer(t, return_tensors="pt")["input_ids"] for t in texts)
        if ids.shape[1] > args.finetune_tokens
    ]
    params = trained_parameters(model, handle, args.train)
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(args.finetune_steps):
        ids = chunks[step % len(chunks)]
        start = int(torch.randint(0, ids.shape[1] - args.finetune_tokens, (1,), generator=generator))
        chunk = ids[:, start : start + args.finetune_tokens]
        handle.reset()
        with torch.no_grad():
            handle.stream(chunk[:, : -args.window], args.window, args.stride)
        loss = handle.stream(chunk[:, -args.window :], args.window, losses=True)[:, -args.stride :].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"fine-tune step {step + 1}/{args.finetune_steps}: loss {losses[-1]:.3f}")
    handle.reset()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def documents(tokenizer, args) -> list[tuple[str, list[str] | None, torch.Tensor]]:
    """(name, files, ids) of each evaluated document: the three standard-library documents,
    or with --corpus the first --documents documents of that corpus (--split) holding at least
    --tokens tokens (their first --tokens tokens)."""
    if not args.corpus:
        return [(name, files, document_ids(tokenizer, files, args.tokens)) for name, files in DOCUMENTS.items()]
    found = []
    splits = ("train", "valid", "test") if args.split == "all" else (args.split,)
    for document in (d for split in splits for d in load_corpus(args.corpus, split)):
        ids = tokenizer(document.text, return_tensors="pt")["input_ids"]
        if ids.shape[1] >= args.tokens:
            found.append((document.name, None, ids[:, : args.tokens]))
        if len(found) == args.documents:
            return found
    raise SystemExit(f"{args.corpus} ({args.split}) has only {len(found)} documents of {args.tokens:,} tokens or more")


def memory_sizes(args) -> list[int]:
    return [int(size) for size in args.memory_sizes.split(",")] if args.memory_sizes else []


def evaluation_settings(args) -> dict:
    return {k: getattr(args, k) for k in EVALUATION_SETTINGS}


def progress_file(args) -> Path:
    """Where the zero-training rows measured so far are kept, so that an interrupted run resumes
    at its next document (removed once the run's results are written)."""
    return RESULTS / f"pretrained_memory{'-' + args.tag if args.tag else ''}.partial.json"


@torch.no_grad()
def evaluate(model, handle, tokenizer, args, baselines: dict | None = None) -> list[dict]:
    """Every document's row; zero-training rows (no `baselines`) measured by an interrupted run
    with the same settings are taken from its progress file."""
    progress, rows, done = progress_file(args), [], {}
    if baselines is None and progress.is_file():
        saved = json.loads(progress.read_text())
        done = {r["document"]: r for r in saved["rows"]} if saved["settings"] == evaluation_settings(args) else {}
    for name, files, ids in documents(tokenizer, args):
        if name in done:
            print(f"{name}: measured by an earlier, interrupted run: kept")
            rows.append(done[name])
            continue
        scored = slice(args.tokens - 1 - args.score_last, args.tokens - 1)  # losses predict tokens 1..tokens-1
        began = time.perf_counter()
        if baselines is None:
            with handle.disabled():
                logits = model(input_ids=ids, logits_to_keep=args.score_last + 1).logits[:, :-1]
                full = torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), ids[:, -args.score_last :], reduction="none"
                )
                window = perplexity(handle.stream(ids, args.window, args.stride, losses=True)[:, scored])
                row = {"document": name, "files": files, "window": window, "full_prefix": perplexity(full)}
                if args.wide_window:  # a wider window instead of a memory
                    wide = handle.stream(ids, args.wide_window, args.wide_window // 2, losses=True)
                    row["window_wide"] = perplexity(wide[:, scored])
        else:
            row = dict(baselines[name])
        handle.reset()
        row["window_memory"] = perplexity(handle.stream(ids, args.window, args.stride, losses=True)[:, scored])
        handle.reset()
        if memory_sizes(args):  # Table 5 in kind: smaller memories, zero training
            row["window_memory_sizes"] = {}
            for size in memory_sizes(args):
                handle.resize(size)
                row["window_memory_sizes"][str(size)] = perplexity(
                    handle.stream(ids, args.window, args.stride, losses=True)[:, scored]
                )
            handle.resize(args.tokens)
        row["seconds"] = time.perf_counter() - began
        gap = row["window"] - row["full_prefix"]
        row["gap_closed"] = (row["window"] - row["window_memory"]) / gap if gap > 0 else float("nan")
        print(
            f"{name}: window {row['window']:.3f}, window + memory {row['window_memory']:.3f}, "
            f"full prefix {row['full_prefix']:.3f}, gap closed {row['gap_closed']:.0%}"
        )
        rows.append(row)
        if baselines is None:
            record = json.dumps({"settings": evaluation_settings(args), "rows": rows}, indent=2)
            write_atomically(progress, lambda tmp: Path(tmp).write_text(record))
    return rows


# Settings that decide the zero-training figures (the model, the documents, the memory).
EVALUATION_SETTINGS = (
    "checkpoint",
    "tokens",
    "score_last",
    "window",
    "stride",
    "layers",
    "k",
    "combine",
    "gate_init",
    "corpus",
    "documents",
    "split",
    "wide_window",
    "memory_sizes",
    "sink_tokens",
)


def zero_training_rows(model, handle, tokenizer, args, defaults: dict) -> list[dict]:
    """Measured, or with --zero-training-from, taken from an earlier run with the same
    evaluation settings (they are deterministic: the same figures, half an hour saved)."""
    if not args.zero_training_from:
        return evaluate(model, handle, tokenizer, args)
    earlier = json.loads(Path(args.zero_training_from).read_text())
    # A setting missing from an earlier run's record predates its option: it had the default.
    differ = [k for k in EVALUATION_SETTINGS if earlier["settings"].get(k, defaults[k]) != getattr(args, k)]
    if differ:
        raise SystemExit(f"{args.zero_training_from} was measured with other settings: {differ}")
    return earlier["rows"]


def run(args: argparse.Namespace, defaults: dict) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if args.layers == "all" else [int(i) for i in args.layers.split(",")]
    handle = add_memory(
        model,
        knn_layers=layers,
        memory_size=args.tokens,
        knn_k=args.k,
        memory_combine=args.combine,
        memory_gate_init=args.gate_init,
        sink_tokens=args.sink_tokens,
    )
    results = {
        "settings": vars(args),
        "layers": layers,
        "rows": zero_training_rows(model, handle, tokenizer, args, defaults),
    }
    if args.finetune_steps:
        # Training only the memory's parameters leaves the model without memory as it was:
        # window alone and full prefix are kept; otherwise they are measured again.
        baselines = (
            {r["document"]: {k: r[k] for k in ("document", "files", "window", "full_prefix")} for r in results["rows"]}
            if args.train == "memory-parameters"
            else None
        )
        results["finetune_losses"] = finetune(model, handle, tokenizer, args)
        results["rows_finetuned"] = evaluate(model, handle, tokenizer, args, baselines)
    return results


def table(results: dict) -> str:
    s = results["settings"]
    tuned = results.get("rows_finetuned")
    combine = s.get("combine", "joint")
    lines = [
        f"Perplexity of the last {s['score_last']:,} of {s['tokens']:,} tokens; window {s['window']} with stride "
        f"{s['stride']}; "
        "memory "
        f"({'joint softmax' if combine == 'joint' else 'learned gate, initial bias ' + str(s.get('gate_init'))}, "
        f"k {s['k']}) in layers {s['layers']}"
        + (f", {s['sink_tokens']} sink tokens" if s.get("sink_tokens") else "")
        + (
            f"; then fine-tuned {s['finetune_steps']} steps of {s['finetune_tokens']} tokens ({s['train']}, lr "
            f"{s['lr']})."
            if tuned
            else "."
        ),
        "",
    ]
    if tuned and s["train"] in ("memory-layers", "all"):
        # The weights changed: every figure of the fine-tuned model was measured again.
        return "\n".join(
            lines
            + _rows_table(results["rows"], "zero training")
            + ["", "After fine-tuning (the model's own weights changed too: all three measured again):", ""]
            + _rows_table(tuned, "fine-tuned")
        )
    wide = s.get("wide_window") or 0
    sizes = [size for size in (s.get("memory_sizes") or "").split(",") if size]
    lines += [
        "| document | window | "
        + (f"window {wide} | " if wide else "")
        + "window + memory, zero training | "
        + "".join(f"memory {int(size):,} | " for size in sizes)
        + ("after fine-tuning | " if tuned else "")
        + "full prefix | share of the gap closed"
        + (" (zero training / fine-tuned)" if tuned else "")
        + " |",
        "|---|---:|"
        + ("---:|" if wide else "")
        + "---:|"
        + "---:|" * len(sizes)
        + ("---:|" if tuned else "")
        + "---:|---:|",
    ]
    for i, r in enumerate(results["rows"]):
        after = tuned[i] if tuned else None
        lines.append(
            f"| {r['document']} | {r['window']:.3f} | "
            + (f"{r['window_wide']:.3f} | " if wide else "")
            + f"{r['window_memory']:.3f} | "
            + "".join(f"{r['window_memory_sizes'][size]:.3f} | " for size in sizes)
            + (f"{after['window_memory']:.3f} | " if after else "")
            + f"{r['full_prefix']:.3f} | {r['gap_closed']:.0%}"
            + (f" / {after['gap_closed']:.0%}" if after else "")
            + " |"
        )
    return "\n".join(lines)


def _rows_table(rows: list[dict], which: str) -> list[str]:
    return [
        "| document | window | window + memory, " + which + " | full prefix | share of the gap closed |",
        "|---|---:|---:|---:|---:|",
    ] + [
        f"| {r['document']} | {r['window']:.3f} | {r['window_memory']:.3f} | {r['full_prefix']:.3f} | "
        f"{r['gap_closed']:.0%} |"
        for r in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="models/smollm2-135m")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--score-last", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--combine", choices=["joint", "gate"], default="joint")
    parser.add_argument("--gate-init", type=float, default=-3.0, help="initial gate bias with --combine gate")
    parser.add_argument(
        "--finetune-steps", type=int, default=0, help="then fine-tune this many steps and evaluate again"
    )
    parser.add_argument(
        "--finetune-tokens", type=int, default=1024, help="tokens per fine-tuning step (the last window is scored)"
    )
    parser.add_argument(
        "--train",
        choices=["memory-parameters", "memory-layers", "all"],
        default="memory-parameters",
        help="memory-parameters: only the gates (--combine gate) or retrieved-logit biases (joint)",
    )
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--zero-training-from", help="take the zero-training figures from this earlier results JSON")
    parser.add_argument(
        "--corpus",
        help="evaluate on the first --documents long test documents of this corpus "
        "instead of the three standard-library documents",
    )
    parser.add_argument("--documents", type=int, default=5)
    parser.add_argument(
        "--split",
        default="test",
        choices=["train", "valid", "test", "all"],
        help="where --corpus documents come from (the pretrained model was trained on none of them)",
    )
    parser.add_argument(
        "--wide-window", type=int, default=0, help="also measure a wider window (stride half of it), no memory"
    )
    parser.add_argument(
        "--memory-sizes", default="", help="also measure these memory sizes per layer, e.g. 1024,2048,4096,8192"
    )
    parser.add_argument(
        "--sink-tokens",
        type=int,
        default=0,
        help="keep each document's first tokens apart, never evicted (add_memory's sink_tokens)",
    )
    parser.add_argument("--tag", default="")
    parser.add_argument("--summarize", action="store_true", help="only rewrite the .md from the existing .json")
    args = parser.parse_args()
    out = RESULTS / f"pretrained_memory{'-' + args.tag if args.tag else ''}.json"
    if args.summarize:
        results = json.loads(out.read_text())
    else:
        results = run(args, {k: parser.get_default(k) for k in EVALUATION_SETTINGS})
        results["platform"] = platform.platform()
        results["command"] = "python experiments/pretrained_memory.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v != parser.get_default(k)
        )
        write_atomically(out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
        progress_file(args).unlink(missing_ok=True)
    made_on = results.get("platform", platform.platform())
    text = f"Made by `{results['command'].strip()}` on {made_on}.\n\n{table(results)}\n"
    print(text)
    write_atomically(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
