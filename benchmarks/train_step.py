"""Training-step time with and without memory, as ratios to the XL-only model of the same rounds.

Reference configuration (the one the popular PyTorch implementation was measured at):
vocab 8,192, d_model 256, 6 layers, 4 heads x 64, kNN in the 4th layer, k 32, batch 4 x
256-token segments, one AdamW step per segment; then the `small` preset (the same with
the GPT-2 vocabulary of 50,257); then the `documents` configuration, the experiments' grid
model (experiments/grid.py) at 16 rows of 128 tokens, whose rows' memories hold evenly spaced
shares of their capacity, as a stream of documents leaves them (each row emptied at its
document's end). Elsewhere our memories are filled to capacity before timing, so every
search covers the whole memory (steady state). Rows marked IVF use the approximate
`ivf` backend; the others search exactly, on a CPU with the CPU kernel (memory/cpu_kernel.py),
and the rows marked "PyTorch ops" search with PyTorch's ops alone, as where the kernel cannot be
built (what the kernel saves is measured here, in the step itself). When memorizing-transformers-pytorch
0.4.1 is installed (see benchmarks/popular.py), its steps are timed in the same rounds.

Every variant, ours and theirs, is built once and warmed up alike; then each round times a
few steps of every variant in turn, the order rotated each round (see common.interleaved).
A row gives the median over rounds with the min-max beside it; a ratio is taken per round
(variant and XL only timed minutes apart at most) and summarised the same way. Their
memory is wiped whole when full, so their memory rows refill it to evenly spaced shares of
its capacity round by round: over the rounds they cover a whole fill-and-wipe cycle.
The exact searches' products alone are timed in the same rounds too, for the floor each puts
under its memory row (benchmarks.targets), and once more apart after the rounds, as the
exact 64K goal was set.

    python -m benchmarks.train_step            # the three configurations
    python -m benchmarks.train_step --rounds 20   # more rounds: narrower intervals
    python -m benchmarks.train_step --quick    # tiny ones, seconds
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from memorizing_transformers import MemorizingConfig, MemorizingTransformer
from memorizing_transformers.devices import describe_device, release_freed_host_memory
from memorizing_transformers.memory import exact
from memorizing_transformers.memory.backend import SearchBackend
from memorizing_transformers.memory.exact import ExactSearch
from memorizing_transformers.training.trainer import segment_loss

from . import popular
from .common import Case, interleaved, median_seconds, parse_arguments, spread, write_results
from .search import CACHE_BLOCKS

REFERENCE = MemorizingConfig(
    vocab_size=8192,
    d_model=256,
    n_layers=6,
    n_heads=4,
    head_dim=64,
    d_ff=1024,
    segment_length=256,
    xl_length=256,
    knn_layers=(3,),
    memory_size=8192,
    knn_k=32,
)
QUICK = dataclasses.replace(
    REFERENCE,
    vocab_size=512,
    d_model=64,
    n_layers=2,
    n_heads=2,
    head_dim=32,
    d_ff=128,
    segment_length=32,
    xl_length=32,
    knn_layers=(1,),
    memory_size=512,
    knn_k=8,
)


# The experiments' grid model, as layer1-pycode-2048's memory rows trained it (16 rows of 128 tokens a
# step, memory in layer 1), read from its committed settings; its memories at the fills a stream of
# documents leaves them (see our_case): the shape the science runs train in.
GRID_RUN = Path(__file__).resolve().parents[1] / "experiments/results/grids/layer1-pycode-2048/L-mem8k-xl-gate0-s0.json"


def grid_model() -> tuple[MemorizingConfig, int]:
    """The grid run's model and its rows a step."""
    settings = json.loads(GRID_RUN.read_text())["settings"]
    config = MemorizingConfig.from_dict({**settings["model"], "vocab_size": settings["vocab_size"]})
    return config, settings["batch_size"]


def size_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"


ONE_KV_HEAD = ", 1 kv head"  # the label of our rows shaped as theirs
IVF = "ivf"  # the backend of the rows marked IVF


def variants(base: MemorizingConfig, large_memory: int) -> dict[str, MemorizingConfig]:
    """Our rows; and some again with one key/value head shared by all heads (multi-query attention,
    MemorizingConfig.n_kv_heads=1), which is how the popular implementation's attention and memory are
    built: the same model as theirs, for a like-for-like comparison."""
    small, large = size_label(base.memory_size), size_label(large_memory)
    ivf = dict(memory_size=large_memory, memory_backend=IVF)
    rows = {
        "vanilla": dataclasses.replace(base, xl_length=0, knn_layers=()),
        "XL only": dataclasses.replace(base, knn_layers=()),
        f"memory {small}": dataclasses.replace(base, xl_length=0),
        f"memory {large}": dataclasses.replace(base, xl_length=0, memory_size=large_memory),
        f"memory {large} + XL": dataclasses.replace(base, memory_size=large_memory),
        f"memory {large} IVF": dataclasses.replace(base, xl_length=0, **ivf),
        f"memory {large} IVF + XL": dataclasses.replace(base, **ivf),
    }
    shaped = ("vanilla", "XL only", f"memory {large} + XL", f"memory {large} IVF + XL")
    return rows | {f"{name}{ONE_KV_HEAD}": dataclasses.replace(rows[name], n_kv_heads=1) for name in shaped}


def document_variants(base: MemorizingConfig, large_memory: int) -> dict[str, MemorizingConfig]:
    """The rows of the documents configuration: XL alone and the grids' memory rows."""
    small, large = size_label(base.memory_size), size_label(large_memory)
    return {
        "XL only": dataclasses.replace(base, knn_layers=()),
        f"memory {small} + XL": base,
        f"memory {large} + XL": dataclasses.replace(base, memory_size=large_memory),
        f"memory {large} IVF + XL": dataclasses.replace(base, memory_size=large_memory, memory_backend=IVF),
    }


def staggered_fills(batch: int, capacity: int, device: torch.device) -> torch.Tensor:
    """The write mask (batch, capacity) that leaves row i holding its first (i + 1) / batch of the slots."""
    fill = torch.arange(1, batch + 1, device=device)[:, None] * capacity // batch  # (batch, 1)
    return torch.arange(capacity, device=device) < fill


def our_case(
    variant: str,
    config: MemorizingConfig,
    batch: int,
    device: torch.device,
    memory_device: str | None = None,
    staggered: bool = False,
    search: SearchBackend | None = None,
    compile_backend: str | None = None,
) -> Case:
    """One AdamW step of our model on one segment (on `memory_device` when given), its memories full;
    `staggered`: row i holds (i + 1) / batch of the capacity, as rows reset at their documents' ends
    are left (an IVF row holding fewer keys than its lists need is searched exactly); `search`: the
    memories' search backend instead of the configuration's; `compile_backend`: the forward pass
    through torch.compile with that backend (see benchmarks.compile)."""
    torch.manual_seed(0)
    model = MemorizingTransformer(config).to(device)
    forward = model if compile_backend is None else torch.compile(model, backend=compile_backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = model.new_state(batch, memory_device=memory_device)
    shape = (batch, config.kv_heads, config.memory_size, config.head_dim)
    mask = staggered_fills(batch, config.memory_size, device) if staggered else None
    for memory in state.memories.values():  # steady state: a full memory (each row as full as it gets)
        memory.backend = search or memory.backend
        keys = F.normalize(torch.randn(shape, device=device), dim=-1)
        memory.add(keys, torch.randn(shape, device=device), mask=mask)
    ids = torch.randint(0, config.vocab_size, (batch, config.segment_length), device=device)

    def step() -> None:
        nonlocal state
        out = forward(ids, state=state)
        state = out.state
        loss = segment_loss(out.logits, ids)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return Case("ours", variant, step, batch * config.segment_length)


def popular_cases(base: MemorizingConfig, large: int, batch: int, device: torch.device, resources) -> list[Case]:
    """The popular implementation's steps at `base`, labelled like ours."""
    shape = dict(
        vocab_size=base.vocab_size,
        d_model=base.d_model,
        n_layers=base.n_layers,
        n_heads=base.n_heads,
        head_dim=base.head_dim,
        knn_layer=base.memory_layer_indices[0],
        k=base.knn_k,
        segment_length=base.segment_length,
        batch=batch,
        xl_length=base.xl_length,
        device=device,
    )
    labelled = [("vanilla", "vanilla", base.memory_size), ("XL only", "XL only", base.memory_size)]
    for size in (base.memory_size, large):
        labelled += [
            (f"memory {size_label(size)}", "memory", size),
            (f"memory {size_label(size)} + XL", "memory + XL", size),
        ]
    return [
        popular.case(label, variant, memory_size=size, resources=resources, **shape)
        for label, variant, size in labelled
    ]


def rows_of(cases: list[Case], times: list[list[float]], owner: str) -> list[dict]:
    """One row per case of `owner`: seconds per step and the ratio to its XL only, per round summarised."""
    xl = next(t for case, t in zip(cases, times) if case.owner == owner and case.variant == "XL only")
    rows = []
    for case, t in zip(cases, times):
        if case.owner != owner:
            continue
        seconds, ratio = spread(t), spread([a / b for a, b in zip(t, xl)])
        row = {
            "variant": case.variant,
            "seconds": seconds["median"],
            "seconds_min": seconds["min"],
            "seconds_max": seconds["max"],
            "tokens_per_s": case.tokens / seconds["median"],
            "ratio_to_xl": ratio["median"],
            "ratio_to_xl_min": ratio["min"],
            "ratio_to_xl_max": ratio["max"],
            "ratio_to_xl_low": ratio["low"],  # the median's 95% confidence interval
            "ratio_to_xl_high": ratio["high"],
            "round_seconds": t,
        }
        if case.set_fill is not None:  # evenly spaced fills: the mean over rounds is the cycle's mean
            row["cycle_mean_seconds"] = statistics.fmean(t)
        rows.append(row)
    return rows


def speedups(cases: list[Case], times: list[list[float]]) -> dict[str, dict[str, float]]:
    """Our tokens/s over theirs, per round, for each of our rows against theirs of the same label
    (our IVF rows against their memory of the same size, with XL or not; our rows with one key/value
    head against theirs, which have one too)."""
    by = {(case.owner, case.variant): t for case, t in zip(cases, times)}
    result = {}
    for (owner, variant), ours in by.items():
        if owner != "ours":
            continue
        theirs = by.get(("popular", variant.replace(" IVF", "").removesuffix(ONE_KV_HEAD)))
        if theirs is not None:
            result[variant] = spread([b / a for a, b in zip(ours, theirs)])
    return result


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | s / step, median | min-max | tokens / s | ratio to XL only, median | the median's 95% interval "
        "| min-max |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['seconds']:.3f} | {r['seconds_min']:.3f}-{r['seconds_max']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {r['ratio_to_xl']:.2f}x | "
            f"{r['ratio_to_xl_low']:.2f}-{r['ratio_to_xl_high']:.2f}x | "
            f"{r['ratio_to_xl_min']:.2f}-{r['ratio_to_xl_max']:.2f}x |"
        )
    return "\n".join(lines)


def search_products(
    config: MemorizingConfig, batch: int, slots: int, device: torch.device, elements: int | None, first_cut: bool
) -> Callable[[], None]:
    """The products an exact search over `slots` keys runs, in the blocks ExactSearch cuts with
    `elements` (None: its own rule), each written into scores allocated once. With `first_cut`, each
    block's scores are then read once by PyTorch's amax over groups of 32, as block_topk's first cut
    reads them (measured in benchmarks.memory_step: such a pass is no lower bound on the search's
    selection, it costs more than the whole of it)."""
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(batch, config.n_heads, config.segment_length, config.head_dim, generator=generator)
    pairs, width = exact.score_blocks(batch * config.n_heads, config.segment_length, slots, config.knn_k, elements)
    q = queries.flatten(0, 1)[:pairs].to(device)  # (pairs, queries, head_dim)
    block = torch.randn(pairs, config.head_dim, min(width, slots), generator=generator).to(device)
    scores = torch.empty(pairs, config.segment_length, block.shape[-1], device=device)
    blocks = -(-batch * config.n_heads // pairs) * -(-slots // block.shape[-1])
    groups = scores.view(pairs, config.segment_length, -1, 32) if first_cut else None

    def run() -> None:
        for _ in range(blocks):
            torch.matmul(q, block, out=scores)
            if groups is not None:
                groups.amax(dim=-1)

    return run


def search_flops(config: MemorizingConfig, batch: int, slots: int) -> float:
    """The FLOPs of one step's exact search over `slots` keys: each query of each (row, head) against every key."""
    return 2.0 * batch * config.n_heads * config.segment_length * config.head_dim * slots


def floor_cases(
    config: MemorizingConfig, batch: int, sizes: tuple[int, ...], device: torch.device
) -> dict[int, list[Case]]:
    """The products an exact search over each of `sizes` keys runs, as cases (owner "floor"), in two cuts: the
    blocks ExactSearch cuts it into and cache-sized blocks of CACHE_BLOCKS scores. Large blocks write their
    scores out to memory and read slower, a cost of the search's design that a floor on its FLOPs must not
    include: search_floors and search_matmul_gflops take the faster cut."""
    cuts = {"its blocks": None, "blocks of 2^21": CACHE_BLOCKS}
    return {
        n: [
            Case(
                "floor",
                f"product {size_label(n)}, {cut}",
                search_products(config, batch, n, device, elements, False),
                0,
            )
            for cut, elements in cuts.items()
        ]
        for n in sizes
    }


def search_matmul_gflops(
    config: MemorizingConfig, batch: int, slots: int, products: list[Case], device: torch.device
) -> float:
    """GFLOP/s of the products (floor_cases') an exact search over `slots` keys runs, timed apart after the
    rounds, in a loop of their own: the speed its FLOP floor in benchmarks.targets, and so the goal, is
    computed at (the faster cut). search_floors reads the same products timed in the steps' rounds."""
    return max(search_flops(config, batch, slots) / median_seconds(c.step, 3, device=device) / 1e9 for c in products)


def search_floors(
    cases: list[Case], times: list[list[float]], config: MemorizingConfig, batch: int, products: dict[int, list[Case]]
) -> dict[str, dict]:
    """For each exact memory size that `products` (floor_cases', timed among `cases`) covers: its search's product
    alone per round (the faster cut) and its speed; the floor it puts under the memory row (no XL cache, so the
    vanilla step plus the product), as a ratio to XL only like the rows; and the memory row's step over that
    floor. Each per round: products and steps timed in the same rounds, so a slow spell of the machine falls on
    both."""
    if not products:
        return {}
    by = {(case.owner, case.variant): t for case, t in zip(cases, times)}
    xl, vanilla = by["ours", "XL only"], by["ours", "vanilla"]
    floors = {}
    for size, cuts in products.items():
        product = [min(cut) for cut in zip(*(by[c.owner, c.variant] for c in cuts))]  # per round
        step = by["ours", f"memory {size_label(size)}"]
        flops = search_flops(config, batch, size)
        floors[str(size)] = {
            "gflop": flops / 1e9,
            "product_seconds": spread(product),
            "product_gflops": flops / statistics.median(product) / 1e9,
            "floor": spread([(v + p) / x for v, p, x in zip(vanilla, product, xl)]),
            "step_over_floor": spread([s / (v + p) for s, v, p in zip(step, vanilla, product)]),
        }
    return floors


def floor_text(floors: dict[str, dict]) -> str:
    """train_step.md's line on the exact searches' floors."""
    parts = []
    for size, f in floors.items():
        over = f["step_over_floor"]
        parts.append(
            f"memory {size_label(int(size))}: {f['gflop']:.1f} GFLOP in {f['product_seconds']['median'] * 1e3:.0f} ms "
            f"({f['product_gflops']:.0f} GFLOP/s), a floor of {f['floor']['median']:.2f}x XL only; the step "
            f"{over['median']:.2f}x its floor ({over['low']:.2f}-{over['high']:.2f}x; "
            f"{over['min']:.2f}-{over['max']:.2f}x)"
        )
    return (
        "The exact search's product alone, timed in the same rounds (median), and the floor it puts under the "
        "memory row (the vanilla step plus it, over XL only; the row's step over that floor per round: median, its "
        "95% interval, min-max): " + "; ".join(parts) + "."
    )


def main(argv: list[str] | None = None) -> None:
    args, device = parse_arguments(__doc__, argv, extra=[("--rounds", int, 12)])
    # name: (configuration, rows a step, memories staggered as documents leave them)
    if args.quick:
        configs = {"quick": (QUICK, 2, False), "quick documents": (QUICK, 8, True)}
        large, rounds, calls, warmup = 2048, 3, 1, 1
    else:
        configs = {
            "reference": (REFERENCE, 4, False),
            "small": (MemorizingConfig.preset("small"), 4, False),
            "documents": (*grid_model(), True),
        }
        # From 9 rounds on, the median's 95% interval is narrower than the rounds' min-max; more
        # rounds narrow it further, for a verdict where it straddles a target.
        large, calls, warmup, rounds = 65536, 3, 2, args.rounds
    results = {
        "command": "python -m benchmarks.train_step"
        + (" --quick" if args.quick else "")
        + (f" --rounds {args.rounds}" if args.rounds != 12 and not args.quick else ""),
        "device": describe_device(device),
        "batch_size": next(iter(configs.values()))[1],  # the first configuration's (each has its own below)
        "rounds": rounds,
        "steps_per_round": calls,
        "warmup_steps": warmup,
        "configs": {},
    }
    sections = []
    for name, (base, batch, staggered) in configs.items():
        with contextlib.ExitStack() as resources:
            rows = (document_variants if staggered else variants)(base, large)
            cases = [our_case(label, config, batch, device, staggered=staggered) for label, config in rows.items()]
            # The exact search with PyTorch's ops alone against the CPU kernel, in the step.
            exact_row = next(label for label in rows if label.startswith(f"memory {size_label(base.memory_size)}"))
            torch_ops = dict(staggered=staggered, search=ExactSearch(kernel=False))
            cases.append(our_case(f"{exact_row}, PyTorch ops", rows[exact_row], batch, device, **torch_ops))
            sizes = (base.memory_size, large)
            in_rounds = {} if staggered else floor_cases(base, batch, sizes, device)  # the exact rows' floors
            cases += [case for cuts in in_rounds.values() for case in cuts]
            if popular.available() and not staggered:
                cases += popular_cases(base, large, batch, device, resources)
            times = interleaved(cases, rounds, calls, warmup, device)
        rows = rows_of(cases, times, "ours")
        floors = search_floors(cases, times, base, batch, in_rounds)
        products = in_rounds or floor_cases(base, batch, sizes, device)  # the same, timed apart
        matmul = {str(n): search_matmul_gflops(base, batch, n, cuts, device) for n, cuts in products.items()}
        results["configs"][name] = {
            "config": base.to_dict(),
            "batch_size": batch,
            "rows": rows,
            "search_matmul_gflops": matmul,  # timed apart
            "search_floors": floors,  # timed in the rounds
        }
        sections.append(
            f"### {name} configuration (vocab {base.vocab_size:,}), batch {batch} x {base.segment_length}"
            + (
                f", row i's memory holding (i + 1) / {batch} of its capacity, as a stream of documents leaves them"
                * staggered
            )
            + f"\n\n{table(rows)}"
            + (f"\n\n{floor_text(floors)}" if floors else "")
        )
        if any(case.owner == "popular" for case in cases):
            theirs, faster = rows_of(cases, times, "popular"), speedups(cases, times)
            results["configs"][name] |= {"popular_rows": theirs, "tokens_per_s_vs_popular": faster}
            sections.append(
                f"### memorizing-transformers-pytorch 0.4.1, {name} configuration, same rounds\n\n{table(theirs)}\n\n"
                "Tokens/s, ours over theirs, per round (median; its 95% interval; min-max): "
                + "; ".join(
                    f"{variant} {s['median']:.2f}x ({s['low']:.2f}-{s['high']:.2f}x; {s['min']:.2f}-{s['max']:.2f}x)"
                    for variant, s in faster.items()
                )
                + ". Their attention and memory: one key/value head shared by all heads (ours too in the rows "
                f"marked '{ONE_KV_HEAD[2:]}'), HNSW, the memory wiped whole when full; ours: FIFO."
            )
        # this configuration's models, memories and score buffers, given back to the system before the next's
        del cases, in_rounds, products
        release_freed_host_memory()
    text = "\n\n".join(sections)
    print(text)
    write_results("train_step-quick" if args.quick else "train_step", results, text, Path(args.out))


if __name__ == "__main__":
    main()
