"""Evaluate a checkpoint and write the results: JSON, a Markdown table, a loss-by-position plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..atomic import write_atomically  # noqa: E402
from ..config import MemorizingConfig  # noqa: E402
from ..data.pipeline import load_tokenized  # noqa: E402
from ..pretrained import MemorizingTransformer  # noqa: E402
from ..runs import resolve_model_dir  # noqa: E402
from .perplexity import EvalResult, evaluate  # noqa: E402


def describe(model: MemorizingTransformer) -> dict[str, Any]:
    c = model.config
    return {
        "memory_size": c.memory_size if c.knn_layers else 0,
        "knn_k": c.knn_k if c.knn_layers else 0,
        "xl_length": c.xl_length,
        "segment_length": c.segment_length,
        "knn_layers": list(c.memory_layer_indices),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | segment | XL | memory | k | tokens | loss (nats) | perplexity | bits/byte |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        bpb = "-" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
        memory = f"{r['memory_size']:,}" if r["memory_size"] else "-"
        lines.append(
            f"| {r['label']} | {r['segment_length']} | {r['xl_length'] or '-'} | {memory} | {r['knn_k'] or '-'} | "
            f"{r['tokens']:,} | {r['loss']:.4f} | {r['perplexity']:.3f} | {bpb} |"
        )
    return "\n".join(lines)


def log_binned(result: EvalResult, segment_length: int) -> tuple[list[float], list[float]]:
    """Token-weighted mean loss over segments [0], [1], [2, 3], [4, 7], ...: (mid positions, losses)."""
    positions, losses = [], []
    start = 0
    while start < len(result.loss_by_segment):
        stop = min(len(result.loss_by_segment), max(1, 2 * start))
        counts = result.tokens_by_segment[start:stop]
        total = sum(loss * n for loss, n in zip(result.loss_by_segment[start:stop], counts))
        positions.append((start + stop) / 2 * segment_length)
        losses.append(total / sum(counts))
        start = stop
    return positions, losses


def plot_loss_by_position(results: dict[str, EvalResult], segment_length: int, path: Path, title: str) -> None:
    """Mean loss against position in the document, in log-spaced bins of segments."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, result in results.items():
        ax.plot(*log_binned(result, segment_length), marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def report_dir(checkpoint: str | Path, corpus: str, split: str, out_dir: str | Path | None = None) -> Path:
    """Where `evaluate_checkpoint` writes: `out_dir`, by default <checkpoint>/eval-<corpus>-<split>."""
    return Path(out_dir) if out_dir else Path(checkpoint) / f"eval-{corpus}-{split}"


def evaluate_checkpoint(
    checkpoint: str | Path,
    corpus: str,
    split: str = "test",
    overrides: dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
    max_tokens: int | None = None,
    compare_without_memory: bool = True,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Evaluate a model (with `overrides` of memory_size, knn_k, xl_length, ...) on a corpus split,
    and, when it has memory layers, the same weights with the memory switched off."""
    model_dir = resolve_model_dir(checkpoint)
    overrides = dict(overrides or {})
    out = report_dir(checkpoint, corpus, split, out_dir)
    model = MemorizingTransformer.from_pretrained(model_dir, **overrides).to(device)
    variants = {"with memory" if model.config.knn_layers else "no memory": model}
    if model.config.knn_layers and compare_without_memory:
        variants["memory off"] = model.without_memory()
    documents = load_tokenized(corpus, split, model.tokenizer)
    results: dict[str, EvalResult] = {}
    rows = []
    for label, model in variants.items():
        results[label] = evaluate(model, documents, max_tokens=max_tokens, progress=True)
        rows.append({"label": label, **describe(model), **results[label].to_dict()})
    title = f"{model_dir.name} on {corpus}/{split}"
    table = markdown_table(rows)
    report = {"checkpoint": str(model_dir), "corpus": corpus, "split": split, "overrides": overrides, "results": rows}
    write_atomically(out / "eval.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    write_atomically(out / "eval.md", lambda tmp: Path(tmp).write_text(f"# {title}\n\n{table}\n"))
    plot_loss_by_position(results, model.config.segment_length, out / "loss_by_position.png", title)
    return {**report, "markdown": table, "json": str(out / "eval.json"), "plot": str(out / "loss_by_position.png")}


def forward_flops_per_token(c: MemorizingConfig, memory_fill: int | None = None) -> dict[str, float]:
    """Multiply-adds x 2 of one token's forward pass, by part, for a document long enough that
    the XL cache (and, with `memory_fill` entries, the memory) is full. Local attention counts
    the keys a query sees on average: the cache (or the window) and half the segment. The
    exact memory search scores every stored entry; ivf and faiss_ivf about nprobe / lists of
    them. Training costs about three times the forward pass, the search excepted."""
    inner = c.n_heads * c.head_dim
    keys = c.xl_compression or c.xl_length
    keys += (c.segment_length + 1) / 2
    if c.attention_window:
        keys = min(keys, c.attention_window)
    qkv = inner + 2 * c.kv_heads * c.head_dim  # the projection's outputs: queries, keys and values
    per_layer = 2 * c.d_model * qkv + 2 * inner * c.d_model + 2 * 2 * c.d_model * c.d_ff + 2 * 2 * inner * keys
    parts = {"layers": c.n_layers * per_layer, "lm_head": 2.0 * c.d_model * c.vocab_size}
    if c.knn_layers:
        stored = c.memory_size if memory_fill is None else memory_fill
        searched = (
            stored
            if c.memory_backend not in ("ivf", "faiss_ivf")
            else stored * min(1.0, c.ivf_nprobe * c.ivf_list_size / max(1, stored))
        )
        parts["memory_search"] = len(c.knn_layers) * 2.0 * inner * searched
        parts["memory_attention"] = len(c.knn_layers) * 2 * 2.0 * inner * c.knn_k
    parts["total"] = sum(parts.values())
    return parts
