"""Faults a long training run meets, each inflicted on real `mt train` processes.

    python -m benchmarks.faults [--kills 8] [--steps 60]

1. SIGKILL at random moments (half of them while a checkpoint is being written, caught by
   watching for its temporary folder), then `--resume`, until the run is done: the loss
   of every step must equal, bit for bit, that of one uninterrupted run.
2. The newest checkpoint corrupted (its weights truncated): `--resume` falls back to the
   previous one, says so, and again ends with the uninterrupted losses.
3. A full disk (a small tmpfs, root only): the run stops with "no space left on device",
   the previous checkpoint is intact and loads, and once space is freed the run resumes
   and ends with the uninterrupted losses.

Writes faults.json and faults.md (one row per fault, with what happened) into --out.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import parse_arguments, write_results

NAMES = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def train_args(run: Path, steps: int, *extra: str) -> list[str]:
    """`mt` arguments training the tiny preset on the `files` corpus for `steps` steps into `run`."""
    return ["train", "--out", str(run), "--corpus", "files", "--preset", "tiny", "--vocab-size", "300",
            "--eval-every", "0", "--log-every", "1", "--steps", str(steps), *extra]  # fmt: skip


def train_command(run: Path, steps: int, resume: bool = False) -> list[str]:
    """The same in a process of its own, checkpointing every 3 steps."""
    extra = ["--checkpoint-every", "3", *(["--resume"] if resume else [])]
    return [sys.executable, "-m", "memorizing_transformers.cli", *train_args(run, steps, *extra)]


def run_mt(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def logged_steps(run: Path) -> int:
    """Complete lines of metrics.jsonl (read while the run may be writing one)."""
    path = run / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def write_texts(folder: Path) -> Path:
    """Eight small 'long documents' of pseudo-code in `folder`: a corpus for `--source`."""
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for i, name in enumerate(NAMES):
        lines = [
            f"def {rng.choice(NAMES)}_{j}(x):\n    return x * {rng.randint(0, 99)} + {name}_{i}\n" for j in range(60)
        ]
        (folder / f"{name}.txt").write_text("".join(lines))
    return folder


def prepare(work: Path) -> dict[str, str]:
    """A private cache with the `files` corpus of eight pseudo-code documents; the environment to use it."""
    env = {**os.environ, "MT_CACHE_DIR": str(work / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    texts = write_texts(work / "texts")
    done = run_mt(
        [sys.executable, "-m", "memorizing_transformers.cli", "data", "prepare", "files", "--source", str(texts)], env
    )
    if done.returncode:
        raise RuntimeError(done.stderr)
    return env


def kill_and_resume(work: Path, env: dict[str, str], steps: int, kills: int, seed: int, reference) -> dict[str, Any]:
    rng = random.Random(seed)
    run = work / "killed"
    kill_log, launches = [], 0
    while True:
        resume = (run / "run_config.json").is_file()
        process = subprocess.Popen(
            train_command(run, steps, resume), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        launches += 1
        done_steps = logged_steps(run)
        if len(kill_log) < kills and done_steps < steps - 1:
            in_write = len(kill_log) % 2 == 1
            share = max(1, (steps - 1 - done_steps) // (kills - len(kill_log)))  # kills spread over the run
            target = done_steps + rng.randint(1, share)  # kill once this step is logged
            while process.poll() is None:
                checkpoint_dir = run / "checkpoints"
                writing = checkpoint_dir.is_dir() and any(p.name.startswith(".step-") for p in checkpoint_dir.iterdir())
                logged = logged_steps(run)
                if (in_write and writing) or (not in_write and logged >= target):
                    process.send_signal(signal.SIGKILL)
                    kill_log.append("inside a checkpoint write" if writing else f"after step {logged}")
                    break
                time.sleep(0.001)
        _, err = process.communicate()
        if process.returncode == 0:
            break
        if process.returncode != -signal.SIGKILL:
            raise RuntimeError(f"the run failed by itself (exit {process.returncode}): {err}")
    got = losses(run)
    return {
        "fault": f"SIGKILL {len(kill_log)} times, then --resume",
        "same_losses": got == reference,
        "happened": f"killed {', '.join(kill_log)}; {launches} launches; {len(got)} steps logged, each once",
        "kills": kill_log,
    }


def corrupt_newest(work: Path, env: dict[str, str], steps: int, reference) -> dict[str, Any]:
    run = work / "corrupt"
    half = steps // 2
    first = run_mt(train_command(run, half), env)
    assert first.returncode == 0, first.stderr
    newest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    resumed = run_mt(train_command(run, steps, resume=True), env)
    said = [line for line in resumed.stderr.splitlines() if line.startswith(("warning:", "resuming from"))]
    return {
        "fault": "newest checkpoint's weights truncated, then --resume",
        "same_losses": losses(run) == reference,
        "happened": f"exit {resumed.returncode}; said: " + " / ".join(line.replace(str(work), "…") for line in said),
    }


def full_disk(work: Path, env: dict[str, str], steps: int, reference) -> dict[str, Any]:
    disk = work / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)], capture_output=True).returncode:
        return {"fault": "full disk", "skipped": "cannot mount a tmpfs here (needs root)"}
    try:
        run = disk / "run"
        first = run_mt(train_command(run, steps // 2), env)
        assert first.returncode == 0, first.stderr
        before = (run / "checkpoints" / "latest").read_text()
        filler = disk / "filler"
        filler.write_bytes(b"\0" * max(0, shutil.disk_usage(disk).free - 256 * 1024))
        failed = run_mt(train_command(run, steps, resume=True), env)
        intact = (run / "checkpoints" / "latest").read_text() == before and (run / "checkpoints" / before).is_dir()
        message = failed.stderr.strip().splitlines()[-1] if failed.stderr.strip() else ""
        filler.unlink()
        resumed = run_mt(train_command(run, steps, resume=True), env)
        return {
            "fault": "full disk (tmpfs) during a checkpoint, then space freed and --resume",
            "same_losses": losses(run) == reference,
            "previous_checkpoint_intact": intact,
            "happened": f"exit {failed.returncode}: `{message.replace(str(work), '…')}`; previous checkpoint "
            f"{'intact' if intact else '**damaged**'}; after freeing space, exit {resumed.returncode}",
        }
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, device = parse_arguments(__doc__, argv)
    kills, steps = (2, 12) if args.quick else (8, 60)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mt-faults-") as tmp:
        work = Path(tmp)
        env = prepare(work)
        reference_run = work / "reference"
        done = run_mt(train_command(reference_run, steps), env)
        assert done.returncode == 0, done.stderr
        reference = losses(reference_run)
        rows = [
            kill_and_resume(work, env, steps, kills, seed=0, reference=reference),
            corrupt_newest(work, env, steps, reference),
            full_disk(work, env, steps, reference),
        ]
    name = "faults-quick" if args.quick else "faults"
    results = {
        "command": "python -m benchmarks.faults" + (" --quick" if args.quick else ""),
        "device": "cpu",
        "steps": steps,
        "rows": rows,
        "wall_seconds": time.perf_counter() - began,
    }
    lines = ["| fault | what happened | every step's loss equals an uninterrupted run's |", "|---|---|---|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['fault']} | skipped: {row['skipped']} | - |")
            continue
        lines.append(f"| {row['fault']} | {row['happened']} | {'yes' if row['same_losses'] else '**no**'} |")
    table = "\n".join(lines)
    write_results(
        name, results, f"{steps} steps of the tiny preset on the `files` corpus, one thread.\n\n{table}", Path(args.out)
    )
    print(table)
    return results


if __name__ == "__main__":
    main()
