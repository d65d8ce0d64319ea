"""Training-step time with and without memory, as ratios to the XL-only model of the same run.

Reference configuration (the one the popular PyTorch implementation was measured at):
vocab 8,192, d_model 256, 6 layers, 4 heads x 64, kNN in the 4th layer, k 32, batch 4 x
256-token segments, one AdamW step per segment; then the `small` preset (the same with
the GPT-2 vocabulary of 50,257). Memories are filled to capacity before timing, so every
search covers the whole memory (steady state). Rows marked IVF use the approximate
`faiss_ivf` backend; the others search exactly. When memorizing-transformers-pytorch
0.4.1 is installed (see benchmarks/popular.py), the same table is measured for it at the
reference configuration in the same run.

    python -m benchmarks.train_step            # the reference configuration
    python -m benchmarks.train_step --quick    # a tiny configuration, seconds
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from memorizing_transformers import MemorizingConfig, MemorizingTransformer
from memorizing_transformers.training.trainer import segment_loss

from . import popular
from .common import device_description, median_seconds, parse_arguments, write_results

REFERENCE = MemorizingConfig(
    vocab_size=8192, d_model=256, n_layers=6, n_heads=4, head_dim=64, d_ff=1024,
    segment_length=256, xl_length=256, knn_layers=(3,), memory_size=8192, knn_k=32,
)
QUICK = dataclasses.replace(REFERENCE, vocab_size=512, d_model=64, n_layers=2, n_heads=2, head_dim=32, d_ff=128,
                            segment_length=32, xl_length=32, knn_layers=(1,), memory_size=512, knn_k=8)


def size_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"


def variants(base: MemorizingConfig, large_memory: int) -> dict[str, MemorizingConfig]:
    small, large = size_label(base.memory_size), size_label(large_memory)
    ivf = dict(memory_size=large_memory, memory_backend="faiss_ivf")
    return {
        "vanilla": dataclasses.replace(base, xl_length=0, knn_layers=()),
        "XL only": dataclasses.replace(base, knn_layers=()),
        f"memory {small}": dataclasses.replace(base, xl_length=0),
        f"memory {large}": dataclasses.replace(base, xl_length=0, memory_size=large_memory),
        f"memory {large} + XL": dataclasses.replace(base, memory_size=large_memory),
        f"memory {large} IVF": dataclasses.replace(base, xl_length=0, **ivf),
        f"memory {large} IVF + XL": dataclasses.replace(base, **ivf),
    }


def step_seconds(config: MemorizingConfig, batch: int, repeats: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = MemorizingTransformer(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = model.new_state(batch)
    for memory in state.memories.values():  # steady state: a full memory
        shape = (batch, config.n_heads, config.memory_size, config.head_dim)
        memory.add(F.normalize(torch.randn(shape, device=device), dim=-1), torch.randn(shape, device=device))
    ids = torch.randint(0, config.vocab_size, (batch, config.segment_length), device=device)

    def step() -> None:
        nonlocal state
        out = model(ids, state=state)
        state = out.state
        loss = segment_loss(out.logits, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return median_seconds(step, repeats, warmup=2, device=device)


def measure(base: MemorizingConfig, large: int, batch: int, repeats: int, device: torch.device) -> list[dict]:
    rows = []
    for label, config in variants(base, large).items():
        seconds = step_seconds(config, batch, repeats, device)
        rows.append({"variant": label, "seconds": seconds, "tokens_per_s": batch * config.segment_length / seconds})
        print(f"{label:>24}: {seconds:.3f} s/step")
    return with_ratios(rows)


def measure_popular(base: MemorizingConfig, large: int, batch: int, repeats: int, device: torch.device) -> list[dict]:
    """The popular implementation's steps at `base`, labelled like ours."""
    shape = dict(vocab_size=base.vocab_size, d_model=base.d_model, n_layers=base.n_layers, n_heads=base.n_heads,
                 head_dim=base.head_dim, knn_layer=base.memory_layer_indices[0], k=base.knn_k,
                 segment_length=base.segment_length, batch=batch, xl_length=base.xl_length, repeats=repeats, device=device)
    cases = [("vanilla", "vanilla", base.memory_size), ("XL only", "XL only", base.memory_size)]
    for size in (base.memory_size, large):
        cases += [(f"memory {size_label(size)}", "memory", size), (f"memory {size_label(size)} + XL", "memory + XL", size)]
    rows = []
    for label, variant, size in cases:
        seconds = popular.step_seconds(variant, memory_size=size, **shape)
        rows.append({"variant": label, "seconds": seconds, "tokens_per_s": batch * base.segment_length / seconds})
        print(f"{'popular ' + label:>24}: {seconds:.3f} s/step")
    return with_ratios(rows)


def with_ratios(rows: list[dict]) -> list[dict]:
    xl = next(r["seconds"] for r in rows if r["variant"] == "XL only")
    for r in rows:
        r["ratio_to_xl"] = r["seconds"] / xl
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| variant | s / step | tokens / s | ratio to XL only |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | {r['ratio_to_xl']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args, device = parse_arguments(__doc__, argv)
    if args.quick:
        configs, large, batch, repeats = {"quick": QUICK}, 2048, 2, 3
    else:
        configs, large, batch, repeats = {"reference": REFERENCE, "small": MemorizingConfig.preset("small")}, 65536, 4, 7
    results = {"command": "python -m benchmarks.train_step" + (" --quick" if args.quick else ""),
               "device": device_description(device), "batch_size": batch, "repeats": repeats, "configs": {}}
    sections = []
    for name, base in configs.items():
        rows = measure(base, large, batch, repeats, device)
        results["configs"][name] = {"config": base.to_dict(), "rows": rows}
        sections.append(f"### {name} configuration (vocab {base.vocab_size:,}), batch {batch} x {base.segment_length}\n\n{table(rows)}")
        if name == "reference" and popular.available():
            theirs = measure_popular(base, large, batch, repeats, device)
            results["configs"][name]["popular_rows"] = theirs
            label = f"memory {size_label(large)}"
            theirs_large = next(r["tokens_per_s"] for r in theirs if r["variant"] == label)
            speedups = {v: next(r["tokens_per_s"] for r in rows if r["variant"] == v) / theirs_large for v in (label, label + " IVF")}
            results["configs"][name]["tokens_per_s_vs_popular_at_large_memory"] = speedups
            sections.append(
                f"### memorizing-transformers-pytorch 0.4.1, reference configuration, same run\n\n{table(theirs)}\n\n"
                f"Tokens/s at memory {size_label(large)}, ours over theirs: {speedups[label]:.2f}x with exact search, "
                f"{speedups[label + ' IVF']:.2f}x with `faiss_ivf` (its memory: one key head shared by all heads, "
                f"HNSW, wiped whole when full; ours: per head, FIFO)."
            )
    text = "\n\n".join(sections)
    print(text)
    write_results("train_step-quick" if args.quick else "train_step", results, text, Path(args.out))


if __name__ == "__main__":
    main()
