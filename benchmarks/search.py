"""Exact top-k search: KNNMemory against faiss IndexFlatIP and the machine's matmul speed.

One segment's queries (heads x queries x head_dim) searched against M stored keys per
head, top-32, on the same random unit vectors. Every time is compared with a baseline
measured in the same run: faiss IndexFlatIP on the same data, and a plain matmul of the
same shape (the FLOP ceiling of exact search).

    python -m benchmarks.search            # M = 8K, 65K, 262K, 1M
    python -m benchmarks.search --quick    # small sizes, seconds
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from memorizing_transformers import KNNMemory

from .common import device_description, median_seconds, parse_arguments, write_results


def run(sizes: list[int], heads: int, queries: int, dim: int, k: int, repeats: int, device: torch.device) -> list[dict]:
    rows = []
    for size in sizes:
        torch.manual_seed(0)
        keys = F.normalize(torch.randn(1, heads, size, dim), dim=-1)
        q = F.normalize(torch.randn(1, heads, queries, dim), dim=-1)
        memory = KNNMemory(1, heads, dim, size, device=device)
        memory.add(keys.to(device), keys.to(device))
        q_device = q.to(device)
        flops = 2.0 * heads * queries * size * dim
        ours = median_seconds(lambda: memory.search(q_device, k), repeats, device=device)
        # The FLOP ceiling: the same product in one matmul, without top-k or masking.
        keys_t = memory.keys.transpose(-1, -2)
        matmul = median_seconds(lambda: torch.matmul(q_device, keys_t), repeats, device=device)
        indices = [faiss.IndexFlatIP(dim) for _ in range(heads)]
        for h, index in enumerate(indices):
            index.add(keys[0, h].numpy())
        q_np = [np.ascontiguousarray(q[0, h].numpy()) for h in range(heads)]
        flat = median_seconds(lambda: [index.search(q_np[h], k) for h, index in enumerate(indices)], repeats)
        found = memory.search(q_device, k).slots.cpu()
        same = np.mean([np.array_equal(np.sort(indices[h].search(q_np[h], k)[1], axis=1), np.sort(found[0, h].numpy(), axis=1)) for h in range(heads)])
        rows.append({
            "memory_size": size, "ours_s": ours, "faiss_flat_s": flat, "matmul_s": matmul,
            "speedup_vs_faiss_flat": flat / ours, "ours_gflops": flops / ours / 1e9, "matmul_gflops": flops / matmul / 1e9,
            "fraction_of_matmul": matmul / ours, "same_neighbours_as_faiss": float(same),
        })
        print(f"M={size:>9,}: ours {ours * 1e3:8.1f} ms, faiss flat {flat * 1e3:8.1f} ms, matmul {matmul * 1e3:8.1f} ms")
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| memory size | ours (ms) | faiss IndexFlatIP (ms) | ours / faiss speed-up | ours GFLOP/s | matmul GFLOP/s | ours / matmul | same neighbours |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['memory_size']:,} | {r['ours_s'] * 1e3:.1f} | {r['faiss_flat_s'] * 1e3:.1f} | {r['speedup_vs_faiss_flat']:.2f}x | "
            f"{r['ours_gflops']:.1f} | {r['matmul_gflops']:.1f} | {r['fraction_of_matmul']:.0%} | {r['same_neighbours_as_faiss']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args, device = parse_arguments(__doc__, argv)
    sizes = [1024, 4096] if args.quick else [8192, 65536, 262144, 1048576]
    settings = dict(heads=4, queries=64 if args.quick else 256, dim=64, k=32, repeats=2 if args.quick else 3)
    rows = run(sizes, device=device, **settings)
    command = "python -m benchmarks.search" + (" --quick" if args.quick else "")
    results = {"command": command, "device": device_description(device), "settings": settings, "rows": rows}
    text = table(rows)
    print(text)
    write_results("search-quick" if args.quick else "search", results, text, Path(args.out))


if __name__ == "__main__":
    main()
