"""The `mt` command."""

from __future__ import annotations

import argparse
import math
import sysconfig
from pathlib import Path

import torch

from .config import PRESETS, MemorizingConfig
from .data.tokenizer import load_tokenizer
from .evaluation.streaming import stream_document
from .model.transformer import MemorizingTransformer


def default_document() -> Path:
    """A long document every Python install has: the standard library's typing module."""
    return Path(sysconfig.get_paths()["stdlib"]) / "typing.py"


def cmd_demo(args: argparse.Namespace) -> None:
    path = Path(args.file) if args.file else default_document()
    if not path.is_file():
        raise SystemExit(f"mt demo: no such file: {path}")
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer()
    model = MemorizingTransformer(MemorizingConfig.preset(args.preset, vocab_size=len(tokenizer)), tokenizer).eval()
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = torch.tensor(tokenizer(text)["input_ids"])
    segments = 4 if args.quick else args.segments
    if segments:
        ids = ids[: segments * model.config.segment_length + 1]
    config = model.config
    print(f"document: {path} (streaming {ids.numel():,} tokens of GPT-2 BPE)")
    print(
        f"model: preset {args.preset!r}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
        f"(untrained), segment {config.segment_length}, XL cache {config.xl_length}, "
        f"kNN memory {config.memory_size:,} per head in layer(s) {list(config.memory_layer_indices)}, k {config.knn_k}"
    )
    print()
    print("| segment | tokens | loss (nats) | perplexity | memory fill | seconds |")
    print("|---:|---:|---:|---:|---:|---:|")
    total_loss = total_tokens = 0.0
    for r in stream_document(model, ids):
        total_loss += r.loss * r.tokens
        total_tokens += r.tokens
        print(f"| {r.index} | {r.tokens} | {r.loss:.3f} | {math.exp(r.loss):,.0f} | {r.memory_fill:,} | {r.seconds:.2f} |")
    print()
    print(f"mean loss {total_loss / total_tokens:.3f} nats over {int(total_tokens):,} tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mt", description="Memorizing Transformers: language models with a kNN memory.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="stream a long standard-library document through a model with memory")
    demo.add_argument("--file", help="text file to stream (default: the standard library's typing.py)")
    demo.add_argument("--preset", default="small", choices=sorted(PRESETS))
    demo.add_argument("--segments", type=int, default=0, help="stop after this many segments (0: whole document)")
    demo.add_argument("--quick", action="store_true", help="only 4 segments (a smoke test)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
