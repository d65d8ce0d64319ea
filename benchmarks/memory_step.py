"""Where a memory layer's training-step time goes, at 64K entries with XL.

The step of `benchmarks.train_step`'s reference configuration (batch 4 x 256, 4 heads x 64,
k 32) with a full 64K memory, with the `ivf` backend and with exact search, against XL only; the
memory's share of the step is split into the parts timed on their own at the same shapes:
the search (the backend alone), the gather of the winners' keys and values (the memory's
search with the winners' slots already known), and the write of a segment into the full
ring buffer (with the IVF lists of the keys written). What is left
of the difference (scoring the winners, the combination with local attention, and the
backward through the gathered entries) is given by subtraction. Every part is timed in
the same interleaved rounds (see common.interleaved). Within the exact search, also timed: the same
search on PyTorch's ops alone (without the CPU kernel, on a CPU), and its product alone, with and
without one PyTorch pass over its scores. On a GPU, the step with its memories in
pinned host memory (searched by the CPU, `memory_device="cpu"`) is timed beside them.

    python -m benchmarks.memory_step            # the reference configuration
    python -m benchmarks.memory_step --quick    # a tiny configuration, seconds
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from memorizing_transformers import KNNMemory, MemorizingConfig
from memorizing_transformers.devices import describe_device
from memorizing_transformers.memory.backend import Store
from memorizing_transformers.memory.exact import ExactSearch
from memorizing_transformers.memory.knn_memory import make_backend

from .common import Case, interleaved, parse_arguments, spread, write_results
from .search import CACHE_BLOCKS
from .train_step import IVF, QUICK, REFERENCE, our_case, search_flops, search_products, size_label, variants

# The exact search's product alone, in cache-sized blocks with one block of keys reused (the cut and the
# kernel train_step measures its FLOP floor with), and the same with each block's scores then read once by
# PyTorch's amax over groups of 32, as block_topk's first cut reads them: what one such pass costs.
SEARCH_PRODUCT = {
    "its product alone (cache-sized blocks)": False,
    "its product and one pass over its scores": True,
}
# The exact search with PyTorch's ops alone, as where the CPU kernel cannot be built (timed on a CPU).
TORCH_OPS = "the same search with PyTorch ops alone"


class KnownSlots(ExactSearch):
    """A backend that returns slots found earlier: the memory's search then costs its gather alone.
    Like the exact search it keeps no index, so its notifications are the exact search's no-ops."""

    def __init__(self, scores: torch.Tensor, slots: torch.Tensor) -> None:
        self.scores, self.slots = scores, slots

    def search(self, store: Store, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scores, self.slots


def part_cases(config: MemorizingConfig, backend: str, batch: int, device: torch.device, label: str) -> list[Case]:
    """The search, gather and write of one memory layer, full, at the step's shapes."""
    generator = torch.Generator(device=device).manual_seed(0)
    unit = lambda n: F.normalize(  # noqa: E731
        torch.randn(batch, config.n_heads, n, config.head_dim, generator=generator, device=device), dim=-1
    )
    memory = KNNMemory(
        batch,
        config.n_heads,
        config.head_dim,
        config.memory_size,
        device=device,
        backend=make_backend(backend, config.ivf_list_size, config.ivf_nprobe),
    )
    memory.add(unit(config.memory_size), unit(config.memory_size))
    queries, segment = unit(config.segment_length), unit(config.segment_length)
    gathering = copy.copy(memory)
    gathering.backend = KnownSlots(*memory.backend.search(memory.store, queries, config.knn_k))
    tokens = batch * config.segment_length
    cases = [
        Case("ours", f"{label}: search", lambda: memory.backend.search(memory.store, queries, config.knn_k), tokens),
        Case("ours", f"{label}: gather", lambda: gathering.search(queries, config.knn_k), tokens),
        Case("ours", f"{label}: write", lambda: memory.add(segment, segment), tokens),
    ]
    # Exact: the same search without the kernel; its product alone, then with one PyTorch pass over its scores.
    if backend == "exact":
        if device.type == "cpu":
            torch_ops = ExactSearch(kernel=False)
            run = lambda: torch_ops.search(memory.store, queries, config.knn_k)  # noqa: E731
            cases.append(Case("ours", f"{label}: {TORCH_OPS}", run, tokens))
        for part, first_cut in SEARCH_PRODUCT.items():
            run = search_products(config, batch, config.memory_size, device, CACHE_BLOCKS, first_cut)
            cases.append(Case("ours", f"{label}: {part}", run, tokens))
    return cases


def breakdown(cases: list[Case], times: list[list[float]], label: str) -> list[dict]:
    """Rows for one backend: the steps, the memory's cost, its parts, and the rest (per round)."""
    by = {case.variant: t for case, t in zip(cases, times)}
    xl, step = by["XL only"], by[f"{label} + XL"]
    cost = [s - x for s, x in zip(step, xl)]
    parts = {name: by[f"{label}: {name}"] for name in ("search", "gather", "write")}
    rest = [c - sum(p[r] for p in parts.values()) for r, c in enumerate(cost)]
    named = [("step, XL only", xl), (f"step, {label} + XL", step), ("the memory's cost (the difference)", cost)]
    for name, t in parts.items():
        named.append((f"  {name}", t))
        if name == "search":  # without the kernel, its product alone and with one pass, where timed: not in the step
            parts_timed = (TORCH_OPS, *SEARCH_PRODUCT)
            named += [(f"    {part}", by[f"{label}: {part}"]) for part in parts_timed if f"{label}: {part}" in by]
    named.append(("  the rest: scoring, combination, backward (by subtraction)", rest))
    rows = []
    for name, t in named:
        seconds, share = spread(t), spread([a / c for a, c in zip(t, cost)])
        rows.append(
            {
                "part": name,
                "seconds": seconds["median"],
                "seconds_min": seconds["min"],
                "seconds_max": seconds["max"],
                "share_of_memory_cost": share["median"],
                "round_seconds": t,
            }
        )
    return rows


def host_rows(cases: list[Case], times: list[list[float]], hosted: list[str]) -> list[dict]:
    """The steps whose memories live in host memory, against XL only, per round."""
    by = {case.variant: t for case, t in zip(cases, times)}
    rows = []
    for variant in hosted:
        seconds, ratio = spread(by[variant]), spread([s / x for s, x in zip(by[variant], by["XL only"])])
        rows.append(
            {
                "variant": variant,
                "seconds": seconds["median"],
                "seconds_min": seconds["min"],
                "seconds_max": seconds["max"],
                "over_xl": ratio["median"],
                "round_seconds": by[variant],
            }
        )
    return rows


def table(rows: list[dict], label: str) -> str:
    lines = [f"| {label} | ms / step, median | min-max | share of the memory's cost |", "|---|---:|---:|---:|"]
    for r in rows:
        share = f"{100 * r['share_of_memory_cost']:.0f}%" if not r["part"].startswith("step") else ""
        lines.append(
            f"| {r['part']} | {1e3 * r['seconds']:.1f} | {1e3 * r['seconds_min']:.1f}-"
            f"{1e3 * r['seconds_max']:.1f} | {share} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args, device = parse_arguments(__doc__, argv)
    base, large, batch, rounds, calls, warmup = (
        (QUICK, 2048, 2, 3, 1, 1) if args.quick else (REFERENCE, 65536, 4, 6, 3, 2)
    )
    configs = variants(base, large)
    size = size_label(large)
    labels = {f"memory {size} IVF": IVF, f"memory {size}": "exact"}
    cases = [our_case("XL only", configs["XL only"], batch, device)]
    for label, backend in labels.items():
        cases.append(our_case(f"{label} + XL", configs[f"{label} + XL"], batch, device))
        cases += part_cases(configs[f"{label} + XL"], backend, batch, device, label)
    hosted = [f"{label} + XL, memories in host memory" for label in labels] if device.type == "cuda" else []
    for name, label in zip(hosted, labels):
        cases.append(our_case(name, configs[f"{label} + XL"], batch, device, memory_device="cpu"))
    times = interleaved(cases, rounds, calls, warmup, device)
    results = {
        "command": "python -m benchmarks.memory_step" + (" --quick" if args.quick else ""),
        "device": describe_device(device),
        "batch_size": batch,
        "rounds": rounds,
        "steps_per_round": calls,
        "warmup_steps": warmup,
        "config": base.to_dict(),
        "memory_size": large,
        "search_gflop": search_flops(base, batch, large) / 1e9,  # an exact search's product over every slot
        "backends": {label: breakdown(cases, times, label) for label in labels},
        "host_memory": host_rows(cases, times, hosted),
    }
    text = "\n\n".join(table(rows, label) for label, rows in results["backends"].items())
    if hosted:
        text += "\n\n| step | ms / step, median | min-max | over XL only |\n|---|---:|---:|---:|\n" + "\n".join(
            f"| {r['variant']} | {1e3 * r['seconds']:.1f} | {1e3 * r['seconds_min']:.1f}-{1e3 * r['seconds_max']:.1f} "
            f"| {r['over_xl']:.2f}x |"
            for r in results["host_memory"]
        )
    print(text)
    write_results("memory_step-quick" if args.quick else "memory_step", results, text, Path(args.out))


if __name__ == "__main__":
    main()
