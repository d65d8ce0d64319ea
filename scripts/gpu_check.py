"""`make gpu-check`: what a machine with CUDA must show, in about 8 minutes, ending in one summary.

1. the device tests (tests marked `device`: search against brute force on every backend, the
   model streaming as on the CPU, state files, a training run resumed, the retrofit) on CUDA;
2. two processes on two GPUs (torchrun, NCCL) against one, when there are two GPUs;
3. the benchmarks at --device cuda, into docs/benchmarks/cuda/ (the CPU tables stay as they are).

The summary goes to the terminal and to docs/benchmarks/cuda/gpu-check.md, with the device named.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks" / "cuda"
PYTHON = sys.executable


def run(name: str, command: list[str], timeout: int, env: dict[str, str] | None = None) -> dict:
    print(f"-- {name}: {' '.join(command)}", flush=True)
    began = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout)
        outcome = "passed" if result.returncode == 0 else f"failed (exit status {result.returncode})"
    except subprocess.TimeoutExpired:
        outcome = f"stopped after {timeout} s"
    return {"step": name, "outcome": outcome, "seconds": round(time.perf_counter() - began, 1)}


def two_gpus(workdir: Path) -> list[dict]:
    """Four training steps on two GPUs (DDP, and sharded by FSDP) and on one, with the same global
    batch: the same losses."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.faults import write_texts

    env = {"MT_CACHE_DIR": str(workdir / "cache"), "HF_HUB_OFFLINE": "1"}
    texts = write_texts(workdir / "texts")
    train = ["train", "--corpus", "files", "--preset", "tiny", "--vocab-size", "300", "--batch-size", "4"]
    train += ["--steps", "4", "--eval-every", "0", "--log-every", "1", "--eval-tokens", "64", "--device", "cuda"]
    cli = [PYTHON, "-m", "memorizing_transformers.cli"]
    torchrun = [str(Path(PYTHON).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    rows = [
        run("prepare a small corpus", [*cli, "data", "prepare", "files", "--source", str(texts)], 120, env),
        run("train on one GPU", [*cli, *train, "--out", str(workdir / "one")], 180, env),
    ]
    for name, step, extra in (
        ("two", "train on two GPUs (torchrun, NCCL)", []),
        ("sharded", "train on two GPUs, sharded (torchrun, NCCL, --fsdp)", ["--fsdp"]),
    ):
        command = [*torchrun, "-m", "memorizing_transformers.cli", *train, *extra, "--out", str(workdir / name)]
        rows.append(run(step, command, 240, env))
    losses = {}
    for name in ("one", "two", "sharded"):
        path = workdir / name / "metrics.jsonl"
        losses[name] = [json.loads(line)["loss"] for line in path.read_text().splitlines()] if path.is_file() else []
    for name in ("two", "sharded"):
        same = (
            bool(losses["one"])
            and len(losses["one"]) == len(losses[name])
            and all(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(losses["one"], losses[name]))
        )
        outcome = "passed" if same else f"failed: {losses['one']} against {losses[name]}"
        rows.append({"step": f"two GPUs ({name}) train as one", "outcome": outcome, "seconds": 0})
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu-check: no CUDA device here (torch.cuda.is_available() is False)")
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    OUT.mkdir(parents=True, exist_ok=True)
    rows = [
        run("device tests on CUDA", [PYTHON, "-m", "pytest", "-m", "device", "-q"], 240, {"MT_TEST_DEVICE": "cuda"})
    ]
    if len(devices) >= 2:
        with tempfile.TemporaryDirectory() as workdir:
            rows += two_gpus(Path(workdir))
    else:
        rows.append({"step": "two GPUs (torchrun)", "outcome": "skipped: one GPU here", "seconds": 0})
    # The training step and the memory's share of it at their full configurations; search and
    # memory use in their quick forms (their full sweeps take longer than this check should).
    for bench, extra in (("train_step", []), ("memory_step", []), ("search", ["--quick"]), ("memory_use", ["--quick"])):
        command = [PYTHON, "-m", f"benchmarks.{bench}", "--device", "cuda", "--out", str(OUT), *extra]
        rows.append(run(f"benchmarks.{bench} {' '.join(extra)}".strip(), command, 150))
    lines = [
        f"`make gpu-check` on {', '.join(devices)} (torch {torch.__version__}, CUDA {torch.version.cuda}).",
        "",
        "| step | outcome | seconds |",
        "|---|---|---:|",
        *(f"| {r['step']} | {r['outcome']} | {r['seconds']} |" for r in rows),
    ]
    summary = "\n".join(lines) + "\n"
    (OUT / "gpu-check.md").write_text(summary)
    print("\n" + summary)
    if any(not (r["outcome"].startswith("passed") or r["outcome"].startswith("skipped")) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
