"""Memory per stored token: KNNMemory filled to capacity, then searched, per dtype and backend.

Each case runs in a fresh process and reports two figures, both as growth over the
memory in use before the case: what stays resident once the memory is full (store,
index), per stored token; and the peak while filling and running one search (which
adds the search's transient score blocks). On the CPU these are VmRSS and VmHWM (reset
before the case); on CUDA, torch's allocated and peak allocated memory. The baseline of
every row is the least a store can take: keys and values at storage precision for every
head (2 x heads x head_dim x bytes per token).

    python -m benchmarks.memory_use            # 64K and 256K tokens, 4 heads x 64 dims
    python -m benchmarks.memory_use --quick
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import torch
import torch.nn.functional as F

from memorizing_transformers import KNNMemory
from memorizing_transformers.devices import describe_device
from memorizing_transformers.evaluation.peak_memory import PeakMemory

from .common import parse_arguments, write_results

HEADS, DIM, SEGMENT = 4, 64, 256


def measure_one(capacity: int, dtype: str, backend: str, device: str) -> tuple[int, int]:
    """Bytes resident after filling a memory of `capacity` tokens segment by segment, and
    peak bytes once it has also been searched."""
    torch.manual_seed(0)
    device_t = torch.device(device)
    with PeakMemory(device_t) as use:
        memory = KNNMemory(1, HEADS, DIM, capacity, dtype=getattr(torch, dtype), device=device_t, backend=backend)
        for _ in range(capacity // SEGMENT):
            keys = F.normalize(torch.randn(1, HEADS, SEGMENT, DIM, device=device_t), dim=-1)
            memory.add(keys, keys)
        del keys
        resident = use.in_use()
        memory.search(F.normalize(torch.randn(1, HEADS, SEGMENT, DIM, device=device_t), dim=-1), 32)
    return resident, use.peak_bytes


def main(argv: list[str] | None = None) -> None:
    args, device = parse_arguments(__doc__, argv)
    sizes = [4096] if args.quick else [65536, 262144]
    rows = []
    spawn = multiprocessing.get_context("spawn")
    for capacity in sizes:
        for dtype in ("float32", "bfloat16"):
            for backend in ("exact", "ivf", "faiss_ivf"):
                with spawn.Pool(1) as pool:
                    resident, peak = pool.apply(measure_one, (capacity, dtype, backend, str(device)))
                store = 2 * HEADS * DIM * torch.finfo(getattr(torch, dtype)).bits // 8
                rows.append(
                    {
                        "memory_size": capacity,
                        "dtype": dtype,
                        "backend": backend,
                        "resident_bytes": resident,
                        "peak_bytes": peak,
                        "bytes_per_token": resident / capacity,
                        "store_bytes_per_token": store,
                        "ratio_to_store": resident / capacity / store,
                    }
                )
                print(
                    f"M={capacity:>8,} {dtype:>8} {backend:>9}: {resident / capacity:8.0f} B/token resident "
                    f"(store {store} B), peak {peak / 2**20:.0f} MiB"
                )
    lines = [
        f"One layer's memory, {HEADS} heads x {DIM} dims, filled {SEGMENT} tokens at a time, then searched:",
        "",
        "| memory size | dtype | backend | resident bytes / token | keys + values alone | ratio | peak with a search "
        "(MiB) |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['memory_size']:,} | {r['dtype']} | {r['backend']} | {r['bytes_per_token']:,.0f} | "
            f"{r['store_bytes_per_token']:,} | {r['ratio_to_store']:.2f}x | {r['peak_bytes'] / 2**20:,.1f} |"
        )
    text = "\n".join(lines)
    print(text)
    command = "python -m benchmarks.memory_use" + (" --quick" if args.quick else "")
    results = {"command": command, "device": describe_device(device), "rows": rows}
    write_results("memory_use-quick" if args.quick else "memory_use", results, text, Path(args.out))


if __name__ == "__main__":
    main()
