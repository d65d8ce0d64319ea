"""Atomic, resumable checkpoints, and the lock that gives one process a run at a time.

A run directory holds `checkpoints/step-NNNNNNN/` folders and a `checkpoints/latest`
file naming the newest complete one. A checkpoint is written into a temporary folder,
flushed to disk and renamed into place before `latest` is (atomically) rewritten, so a
crash, a kill or a power loss at any moment leaves the previous checkpoint intact and
`latest` pointing at it. Old checkpoints are pruned by step number, never the one
`latest` names; resuming falls back to the newest checkpoint that loads.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..atomic import atomic_dir, write_atomically
from ..pretrained import MemorizingTransformer
from ..runs import checkpoint_root, checkpoint_step, checkpoints, latest_checkpoint

TRAINING_STATE = "training_state.pt"
LOCK_FILE = ".lock"


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """Checkpoints to resume from, best first: the one `latest` names, then the others by step."""
    first = latest_checkpoint(run_dir)
    return ([first] if first else []) + [p for p in checkpoints(run_dir) if p != first]


def save_checkpoint(
    run_dir: str | Path, step: int, model: MemorizingTransformer, training_state: dict[str, Any], keep: int = 2
) -> Path:
    """Write model + training state for `step`, point `latest` at it, and keep the newest
    `keep` checkpoints at or below this step (the ones above it belong to a timeline this
    run has left). A failed write (a full disk) leaves every earlier checkpoint as it was."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in (*root.glob(".step-*.tmp"), *root.glob(".latest.*.tmp")):  # left by an interrupted save
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    name = f"step-{step:07d}"
    final = root / name
    buffer = io.BytesIO()  # serialised first, so that a full disk raises an OSError in our own write
    torch.save(training_state, buffer)
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        (tmp / TRAINING_STATE).write_bytes(buffer.getbuffer())
    write_atomically(root / "latest", lambda path: Path(path).write_text(name))
    kept = [p for p in checkpoints(run_dir) if checkpoint_step(p) < step][: keep - 1]
    for old in checkpoints(run_dir):
        if old != final and old not in kept:
            shutil.rmtree(old)
    return final


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / TRAINING_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete")
    try:
        # On the CPU and mapped, not read: every process of a run loads it, and a training
        # stream's memories can be large.
        return torch.load(path, weights_only=False, map_location="cpu", mmap=True)
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # torch names a bad zip archive its own way
        raise ValueError(f"{path} is truncated or corrupt ({str(err).splitlines()[0]})") from None


# ---------------------------------------------------------------------- the run lock
# One lock file per run directory, held with an OS lock (flock) for as long as a process
# trains into it: the OS drops the lock when the process ends, killed or not, so a dead
# run never blocks the next. Within one process the lock is re-entrant.
_held: dict[Path, list] = {}  # resolved run dir -> [open lock file, depth]


class RunLocked(RuntimeError):
    """Another process is training into this run directory."""


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run directory's lock; refuse (`RunLocked`, naming the holder) when another process has it."""
    key = Path(run_dir).resolve()
    if key in _held:
        _held[key][1] += 1
    else:
        key.mkdir(parents=True, exist_ok=True)
        f = open(key / LOCK_FILE, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise RunLocked(
                    f"{run_dir} is in use by {holder}: wait for it to finish, or choose another --out"
                ) from None
            raise
        f.truncate(0)
        f.write(
            f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
            f"({' '.join(sys.argv[:3])})\n"
        )
        f.flush()
        _held[key] = [f, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            f = _held.pop(key)[0]
            f.truncate(0)
            f.close()  # closing releases the flock


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of `metrics.jsonl` past `step` (logged after the checkpoint a run
    resumes from, so they would be logged again), and any half-written last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    write_atomically(path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))
