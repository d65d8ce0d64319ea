"""What glibc's malloc settings cost a CPU training step: the documents configuration of
benchmarks.train_step (XL only, memory 8K + XL, memory 64K IVF + XL), timed in fresh processes with
malloc as glibc leaves it and with devices.keep_freed_host_memory (as `mt` sets it), the processes
alternating so that a slow spell of the machine falls on both settings alike.

    python -m benchmarks.allocator            # about 5 minutes on 2 cores
    python -m benchmarks.allocator --quick    # seconds

By default glibc maps fresh pages for each allocation over 32 MiB and unmaps them when freed, so
such tensors page-fault all their pages in at every step; the setting under test keeps freed memory
in malloc's heap for the next allocation. The setting is process-wide and cannot be undone in a
process, hence one process per measurement.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from memorizing_transformers.devices import describe_device, keep_freed_host_memory

from .common import in_child, interleaved, parse_arguments, spread, write_results
from .train_step import QUICK, document_variants, grid_model, our_case, size_label

SETTINGS = ("glibc default", "keep freed")


def child(setting: str, quick: bool, device: torch.device) -> dict[str, float]:
    """Median seconds per step of each variant, in this process, with malloc in `setting`."""
    if setting == "keep freed":
        assert keep_freed_host_memory(), "not glibc"
    base, batch = (QUICK, 8) if quick else grid_model()
    large = 2048 if quick else 65536
    exact_large = f"memory {size_label(large)} + XL"  # its exact search is not what is measured here
    variants = {name: config for name, config in document_variants(base, large).items() if name != exact_large}
    cases = [our_case(name, config, batch, device, staggered=True) for name, config in variants.items()]
    times = interleaved(cases, 2 if quick else 5, 1 if quick else 3, 1 if quick else 2, device)
    return {case.variant: statistics.median(t) for case, t in zip(cases, times)}


def main(argv: list[str] | None = None) -> None:
    args, device = parse_arguments(__doc__, argv, extra=[("--child", str, "")], keep_freed=False)
    if args.child:
        print(json.dumps(child(args.child, args.quick, device)))
        return
    if device.type != "cpu":
        sys.exit("benchmarks.allocator measures the host's malloc: run it with --device cpu")
    pairs = 1 if args.quick else 4
    runs: list[dict] = []
    for pair in range(pairs):
        for setting in SETTINGS if pair % 2 == 0 else SETTINGS[::-1]:
            seconds = in_child("benchmarks.allocator", "--child", setting, "--device", "cpu", *["--quick"] * args.quick)
            runs.append({"pair": pair, "setting": setting, "seconds": seconds})
    variants = list(runs[0]["seconds"])
    by = {(r["pair"], r["setting"]): r["seconds"] for r in runs}
    rows = []
    for variant in variants:
        keep = [by[(p, "keep freed")][variant] / by[(p, "glibc default")][variant] for p in range(pairs)]
        rows.append(
            {
                "variant": variant,
                **{s: statistics.median(by[(p, s)][variant] for p in range(pairs)) for s in SETTINGS},
                "keep_over_default": spread(keep),
                **{
                    f"{s} vs XL only": statistics.median(
                        by[(p, s)][variant] / by[(p, s)]["XL only"] for p in range(pairs)
                    )
                    for s in SETTINGS
                },
            }
        )
    lines = [
        f"Seconds per training step, medians over {pairs} process{'es' if pairs > 1 else ''} per setting "
        f"({describe_device(device)}):",
        "",
        "| step | glibc default (s) | keep freed (s) | keep freed / default (min-max) | vs XL only, default | "
        "vs XL only, keep freed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["keep_over_default"]
        lines.append(
            f"| {r['variant']} | {r['glibc default']:.3f} | {r['keep freed']:.3f} | {s['median']:.2f}x "
            f"({s['min']:.2f}-{s['max']:.2f}x) | {r['glibc default vs XL only']:.2f}x | "
            f"{r['keep freed vs XL only']:.2f}x |"
        )
    text = "\n".join(lines)
    print(text)
    results = {
        "command": "python -m benchmarks.allocator" + (" --quick" if args.quick else ""),
        "device": describe_device(device),
        "runs": runs,
        "rows": rows,
    }
    write_results("allocator-quick" if args.quick else "allocator", results, text, Path(args.out))


if __name__ == "__main__":
    main()
