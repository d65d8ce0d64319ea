"""Training-step time with and without memory, as ratios to the XL-only model of the same run.

Reference configuration (the one the popular PyTorch implementation was measured at):
vocab 8,192, d_model 256, 6 layers, 4 heads x 64, kNN in the 4th layer, k 32, batch 4 x
256-token segments, one AdamW step per segment; then the `small` preset (the same with
the GPT-2 vocabulary of 50,257). Memories are filled to capacity before timing, so every
search covers the whole memory (steady state). Rows marked IVF use the approximate
`faiss_ivf` backend; the others search exactly.

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
    text = "\n\n".join(sections)
    print(text)
    write_results("train_step-quick" if args.quick else "train_step", results, text, Path(args.out))


if __name__ == "__main__":
    main()
