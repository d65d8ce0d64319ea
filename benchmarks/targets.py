"""The speed and scale targets, each against the figure the benchmarks measured.

Reads the JSON that `benchmarks.search`, `benchmarks.train_step`, `benchmarks.memory_step`
and `benchmarks.long_stream` wrote into --out and writes targets.md beside them; it
measures nothing itself. A target measured over rounds is judged by its median, and
reads "spread too wide for a verdict" when the median's 95% confidence interval (a
distribution-free one, from the rounds' order statistics: benchmarks.common.median_interval;
the rounds' min-max for figures recorded without it) straddles the goal.

    python -m benchmarks.targets
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memorizing_transformers.atomic import write_atomically

POPULAR_REFERENCE_TOKENS_PER_S = 980  # memorizing-transformers-pytorch 0.4.1, kNN 65K, as first measured on this CPU


def interval(measured: dict[str, float]) -> tuple[float, float]:
    """The median's 95% interval; the rounds' min-max for a figure recorded without it."""
    return measured.get("low", measured["min"]), measured.get("high", measured["max"])


def verdict(measured: dict[str, float], goal: float, at_most: bool) -> str:
    """yes / no by the median, or "spread too wide for a verdict" when the median's interval straddles the goal."""
    low, high = interval(measured)
    if low <= goal <= high and low < high:
        return "spread too wide for a verdict"
    return "yes" if (measured["median"] <= goal if at_most else measured["median"] >= goal) else "no"


def beaten(bound: float, at_most: bool, median: float) -> bool:
    """Whether the measured median beats a bound (below a floor, above a ceiling) that another run gave."""
    return median < bound if at_most else median > bound


def out_of_reach(bound: float, goal: float, at_most: bool, median: float, of: str = "this search") -> str:
    """ "no" and why when even the figure's best case `bound` (a floor for a goal it must stay under,
    a ceiling for one it must reach) misses the goal; else "", and "" too when the measured `median`
    beats the bound (then it is no bound: it came from another run; the rounds decide)."""
    if not beaten(bound, at_most, median) and ((bound > goal) if at_most else (bound < goal)):
        return f"no: out of reach of {of}, its {'floor' if at_most else 'ceiling'} {bound:.2f}x misses the goal"
    return ""


# The CPU kernel multiplies tiles that stay in cache, one thread each: faster than PyTorch's product of the whole.
BELOW_PRODUCT = (
    "; the step beats that floor: the floor is PyTorch's product timed alone, and the CPU kernel's search, tiles "
    "multiplied one thread each while their scores stay in cache, runs faster than it"
)
STALE = " (the median beats it: that run's split no longer holds; run benchmarks.memory_step again)"


def unlike(first: dict, second: dict) -> str:
    """A verdict's refusal when two benchmarks that it compares ran on different devices or thread counts."""
    if first.get("device") == second.get("device"):
        return ""
    return f"not comparable: measured on {first.get('device')} and on {second.get('device')}; run both again alike"


def rounds(row: dict, name: str) -> dict[str, float]:
    """A ratio measured over rounds: its median, min and max (min = max = median if not recorded), and the
    median's interval (low, high: min and max if not recorded)."""
    low, high = row.get(f"{name}_min", row[name]), row.get(f"{name}_max", row[name])
    return {
        "median": row[name],
        "min": low,
        "max": high,
        "low": row.get(f"{name}_low", low),
        "high": row.get(f"{name}_high", high),
    }


def shown(measured: dict[str, float], unit: str = "x") -> str:
    """The median, the median's 95% interval where it is narrower than the rounds' min-max, and min-max."""
    low, high = interval(measured)
    within = f"median within {low:.2f}-{high:.2f}{unit}; " if (low, high) != (measured["min"], measured["max"]) else ""
    return f"{measured['median']:.2f}{unit} ({within}rounds {measured['min']:.2f}-{measured['max']:.2f}{unit})"


def rows(out: Path) -> list[tuple[str, str, str, str]]:
    search = json.loads((out / "search.json").read_text())
    train = json.loads((out / "train_step.json").read_text())
    if "rounds" not in train:
        raise SystemExit(
            f"{out / 'train_step.json'} was written by the earlier, non-interleaved benchmark: "
            "run `python -m benchmarks.train_step` again first"
        )
    steps = train["configs"]["reference"]
    stream = json.loads((out / "long_stream.json").read_text())
    by = {r["variant"]: r for r in steps["rows"]}
    exact_262k = next(r for r in search["exact"] if r["memory_size"] == 262144)
    model_rows = {r["memory_size"]: r for r in search["approximate"] if r["data"].startswith("model keys")}
    recall_65k, ivf_262k = model_rows[65536]["recall_at_k"], model_rows[262144]
    xl_s = by["XL only"]["seconds"]
    same_run = steps.get("search_matmul_gflops", {})  # measured beside the steps (benchmarks.train_step)

    def search_floor(slots: int) -> tuple[str, float, str]:
        """The step's floor with exact search over `slots` keys: XL only plus the search's matmul alone, at
        the speed train_step measured beside the steps (else benchmarks.search's). Returns its description
        and, where the matmul's speed comes from another run on another device, why it is not compared."""
        flops = steps["search_floors"][str(slots)]["gflop"] * 1e9
        measured = (r["matmul_gflops"] for r in search["exact"] if r["memory_size"] == slots)
        gflops = same_run.get(str(slots)) or next(measured, None)
        if gflops is None:
            return "", 0.0, f"no matmul speed measured at {slots:,} keys"
        floor = (xl_s + flops / gflops / 1e9) / xl_s
        text = f"its search's matmul alone, {flops / 1e9:.0f} GFLOP at {gflops:.0f} GFLOP/s, puts the floor at "
        text += f"{floor:.2f}x"
        return text, floor, "" if str(slots) in same_run else unlike(search, train)

    floor_8k, _, unlike_8k = search_floor(8192)
    floor_64k, floor, not_comparable = search_floor(65536)
    ratio = {variant: rounds(row, "ratio_to_xl") for variant, row in by.items()}  # to XL only, over rounds
    # The same product timed in the steps' rounds, with the memoryless step: the floor under the row as it runs
    # there. Its interval's low end past the goal (set from the product timed apart) leaves no selection fast
    # enough to meet it.
    in_rounds = steps["search_floors"]["65536"]
    rounds_text = (
        f"; timed in the same rounds the product alone took {in_rounds['product_seconds']['median'] * 1e3:.0f} "
        f"ms ({in_rounds['product_gflops']:.0f} GFLOP/s); with the vanilla step, a floor of "
        f"{shown(in_rounds['floor'])}"
    )
    low = interval(in_rounds["floor"])[0]
    rounds_reach = out_of_reach(low, 1.10 * floor, True, ratio["memory 64K"]["median"], "PyTorch's product")
    ivf = ratio["memory 64K IVF + XL"]
    # The floor of IVF at 64K: XL only plus the IVF search alone, as benchmarks.memory_step split the step.
    memory_step = json.loads((out / "memory_step.json").read_text())
    parts = {p["part"].strip(): p["seconds"] for p in memory_step["backends"]["memory 64K IVF"]}
    ivf_floor = 1 + parts["search"] / parts["step, XL only"]
    # The exact search against its own product, in the same rounds (benchmarks.memory_step).
    exact_parts = {p["part"].strip(): p["seconds"] for p in memory_step["backends"].get("memory 64K", [])}
    product = exact_parts.get("its product alone (cache-sized blocks)")
    product_text = ""
    if product is not None:
        product_text = (
            f"; in benchmarks.memory_step's rounds the search took {exact_parts['search'] * 1e3:.0f} ms and its "
            f"product alone {product * 1e3:.0f} ms ({memory_step['search_gflop'] / product:.0f} GFLOP/s)"
        )
    table = [
        (
            "step, memory 8K exact / XL only",
            "<= 1.15x",
            shown(ratio["memory 8K"]) + ("" if unlike_8k else f"; {floor_8k}"),
            verdict(ratio["memory 8K"], 1.15, at_most=True),
        ),
        (
            "step, memory 64K exact / XL only, against its floor",
            "within 10% of the floor",
            f"{shown(ratio['memory 64K'])}; {floor_64k} (goal {1.10 * floor:.2f}x){rounds_text}{product_text}"
            + (BELOW_PRODUCT if ratio["memory 64K"]["median"] < floor else ""),
            not_comparable or rounds_reach or verdict(ratio["memory 64K"], 1.10 * floor, at_most=True),
        ),
        (
            "step, memory 64K IVF + XL / XL only (recall@32 on model keys at 64K)",
            "<= 1.30x at recall >= 0.9",
            f"{shown(ivf)} (recall {recall_65k:.3f}); its search alone ({parts['search'] * 1e3:.0f} ms against "
            f"{parts['step, XL only'] * 1e3:.0f} for the XL-only step, benchmarks.memory_step) puts the floor at "
            f"{ivf_floor:.2f}x" + (STALE if beaten(ivf_floor, True, ivf["median"]) else ""),
            unlike(memory_step, train)
            or out_of_reach(ivf_floor, 1.30, True, ivf["median"])
            or (verdict(ivf, 1.30, at_most=True) if recall_65k >= 0.9 else "no"),
        ),
    ]
    popular = steps.get("tokens_per_s_vs_popular")
    if popular:
        goals = (("memory 64K IVF + XL", 1.5), ("memory 64K IVF", 1.5), ("vanilla", 1.0), ("XL only", 1.0))
        for variant, goal in goals:
            measured, met = shown(popular[variant]), verdict(popular[variant], goal, False)
            if "IVF" in variant:  # at best, ours would take the step without memory plus the IVF search alone
                base = by["XL only" if "XL" in variant else "vanilla"]["seconds"]
                floor_s = base + parts["search"] * xl_s / parts["step, XL only"]  # the search at this run's pace
                ceiling = popular[variant]["median"] * by[variant]["seconds"] / floor_s
                measured += f"; a step of no memory cost but the IVF search would give at most {ceiling:.2f}x"
                measured += STALE if beaten(ceiling, False, popular[variant]["median"]) else ""
                met = (
                    unlike(memory_step, train) or out_of_reach(ceiling, goal, False, popular[variant]["median"]) or met
                )
            same_memory = " (same memory, exact)" if "IVF" in variant else ""
            table.append((f"tokens/s, ours {variant} / theirs{same_memory}, same rounds", f">= {goal}x", measured, met))
        # The same model as theirs: one key/value head shared by all heads, in attention and memory.
        for variant, goal in (("memory 64K IVF + XL", 1.5), ("vanilla", 1.0), ("XL only", 1.0)):
            if (measured := popular.get(f"{variant}, 1 kv head")) is not None:
                table.append(
                    (
                        f"tokens/s, ours {variant} / theirs, both with one key/value head, same rounds",
                        f">= {goal}x",
                        shown(measured),
                        verdict(measured, goal, False),
                    )
                )
        small = train["configs"].get("small", {}).get("tokens_per_s_vs_popular")
        for variant in ("vanilla", "XL only") if small else ():
            table.append(
                (
                    f"tokens/s, ours {variant} / theirs, small preset, same rounds",
                    ">= 1.0x",
                    shown(small[variant]),
                    verdict(small[variant], 1.0, False),
                )
            )
    else:
        versus = by["memory 64K IVF"]["tokens_per_s"] / POPULAR_REFERENCE_TOKENS_PER_S
        table.append(
            (
                "tokens/s at 64K (IVF) / popular implementation",
                ">= 1.5x",
                f"{versus:.2f}x its 980 tok/s (first measured; not installed for this run)",
                "yes" if versus >= 1.5 else "no",
            )
        )
    faiss_flat, matmul_share = rounds(exact_262k, "speedup_vs_faiss_flat"), rounds(exact_262k, "fraction_of_matmul")
    ivf_speedup = rounds(ivf_262k, "speedup")
    table += [
        ("exact search at 262K / faiss IndexFlatIP", ">= 1.5x", shown(faiss_flat), verdict(faiss_flat, 1.5, False)),
        (
            "exact search at 262K, share of matmul GFLOP/s",
            ">= 70%",
            shown(matmul_share, ""),
            verdict(matmul_share, 0.70, False),
        ),
        (
            "IVF search at 262K / exact, recall@32 on model keys",
            ">= 5x at recall >= 0.9",
            f"{shown(ivf_speedup)} at recall {ivf_262k['recall_at_k']:.3f}",
            verdict(ivf_speedup, 5, False) if ivf_262k["recall_at_k"] >= 0.9 else "no",
        ),
        (
            "1M-token memory streamed at batch 1, bf16",
            "works; time per segment reported",
            f"{stream['tokens']:,} tokens, memory {stream['memory_fill']:,}; "
            f"{stream['by_fill'][-1]['median_s']:.3f} s / segment full ({stream['by_fill'][-1]['ratio_to_xl']:.2f}x "
            "XL only)",
            "yes" if stream["memory_fill"] == stream["config"]["memory_size"] == 1 << 20 else "no",
        ),
    ]
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks")
    out = Path(parser.parse_args(argv).out)
    lines = [
        "Made by `python -m benchmarks.targets` from the JSON beside it.",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {goal} | {measured} | {met} |" for name, goal, measured, met in rows(out)]
    text = "\n".join(lines) + "\n"
    print(text)
    write_atomically(out / "targets.md", lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
