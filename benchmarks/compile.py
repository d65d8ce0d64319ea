"""torch.compile on the training step: each variant eager and with its forward pass compiled, at
benchmarks.train_step's reference configuration (vanilla, XL only, memory 8K, memory 64K IVF + XL),
timed in interleaved rounds once the compiled one has compiled.

    python -m benchmarks.compile            # about 3 minutes on 2 idle cores, compilation included
    python -m benchmarks.compile --quick    # the quick configuration, through --backend eager: a minute

Each variant runs in a process of its own, as a user's one model would: the variants share the
model's forward code, whose compiled graphs and dynamic-shape decisions dynamo keeps per code
object, so in one process each would change how the next compiles. Beside each row: how many
graphs dynamo compiled over the warm-up and the rounds (it traces again when a guard on the
model's Python state fails; past its recompile limit it runs that code eagerly), and the error of
a variant that does not run compiled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from memorizing_transformers.devices import describe_device

from .common import in_child, interleaved, parse_arguments, spread, write_results
from .train_step import QUICK, REFERENCE, our_case, size_label, variants

VARIANTS = ("vanilla", "XL only", "memory {small}", "memory {large} IVF + XL")


def shape(quick: bool) -> tuple:
    """(configuration, batch, large memory, rounds, steps per round, warm-up steps)."""
    return (QUICK, 2, 2048, 2, 1, 2) if quick else (REFERENCE, 4, 65536, 8, 3, 3)


def child(variant: str, backend: str, quick: bool, device: torch.device) -> dict:
    """This process's variant, eager and compiled: seconds per step in each round, graphs, error."""
    base, batch, large, rounds, calls, warmup = shape(quick)
    config = variants(base, large)[variant]
    eager = our_case(variant, config, batch, device)
    compiled = our_case(variant, config, batch, device, compile_backend=backend)
    error = ""
    try:
        for _ in range(warmup):
            compiled.step()
    except Exception as failure:  # noqa: BLE001 - whatever the compiler raises is the finding
        error = f"{type(failure).__name__}: {failure}"
    times = interleaved([eager] if error else [eager, compiled], rounds, calls, 1, device)
    measured = {"eager": times[0], "graphs": counters["stats"]["unique_graphs"], "error": error}
    return measured if error else measured | {"compiled": times[1]}


def main(argv: list[str] | None = None) -> None:
    args, device = parse_arguments(__doc__, argv, extra=[("--backend", str, "inductor"), ("--child", str, "")])
    backend = "eager" if args.quick else args.backend
    if args.child:
        print(json.dumps(child(args.child, backend, args.quick, device)))
        return
    base, batch, large, rounds, *_ = shape(args.quick)
    rows = []
    for name in VARIANTS:
        variant = name.format(small=size_label(base.memory_size), large=size_label(large))
        setting = ["--quick"] if args.quick else ["--backend", backend]
        measured = in_child("benchmarks.compile", "--child", variant, "--device", str(device), *setting)
        row = {"variant": variant, "eager_seconds": spread(measured["eager"]), "graphs": measured["graphs"]}
        row["error"] = measured["error"].strip().splitlines()[0] if measured["error"] else ""
        if "compiled" in measured:
            row["compiled_seconds"] = spread(measured["compiled"])
            row["compiled_over_eager"] = spread([c / e for c, e in zip(measured["compiled"], measured["eager"])])
        rows.append(row)
    lines = [
        f"Seconds per training step (vocab {base.vocab_size:,}, batch {batch} x {base.segment_length}), eager and "
        f"with the forward pass through torch.compile(backend={backend!r}), medians over {rounds} interleaved "
        "rounds, each variant in a process of its own:",
        "",
        "| variant | eager (s) | compiled (s) | compiled / eager (95% interval of the median) | graphs compiled | "
        "error |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        timed = "- | -"
        if (ratio := r.get("compiled_over_eager")) is not None:
            timed = f"{r['compiled_seconds']['median']:.3f} | {ratio['median']:.2f}x "
            timed += f"({ratio['low']:.2f}-{ratio['high']:.2f}x)"
        lines.append(
            f"| {r['variant']} | {r['eager_seconds']['median']:.3f} | {timed} | {r['graphs']} | {r['error'] or '-'} |"
        )
    text = "\n".join(lines)
    print(text)
    results = {
        "command": "python -m benchmarks.compile"
        + (" --quick" if args.quick else f" --backend {backend}" * (backend != "inductor")),
        "device": describe_device(device),
        "backend": backend,
        "config": base.to_dict(),
        "batch_size": batch,
        "rounds": rounds,
        "rows": rows,
    }
    write_results("compile-quick" if args.quick else "compile", results, text, Path(args.out))


if __name__ == "__main__":
    main()
