"""The question tables of docs/RESULTS.md, from the grids' committed JSON.

    python experiments/tables.py            # rewrite the generated blocks of docs/RESULTS.md
    python experiments/tables.py --check    # exit 1 if they differ from what the JSON gives

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` in docs/RESULTS.md;
everything between the markers is rewritten, everything outside them is left alone. Rows
read from experiments/results/grids/GRID/RUN.json (experiments/grid.py), from the
SmolLM2 runs' JSON (experiments/pretrained_memory.py) and from what the memory's search finds
(experiments/retrieval_hits.py); a row whose run has not finished
says so. Two seeds of a row give their mean and, in brackets, their range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memorizing_transformers.config import MemorizingConfig
from memorizing_transformers.evaluation.report import forward_flops_per_token

HERE = Path(__file__).resolve().parent
GRIDS = HERE / "results" / "grids"
RESULTS_PAGE = HERE.parent / "docs" / "RESULTS.md"


# Grids whose corpus has changed since their pre-training ran (pycode follows the installed packages'
# versions; experiments/grid.py refuses to fine-tune from such weights unless a grid reads the corpus
# through their tokenizer): their rows without a result will not get one here.
MOVED = {"table4-pycode", "budgets-pycode", "batch16-pycode", "questions-pycode", "short-pycode", "table4-pycode-2048"}


def missing(grid: str) -> str:
    """What a table says of a row with no result."""
    return "not run: the corpus has moved since its pre-training" if grid in MOVED else "not finished yet"


def load(grid: str, run: str) -> dict[str, Any] | None:
    path = GRIDS / grid / f"{run}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main_result(row: dict[str, Any]) -> dict[str, Any]:
    return row["test"].get("with memory") or row["test"]["no memory"]


def seeds(grid: str, run: str) -> list[dict[str, Any]]:
    """The finished seeds of a row: RUN-s0, RUN-s1, ... (or RUN itself)."""
    found = [row for s in range(4) if (row := load(grid, f"{run}-s{s}")) is not None]
    return found or ([row] if (row := load(grid, run)) is not None else [])


def spread(values: list[float], digits: int = 2) -> str:
    """The mean, with the range in brackets when there are several values."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def cost_cells(rows: list[dict[str, Any]]) -> list[str]:
    """Training tokens/s, test ms/token, forward GFLOP/token and peak MB (train / test) of a row."""
    row = rows[0]
    label = "with memory" if "with memory" in row["test"] else "no memory"
    per_token = [
        1000 * r["eval_seconds_by_variant"][label] / main_result(r)["tokens"]
        for r in rows
        if "eval_seconds_by_variant" in r
    ]  # (not recorded by the earliest runs)
    flops = row.get("forward_flops_per_token") or forward_flops_per_token(
        MemorizingConfig.from_dict({**row["settings"]["model"], "vocab_size": row["settings"]["vocab_size"]})
    )
    peak = row.get("peak_memory") or {}
    train = f"{peak['train_bytes'] / 2**20:,.0f}" if "train_bytes" in peak else "-"  # 0 tokens: no training
    return [
        f"{statistics.fmean(r['train_tokens'] / r['train_seconds'] for r in rows):,.0f}"
        if row["train_tokens"]
        else "-",
        f"{statistics.fmean(per_token):.2f}" if per_token else "-",
        f"{flops['total'] / 1e9:.4f}",
        f"{train} / {peak['test_bytes'] / 2**20:,.0f}" if "test_bytes" in peak else "-",
    ]


def perplexity(rows: list[dict[str, Any]]) -> float:
    return statistics.fmean(main_result(r)["perplexity"] for r in rows)


def change(value: float, reference: float | None) -> str:
    return "-" if reference is None else f"{100 * (value / reference - 1):+.1f}%"


def grid_table(runs: list[tuple[str, str]], reference: tuple[str, str] | None = None, header: str = "") -> str:
    """One line per (grid, run): test perplexity (seeds), memory off, the change against
    `reference` (a column headed `header`, when given), costs."""
    reference_ppl = perplexity(base) if reference and (base := seeds(*reference)) else None
    compared = [f" {header} |"] if reference else []
    lines = [
        "| run | model | seeds | test perplexity | memory off (same weights) |"
        + "".join(compared)
        + " train tokens/s | ms/token (test) | forward GFLOP/token | peak MB train / test |",
        "|---|---|---:|---:|---:|" + "---:|" * (len(compared) + 4),
    ]
    mixed = len({grid for grid, _ in runs}) > 1  # then rows are named GRID/RUN
    for grid, run in runs:
        rows, name = seeds(grid, run), f"{grid}/{run}" if mixed else run
        if not rows:
            lines.append(f"| {name} | {missing(grid)} |" + " |" * (len(compared) + 7))
            continue
        off = [r["test"]["memory off"]["perplexity"] for r in rows if "memory off" in r["test"]]
        cells = [name, rows[0]["label"], str(len(rows)), spread([main_result(r)["perplexity"] for r in rows])]
        cells.append(spread(off) if off else "-")
        if reference:
            cells.append("reference" if (grid, run) == reference else change(perplexity(rows), reference_ppl))
        lines.append("| " + " | ".join(cells + cost_cells(rows)) + " |")
    return "\n".join(lines)


Point = tuple[int, tuple[str, str], tuple[str, str]]  # (fine-tuning tokens, XL alone, memory 8K + XL) as (grid, run)


def budget_points() -> list[Point]:
    """The fine-tuning budgets measured at 4 segments a step: the budgets grid's fine-tunes, then
    table4's 2M-token rows."""
    B = "budgets-pycode"
    points: list[Point] = [
        (t, (B, f"L-xl-{t // 1000}k"), (B, f"L-mem8k-xl-{t // 1000}k")) for t in (250_000, 500_000, 1_000_000)
    ]
    return points + [(2_000_000, ("table4-pycode", "L-xl"), ("table4-pycode", "L-mem8k-xl"))]


def layer_budget_points(corpus: str, layer: int, suffix: str = "", gate: str = "") -> list[Point]:
    """The budgets of layerN-CORPUS (experiments/grid.py `in_layer`), its memory runs named
    L-mem8k-xl-{gate}{TOKENS}k, and at 2M tokens layers-CORPUS's rows: its seed-0 XL and layer-N rows for
    the gate nearly shut, both seeds of XL and of layerN-CORPUS's L-mem8k-xl-gate0 for gate="gate0-"."""
    grid, layers = f"layer{layer}-{corpus}{suffix}", f"layers-{corpus}{suffix}"
    at = lambda t: (t, (grid, f"L-xl-{t // 1000}k"), (grid, f"L-mem8k-xl-{gate}{t // 1000}k"))  # noqa: E731
    middle = (
        ((layers, "L-xl"), (grid, "L-mem8k-xl-gate0"))
        if gate
        else ((layers, "L-xl-s0"), (layers, f"L-mem8k-xl-layer{layer}-s0"))
    )
    return [at(500_000), at(1_000_000), (2_000_000, *middle), at(4_000_000), at(8_000_000)]


def budget_table(points: list[Point]) -> str:
    """The memory's gain against fine-tuning tokens, with the gates it ended with; `points` as
    budget_points gives them."""
    lines = [
        "| fine-tuning tokens | XL alone | memory 8K + XL | its memory off | memory vs XL alone | "
        "memory vs memory off | gates at the end (mean of 4 heads) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tokens, xl_row, memory_row in points:
        xl, memory = seeds(*xl_row), seeds(*memory_row)
        if not xl or not memory:
            lines.append(f"| {tokens:,} | {missing(memory_row[0])} | | | | | |")
            continue
        on = perplexity(memory)
        off = statistics.fmean(r["test"]["memory off"]["perplexity"] for r in memory)
        gates = [statistics.fmean(g for gs in r["memory_gates"].values() for g in gs) for r in memory]
        lines.append(
            f"| {tokens:,} | {spread([main_result(r)['perplexity'] for r in xl])} | "
            f"{spread([main_result(r)['perplexity'] for r in memory])} | {off:.2f} | {change(on, perplexity(xl))} | "
            f"{change(on, off)} | {spread(gates, 4)} |"
        )
    return "\n".join(lines)


def fine_tune_into_memory_table(vanilla: tuple[str, str], scratch: tuple[str, str], points: list[Point]) -> str:
    """The paper's fine-tuning into memory: the share of the gap between the vanilla pre-training
    (`vanilla`, a (grid, run)) and a memory model trained from scratch as long (`scratch`) that
    fine-tunes with a memory (the memory runs of `points`, as budget_points gives them) close."""
    start_row, goal_row = load(*vanilla), load(*scratch)
    if start_row is None or goal_row is None:
        absent = [f"{g}/{r}" for (g, r), row in ((vanilla, start_row), (scratch, goal_row)) if row is None]
        return f"{missing(scratch[0]).capitalize()}: {' and '.join(absent)}."
    start, goal = main_result(start_row)["perplexity"], main_result(goal_row)["perplexity"]
    lines = [
        f"Vanilla pre-training: {start:.2f}; memory 8K + XL from scratch ({goal_row['train_tokens']:,} tokens): "
        f"{goal:.2f}.",
        "",
        "| fine-tuning tokens | share of the from-scratch run's tokens | memory 8K + XL fine-tuned | "
        "share of the gap closed |",
        "|---:|---:|---:|---:|",
    ]
    for tokens, _, (grid, run) in points:
        if not (rows := seeds(grid, run)):
            lines.append(f"| {tokens:,} | {missing(grid)} | | |")
            continue
        tuned = perplexity(rows)
        lines.append(
            f"| {tokens:,} | {100 * tokens / goal_row['train_tokens']:.1f}% | {tuned:.2f} | "
            f"{100 * (start - tuned) / (start - goal):.0f}% |"
        )
    return "\n".join(lines)


def readout_table(runs: list[tuple[str, str]]) -> str:
    """How the memory heads read what they retrieve (experiments/grid.py `memory_readout`), means over heads."""
    lines = [
        "| run | model | best entry's weight | entropy of the weights (uniform: ln k) | "
        "share of the output from memory |",
        "|---|---|---:|---:|---:|",
    ]
    for grid, run in runs:
        rows = [r for r in seeds(grid, run) if r.get("memory_readout")]
        if not rows:
            lines.append(f"| {grid}/{run} | not measured yet | | | |")
            continue
        heads = [layer for r in rows for layer in r["memory_readout"].values()]
        mean = lambda key: statistics.fmean(v for layer in heads for v in layer[key])  # noqa: E731
        lines.append(
            f"| {grid}/{run} | {rows[0]['label']} | {mean('best_entry_weight'):.3f} | {mean('entropy'):.2f} "
            f"({heads[0]['uniform_entropy']:.2f}) | {mean('share_of_output'):.3f} |"
        )
    return "\n".join(lines)


def gate_history_table(runs: list[tuple[str, str]]) -> str:
    """Each memory head's gate over training (experiments/grid.py keeps them at steps spread over it):
    at the first logged step and at a quarter, half, three quarters and all of the run."""
    lines = [
        "| run | layer, head | first step | 1/4 | 1/2 | 3/4 | end |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for grid, run in runs:
        row = load(grid, run)
        if row is None or not row.get("memory_gates_by_step"):
            lines.append(f"| {grid}/{run} | {'not recorded' if row else missing(grid)} | | | | | |")
            continue
        history, last = row["memory_gates_by_step"], row["steps"]
        at = [history[0]] + [min(history, key=lambda h: abs(h["step"] - f * last)) for f in (0.25, 0.5, 0.75, 1.0)]
        for layer, gates in history[-1]["gates"].items():
            for head in range(len(gates)):
                cells = " | ".join(f"{h['gates'][layer][head]:.4f} ({h['step']})" for h in at)
                lines.append(f"| {grid}/{run} | {layer}, {head} | {cells} |")
    return "\n".join(lines)


def cross_context_table() -> str:
    """Final weights tested with another context (experiments/cross_context.py)."""
    path = HERE / "results" / "cross_context.json"
    if not path.is_file():
        return "Not run yet: `python experiments/cross_context.py`."
    lines = [
        "| run | trained with segment / XL | tested with segment / XL | memory added at test time | test perplexity |",
        "|---|---|---|---|---:|",
    ]
    for r in json.loads(path.read_text())["rows"]:
        writes = "of what leaves the XL cache" if r.get("tested_memory_writes") == "evicted" else "of each segment"
        memory = (
            f"{r['tested_memory']:,} {writes}, layers {r['tested_memory_layers']}" if r.get("tested_memory") else "-"
        )
        lines.append(
            f"| {r['grid']}/{r['run']} | {r['trained_segment']} / {r['trained_xl']} | "
            f"{r['tested_segment']} / {r['tested_xl']} | {memory} | {r['perplexity']:.2f} |"
        )
    return "\n".join(lines)


def memory_size_table(
    grid: str, run: str = "L-mem2k-xl-s0", tuned_runs: tuple[str, ...] = ("L-mem2k-xl-ft128k",)
) -> str:
    """Table 5 in kind: the 2K-memory model `run` of `grid` tested with larger memories, and after each
    fine-tune at 128K of `tuned_runs` the grid has (its search and learning rate named)."""
    row = load(grid, run)
    if row is None:
        return f"Not finished yet: {run}."
    lines = ["| memory at test time | test perplexity | memory off |", "|---|---:|---:|"]
    off = row["test"]["memory off"]["perplexity"]
    lines.append(f"| 2,048 (as trained) | {main_result(row)['perplexity']:.2f} | {off:.2f} |")
    for label, result in row["test"].items():
        if label.startswith("memory ") and label != "memory off":
            lines.append(f"| {label.split()[1]} (no fine-tune) | {result['perplexity']:.2f} | |")
    for tuned in filter(None, (load(grid, name) for name in tuned_runs)):
        settings = tuned["settings"]
        search = "faiss IVF" if settings["model"].get("memory_backend") == "faiss_ivf" else "exact"
        lr = f"{settings['lr']:.0e}".replace("e-0", "e-")  # 5e-4, not 0.0005 or 5e-04
        lines.append(
            f"| 131,072 ({search}) after {tuned['train_tokens']:,} tokens of fine-tuning at lr {lr} | "
            f"{main_result(tuned)['perplexity']:.2f} | {tuned['test']['memory off']['perplexity']:.2f} |"
        )
    return "\n".join(lines)


def token_gain_table(runs: dict[str, tuple[str, str]]) -> str:
    """What the memory helps (memorizing_transformers.evaluation.token_gain), rows named by `runs`' keys side
    by side: each group's share of the scored tokens, its mean gain and its share of the total gain, means
    over seeds."""
    found = {
        name: rows
        for name, (grid, run) in runs.items()
        if (rows := [r for r in seeds(grid, run) if r.get("token_gain")])
    }
    if not found:
        return "Not finished yet: " + ", ".join(f"{grid}/{run}" for grid, run in runs.values()) + "."
    mean = lambda rows, key: statistics.fmean(r["token_gain"][key] for r in rows)  # noqa: E731
    lines = [
        "| group | " + " | ".join(f"{name}: tokens | mean gain (nats) | share of the gain" for name in found) + " |",
        "|---|" + "---:|---:|---:|" * len(found),
        "| all scored tokens | "
        + " | ".join(f"{mean(rows, 'tokens'):,.0f} | {mean(rows, 'mean_gain'):.3f} | 100%" for rows in found.values())
        + " |",
        "| tokens gaining over 0.5 nats | "
        + " | ".join(
            f"{100 * mean(rows, 'share_of_tokens_gaining_over_0.5_nats'):.1f}% | | " for rows in found.values()
        )
        + " |",
    ]
    for grouping, title in (
        ("by_distance_to_previous_occurrence", "distance back to the same token"),
        ("by_training_frequency", "training frequency"),
        ("by_kind", "kind of token"),
    ):
        lines.append(f"| **{title}** |" + " | | |" * len(found))
        for i, group in enumerate(next(iter(found.values()))[0]["token_gain"][grouping]):
            cells = []
            for rows in found.values():
                at = [r["token_gain"][grouping][i] for r in rows]
                cells.append(
                    f"{100 * statistics.fmean(g['share_of_tokens'] for g in at):.1f}% | "
                    f"{statistics.fmean(g['mean_gain'] for g in at):.3f} | "
                    f"{100 * statistics.fmean(g['share_of_gain'] for g in at):.1f}%"
                )
            lines.append(f"| {group['group']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_table(corpus: str, suffix: str = "", moved: bool = False) -> str:
    """The memory in another layer (layers-CORPUS), against table4's XL and memory rows of the same seed,
    or against its own where the corpus has moved since table4 ran (see experiments/grid.py's `layers`)."""
    T4, layers = f"table4-{corpus}{suffix}", f"layers-{corpus}{suffix}"
    reference = (layers if moved else T4, "L-xl-s0")
    in_layer = [(layers, f"L-mem8k-xl-layer{layer}-s0") for layer in (1, 2, 3) if moved or layer != 2]
    in_layer += [(layers, f"L-mem8k-xl-layer{layer}-gate0-s0") for layer in ((2,) if moved else (1, 2))]
    rows = [reference, *([] if moved else [(T4, "L-mem8k-xl-s0")]), *in_layer]
    return grid_table(rows, reference, "vs XL alone (same seed)")


def retrieval_table(corpus: str) -> str:
    """What the memory's search finds (experiments/retrieval_hits.py), from its JSON."""
    path = HERE / "results" / f"retrieval_hits-{corpus}.json"
    if not path.is_file():
        return f"Not run yet: `python experiments/retrieval_hits.py --corpus {corpus}`."
    sys.path.insert(0, str(HERE))
    from retrieval_hits import table

    return table(json.loads(path.read_text())).rstrip("\n")


def retrieval_size_table(corpora: tuple[str, ...], sizes: tuple[int, ...], run: str) -> str:
    """What the search of `run` (its grid named layer1-CORPUS-2048) finds at each memory size, from the JSON of
    experiments/retrieval_hits.py in results/retrieval-sizes/CORPUS-SIZE/: per corpus and size, means over the
    memory layer's heads, as retrieval_table gives them."""
    lines = [
        "| corpus | memory | queries whose memory holds a continuation | continuations among the entries found "
        "(x their share of the memory) | queries finding one (chance) | best entry a continuation "
        "| readout weight: continuations | answers | entries after the same token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sys.path.insert(0, str(HERE))
    from retrieval_hits import mean_over_heads

    for corpus in corpora:
        for size in sizes:
            path = HERE / "results" / "retrieval-sizes" / f"{corpus}-{size}" / f"retrieval_hits-{corpus}.json"
            model = f"layer1-{corpus}-2048/{run}"
            cases = [c for c in json.loads(path.read_text())["cases"] if c["model"] == model] if path.is_file() else []
            if not cases:
                lines.append(f"| {corpus} | {size:,} | not run yet | | | | | | |")
                continue

            def mean(kind: str, field: str, heads: list = cases[0]["heads"]) -> float:
                return mean_over_heads([h[kind] for h in heads], field)

            found = mean("continuation", "share")
            lines.append(
                f"| {corpus} | {size:,} | {mean('continuation', 'in_memory'):.2f} | "
                f"{found:.3f} ({found / mean('continuation', 'base_rate'):.1f}x) | "
                f"{mean('continuation', 'found'):.2f} ({mean('continuation', 'chance'):.2f}) | "
                f"{mean('continuation', 'best'):.3f} | {mean('continuation', 'weight'):.3f} | "
                f"{mean('answer', 'weight'):.3f} | {mean('after the same token', 'weight'):.3f} |"
            )
    return "\n".join(lines)


def smollm2_table() -> str:
    """SmolLM2-135M, zero training: mean perplexity of the scored tokens per corpus and setting."""
    lines = [
        "| corpus | documents | window 512 | window 2,048 | window 512 + memory | full prefix | "
        "gap closed by the memory | memory beats window 2,048 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for corpus in ("pycode", "proofs", "books", "tex"):
        path = HERE / "results" / f"pretrained_memory-{corpus}.json"
        if not path.is_file():
            lines.append(f"| {corpus} | not run yet | | | | | | |")
            continue
        rows = json.loads(path.read_text())["rows"]
        mean = lambda key: statistics.fmean(r[key] for r in rows)  # noqa: E731
        closed = [r["gap_closed"] for r in rows]
        beats = sum(r["window_memory"] < r["window_wide"] for r in rows)
        lines.append(
            f"| {corpus} | {len(rows)} | {mean('window'):.3f} | {mean('window_wide'):.3f} | "
            f"{mean('window_memory'):.3f} | "
            f"{mean('full_prefix'):.3f} | {100 * min(closed):.0f}-{100 * max(closed):.0f}% | {beats} of {len(rows)} |"
        )
    return "\n".join(lines)


def smollm2_sizes_table(tag: str = "pycode-sizes-8k") -> str:
    """SmolLM2-135M, zero training: the scored tokens' mean perplexity with memories of each size, and
    the share of the gap between the window alone and the full prefix that each closes."""
    path = HERE / "results" / f"pretrained_memory-{tag}.json"
    if not path.is_file():
        return "Not run yet."
    rows = json.loads(path.read_text())["rows"]
    settings = [("window alone", "window", None)] + [
        (f"memory of {int(size):,} entries per layer", None, size) for size in rows[0]["window_memory_sizes"]
    ]
    settings += [("memory of every earlier token", "window_memory", None), ("full prefix", "full_prefix", None)]
    lines = ["| reader | mean perplexity | gap closed, per document |", "|---|---:|---:|"]
    for label, key, size in settings:
        values = [r[key] if key else r["window_memory_sizes"][size] for r in rows]
        closed = [(r["window"] - v) / (r["window"] - r["full_prefix"]) for r, v in zip(rows, values)]
        lines.append(f"| {label} | {statistics.fmean(values):.3f} | {100 * min(closed):.0f}-{100 * max(closed):.0f}% |")
    return "\n".join(lines)


TABLE4_ROWS = ["L", "4L", "L-xl", "L-mem8k", "L-mem8k-xl", "L-mem8k-xl-joint", "L-mem64k-xl"]


def table4_table(grid: str) -> str:
    """Table 4 in kind: every row of a table4 grid, against its L + XL row."""
    return grid_table([(grid, run) for run in TABLE4_ROWS], (grid, "L-xl"), "vs XL alone")


def question_tables(
    corpus: str, suffix: str = "", references: dict[str, tuple[str, str]] | None = None
) -> dict[str, Callable[[], str]]:
    """The three questions' tables on `corpus` (its questions and short grids, read against its table4
    grid's rows, or against `references`, by table4's row names, for a corpus that has moved):
    other long-range approaches, wider windows, short documents."""
    T4, Q, S = (f"{name}-{corpus}{suffix}" for name in ("table4", "questions", "short"))
    ref = {row: (T4, row) for row in TABLE4_ROWS} | (references or {})
    return {
        f"others-{corpus}{suffix}": lambda: grid_table(
            [
                ref["L-xl"],
                (Q, "window512"),
                (Q, "window512-g8"),
                (Q, "linformer64"),
                ref["L-mem8k-xl"],
                ref["L-mem8k-xl-joint"],
            ],
            ref["L-xl"],
            "vs XL alone",
        ),
        f"wider-{corpus}{suffix}": lambda: grid_table(
            [ref["L"], (Q, "2L"), ref["4L"], ref["L-mem8k"], ref["L-xl"], (Q, "2L-xl"), ref["L-mem8k-xl"]],
            ref["L"],
            "vs context L",
        ),
        f"short-{corpus}{suffix}": lambda: grid_table(
            [(S, "short-xl"), (S, "short-mem8k-xl")], (S, "short-xl"), "vs XL alone"
        ),
    }


def pycode_tables() -> dict[str, Callable[[], str]]:
    """The tables of the pycode grids at 4 segments a step."""
    T4, B = "table4-pycode", "budgets-pycode"
    return {
        "table4-pycode": lambda: table4_table(T4),
        "budgets-pycode": lambda: budget_table(budget_points()),
        "variants-pycode": lambda: grid_table(
            [
                (B, f"L-{row}500k")
                for row in (
                    "xl-",
                    "mem8k-xl-",
                    "mem8k-xl-gate0-",
                    "mem8k-xl-joint-",
                    "mem8k-xl-sharp-",
                    "mem8k-xl-sharp-gate0-",
                )
            ],
            (B, "L-xl-500k"),
            "vs XL alone",
        ),
        **question_tables("pycode"),
        "readout-pycode": lambda: readout_table(
            [
                (B, f"L-mem8k-xl-{t}")
                for t in ("250k", "500k", "1000k", "gate0-500k", "joint-500k", "sharp-500k", "sharp-gate0-500k")
            ]
            + [(T4, "L-mem8k"), (T4, "L-mem8k-xl"), (T4, "L-mem8k-xl-joint")]
            + [("batch16-pycode", run) for run in ("L-mem8k-xl", "L-mem8k-xl-sharp", "L-mem8k-xl-joint-evicted")]
        ),
    }


# At 2,048 tokens a step: table4-pycode-2048 ran before the corpus moved; every grid after it reads
# the corpus through that pre-training's tokenizer, the memory in layer 1, against these rows.
T4_2048, LAYERS_2048, LAYER1_2048 = "table4-pycode-2048", "layers-pycode-2048", "layer1-pycode-2048"
MOVED_2048 = {
    "L": ("questions-pycode-2048", "L"),
    "4L": ("questions-pycode-2048", "4L"),
    "L-xl": (LAYERS_2048, "L-xl"),
    "L-mem8k": (LAYER1_2048, "L-mem8k-gate0-s0"),
    "L-mem8k-xl": (LAYER1_2048, "L-mem8k-xl-gate0"),
    "L-mem8k-xl-joint": (LAYER1_2048, "L-mem8k-xl-joint-gate0-s0"),
}


T4 = "table4-pycode"
TABLES: dict[str, Callable[[], str]] = {
    **pycode_tables(),
    "table4-pycode-2048": lambda: table4_table(T4_2048),
    "memory-sizes-pycode-2048": lambda: memory_size_table(T4_2048),
    "readout-pycode-2048": lambda: readout_table(
        [(T4_2048, "L-mem8k"), (T4_2048, "L-mem8k-xl"), (T4_2048, "L-mem8k-xl-joint")]
        + [(LAYERS_2048, f"L-mem8k-xl-layer{n}") for n in (1, 2, 3)]
        + [(LAYER1_2048, f"L-mem8k-xl-{t}") for t in ("500k", "1000k", "4000k", "8000k", "gate0", "joint-gate0-s0")]
    ),
    **question_tables("pycode", "-2048", MOVED_2048),
    "steps-pycode": lambda: (
        grid_table(
            [
                (T4, "4L"),
                (T4, "L-xl"),
                (T4, "L-mem8k-xl"),
                ("batch16-pycode", "L"),
                ("batch16-pycode", "L-xl"),
                ("batch16-pycode", "L-mem8k-xl"),
            ],
            (T4, "4L"),
            "vs 4L",
        )
        + "\n\n"
        + cross_context_table()
    ),
    "table4-proofs": lambda: table4_table("table4-proofs"),
    **question_tables("proofs"),
    "table4-books": lambda: table4_table("table4-books"),
    "memory-sizes-books": lambda: memory_size_table("table4-books"),
    "retrieval-proofs": lambda: retrieval_table("proofs"),
    "retrieval-pycode": lambda: retrieval_table("pycode"),
    "retrieval-books": lambda: retrieval_table("books"),
    "retrieval-by-memory-size": lambda: retrieval_size_table(
        ("proofs", "pycode"), (2048, 8192, 32768), "L-mem2k-xl-gate0-s0"
    ),
    "layers-proofs": lambda: layer_table("proofs"),
    "layers-pycode-2048": lambda: layer_table("pycode", "-2048", moved=True),
    "layer1-seeds-pycode-2048": lambda: grid_table(
        [(LAYERS_2048, "L-xl"), (LAYERS_2048, "L-mem8k-xl-layer1"), (LAYER1_2048, "L-mem8k-xl-gate0")],
        (LAYERS_2048, "L-xl"),
        "vs XL alone",
    ),
    LAYER1_2048: lambda: grid_table(
        [
            (LAYERS_2048, "L-xl-s0"),
            (LAYERS_2048, "L-mem8k-xl-layer1-s0"),
            (LAYER1_2048, "L-mem8k-xl-gate0-s0"),
            (LAYER1_2048, "L-mem8k-gate0-s0"),
            (LAYER1_2048, "L-mem8k-xl-joint-gate0-s0"),
            (LAYER1_2048, "L-mem64k-xl-gate0-s0"),
        ],
        (LAYERS_2048, "L-xl-s0"),
        "vs XL alone",
    ),
    "budgets-layer1-pycode-2048": lambda: budget_table(layer_budget_points("pycode", 1, "-2048")),
    "budgets-layer1-gate0-pycode-2048": lambda: budget_table(layer_budget_points("pycode", 1, "-2048", "gate0-")),
    "gates-layer1-pycode-2048": lambda: gate_history_table(
        [(LAYER1_2048, f"L-mem8k-xl-{t}") for t in ("500k", "1000k", "4000k", "8000k")]
        + [(LAYER1_2048, f"L-mem8k-xl-gate0-{t}") for t in ("500k", "1000k", "s0", "4000k", "8000k")]
    ),
    "memory-sizes-layer1-pycode-2048": lambda: memory_size_table(
        LAYER1_2048,
        "L-mem2k-xl-gate0-s0",
        ("L-mem2k-xl-gate0-ft128k", "L-mem2k-xl-gate0-ft128k-exact-lr1e-4"),
    ),
    "fine-tune-into-memory-layer1-pycode-2048": lambda: fine_tune_into_memory_table(
        (LAYER1_2048, "pretrain-as-is"),
        (LAYER1_2048, "scratch-mem8k-xl-gate0"),
        layer_budget_points("pycode", 1, "-2048", "gate0-"),
    ),
    "fine-tune-into-memory-layer1-proofs-2048": lambda: fine_tune_into_memory_table(
        ("layer1-proofs-2048", "pretrain-as-is"),
        ("layer1-proofs-2048", "scratch-mem8k-xl-gate0"),
        [(2_000_000, ("table4-proofs-2048", "L-xl"), ("layer1-proofs-2048", "L-mem8k-xl-gate0"))],
    ),
    "memory-sizes-layer1-proofs-2048": lambda: memory_size_table(
        "layer1-proofs-2048",
        "L-mem2k-xl-gate0-s0",
        ("L-mem2k-xl-gate0-ft128k", "L-mem2k-xl-gate0-ft128k-exact-lr1e-4"),
    ),
    # proofs pre-trained as pycode was: its memory rows in layer 1 against table4-proofs-2048's XL rows
    "layer1-proofs-2048": lambda: grid_table(
        [
            ("table4-proofs-2048", "pretrain"),
            ("table4-proofs-2048", "L-xl"),
            ("layer1-proofs-2048", "L-mem8k-xl-gate0"),
            ("layer1-proofs-2048", "L-mem8k-gate0-s0"),
            ("layer1-proofs-2048", "L-mem8k-xl-joint-gate0-s0"),
            ("layer1-proofs-2048", "L-mem64k-xl-gate0-s0"),
        ],
        ("table4-proofs-2048", "L-xl"),
        "vs XL alone",
    ),
    "token-gain-layer1": lambda: token_gain_table(
        {"pycode": (LAYER1_2048, "L-mem8k-xl-gate0"), "proofs": ("layer1-proofs-2048", "L-mem8k-xl-gate0")}
    ),
    "smollm2": smollm2_table,
    "smollm2-sizes": smollm2_sizes_table,
}


def render(page: str) -> str:
    """`page` with every generated block rewritten from the JSON."""
    for name, make in TABLES.items():
        begin, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
        if begin not in page:
            continue
        before, rest = page.split(begin, 1)
        _, after = rest.split(end, 1)
        page = f"{before}{begin}\n{make()}\n{end}{after}"
    return page


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that docs/RESULTS.md is up to date")
    args = parser.parse_args(argv)
    page = RESULTS_PAGE.read_text()
    updated = render(page)
    if args.check:
        if updated != page:
            sys.exit("docs/RESULTS.md is out of date: run `python experiments/tables.py`")
        return
    RESULTS_PAGE.write_text(updated)


if __name__ == "__main__":
    main()
