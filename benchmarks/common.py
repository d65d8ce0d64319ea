"""Shared pieces of the benchmarks: timing, machine description, output."""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memorizing_transformers.atomic import write_atomically
from memorizing_transformers.devices import keep_freed_host_memory, synchronize


def median_seconds(run: Callable[[], Any], repeats: int, warmup: int = 1, device: torch.device | None = None) -> float:
    """Median wall time of `run()` over `repeats` calls after `warmup` calls (synchronising CUDA)."""

    def timed() -> float:
        synchronize(device)
        began = time.perf_counter()
        run()
        synchronize(device)
        return time.perf_counter() - began

    for _ in range(warmup):
        timed()
    return statistics.median(timed() for _ in range(repeats))


@dataclass
class Case:
    """One timed variant of an interleaved benchmark: `step()` does one unit of work (a training
    step) reading `tokens` tokens; `set_fill(share)`, when given, resets its memory to that share
    of its capacity before each round (a memory with no steady state, timed across its cycle)."""

    owner: str  # "ours", or the implementation it is set beside
    variant: str
    step: Callable[[], None]
    tokens: int
    set_fill: Callable[[float], None] | None = None


def seconds_per_call(run: Callable[[], Any], calls: int, device: torch.device | None = None) -> float:
    """Mean wall time of `calls` consecutive calls of `run()` (synchronising CUDA around them)."""
    synchronize(device)
    began = time.perf_counter()
    for _ in range(calls):
        run()
    synchronize(device)
    return (time.perf_counter() - began) / calls


def interleaved(cases: list[Case], rounds: int, calls: int, warmup: int, device: torch.device) -> list[list[float]]:
    """Seconds per step of every case in every round: each case first warms up with `warmup`
    steps, then every round times `calls` steps of each case in turn, the order rotated by
    one case each round, so that a slow spell of the machine falls on all cases alike.
    Returns times[case][round]; cases with `set_fill` are refilled to (round + 1/2) / rounds
    of their capacity before each of their rounds."""
    for case in cases:
        for _ in range(warmup):
            case.step()
    times: list[list[float]] = [[] for _ in cases]
    for r in range(rounds):
        for i in [(r + j) % len(cases) for j in range(len(cases))]:
            if cases[i].set_fill is not None:
                cases[i].set_fill((r + 0.5) / rounds)
            times[i].append(seconds_per_call(cases[i].step, calls, device))
    return times


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: the order statistics x(j) and x(n + 1 - j)
    for the largest j with P(Binomial(n, 1/2) < j) <= (1 - confidence) / 2, which cover the median with
    at least that probability whatever the distribution. Below 6 values none does: min and max."""
    ordered, n = sorted(values), len(values)
    below = lambda j: sum(math.comb(n, i) for i in range(j)) / 2**n  # noqa: E731  P(Binomial(n, 1/2) < j)
    j = 1
    while 2 * (j + 1) <= n and 2 * below(j + 1) <= 1 - confidence:
        j += 1
    return ordered[j - 1], ordered[n - j]


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max, and the median's 95% confidence interval (low, high; see median_interval)."""
    low, high = median_interval(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "low": low, "high": high}


def in_child(module: str, *arguments: str) -> Any:
    """Run `python -m MODULE ARGUMENTS` in a fresh process and return the JSON its last line of output
    prints: for measurements whose setting cannot be undone in a process (malloc's, torch.compile's)."""
    done = subprocess.run([sys.executable, "-m", module, *arguments], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def write_results(name: str, results: dict[str, Any], table: str, out_dir: Path) -> None:
    """Write NAME.json (raw) and NAME.md (the table and the command) into `out_dir`."""
    results = {**results, "machine": {"platform": platform.platform(), "torch": torch.__version__}}
    write_atomically(out_dir / f"{name}.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    header = f"Made by `{results['command']}` on {results['device']} ({results['machine']['platform']}).\n\n"
    write_atomically(out_dir / f"{name}.md", lambda tmp: Path(tmp).write_text(header + table + "\n"))


def parse_arguments(
    description: str,
    argv: list[str] | None,
    model_keys: bool = False,
    extra: list[tuple[str, type, Any]] = (),
    keep_freed: bool = True,
) -> tuple[argparse.Namespace, torch.device]:
    """The flags every benchmark takes: --quick, --out, --device; with `model_keys`, also
    --checkpoint and --corpus (a trained model whose memory-layer keys to measure on); `extra`:
    a benchmark's own (flag, type, default). `keep_freed`: set malloc as `mt` does
    (devices.keep_freed_host_memory)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny configuration, seconds")
    parser.add_argument("--out", default="docs/benchmarks", help="where NAME.json and NAME.md go")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if model_keys:
        parser.add_argument("--checkpoint", help="a trained checkpoint or run directory: also measure on its keys")
        parser.add_argument("--corpus", default="code", help="the corpus streamed through --checkpoint")
    for flag, kind, default in extra:
        parser.add_argument(flag, type=kind, default=default, help=f"(default {default})")
    args = parser.parse_args(argv)
    if keep_freed:  # as `mt` runs: every variant, ours and theirs, allocates the same way
        keep_freed_host_memory()
    return args, torch.device(args.device)
