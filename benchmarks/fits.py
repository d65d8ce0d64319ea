"""How many streams (batch rows) of memory fit a device: computed from benchmarks.memory_use's
measured bytes per stored token (its JSON), scaled to a preset's memory layers.

A row's memories take, per memory layer, memory_size x 2 x heads x head_dim x bytes (keys and
values), times the overhead memory_use measured for that dtype and backend at its largest size
(the ivf and faiss_ivf backends keep a second copy of the keys in their lists). What else a process holds
(weights, optimizer state, activations) comes on top and is not counted here.

    python -m benchmarks.fits                     # reads docs/benchmarks/memory_use.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memorizing_transformers import MemorizingConfig
from memorizing_transformers.atomic import write_atomically

DEVICES = {"24 GiB (e.g. RTX 4090)": 24, "80 GiB (A100 / H100)": 80, "141 GiB (H200)": 141}
SIZES = (65_536, 262_144, 1_048_576)


def overheads(memory_use: dict) -> dict[tuple[str, str], float]:
    """The measured resident bytes over keys + values, at the largest size measured, per (dtype, backend)."""
    largest = max(r["memory_size"] for r in memory_use["rows"])
    return {(r["dtype"], r["backend"]): r["ratio_to_store"] for r in memory_use["rows"] if r["memory_size"] == largest}


def table(memory_use: dict, preset: str = "paper") -> str:
    config = MemorizingConfig.preset(preset)
    layers = len(config.memory_layer_indices)
    lines = [
        f"The `{preset}` preset: {layers} memory layer(s) of {config.n_heads} heads x {config.head_dim}; rows of "
        "memory that fit each device (memories alone), from the overheads measured by `python -m "
        f"benchmarks.memory_use` on {memory_use['device']}. On a GPU the store is on the device and a "
        "`faiss_ivf` index (faiss-cpu) keeps its copy of the keys in host memory, and the `ivf` backend searches "
        "exactly, with no lists: there the device holds what the `exact` row of the same dtype says.",
        "",
        "| memory size | dtype | backend | MiB per row | " + " | ".join(DEVICES) + " |",
        "|---:|---|---|---:|" + "---:|" * len(DEVICES),
    ]
    for size in SIZES:
        for (dtype, backend), overhead in sorted(overheads(memory_use).items()):
            width = 4 if dtype == "float32" else 2
            per_row = size * 2 * config.n_heads * config.head_dim * width * layers * overhead
            fits = " | ".join(f"{int(gib * 2**30 // per_row):,}" for gib in DEVICES.values())
            lines.append(f"| {size:,} | {dtype} | {backend} | {per_row / 2**20:,.0f} | {fits} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-use", default="docs/benchmarks/memory_use.json", help="memory_use's results")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--out", default="docs/benchmarks", help="where fits.md goes")
    args = parser.parse_args(argv)
    text = table(json.loads(Path(args.memory_use).read_text()), args.preset)
    header = f"Made by `python -m benchmarks.fits` from {args.memory_use}.\n\n"
    write_atomically(Path(args.out) / "fits.md", lambda tmp: Path(tmp).write_text(header + text + "\n"))
    print(text)


if __name__ == "__main__":
    main()
