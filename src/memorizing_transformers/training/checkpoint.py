"""Atomic, resumable checkpoints.

A run directory holds `checkpoints/step-NNNNNNN/` folders and a `checkpoints/latest`
file naming the newest complete one. A checkpoint is written into a temporary folder
and renamed into place before `latest` is (atomically) rewritten, so a crash at any
moment leaves the previous checkpoint intact and `latest` pointing at it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_atomically
from ..model.transformer import MemorizingTransformer

TRAINING_STATE = "training_state.pt"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = checkpoint_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def resolve_model_dir(path: str | Path) -> Path:
    """A saved model folder: the path itself, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a saved model (no config.json) nor a run with checkpoints")
    return latest


def save_checkpoint(run_dir: str | Path, step: int, model: MemorizingTransformer, training_state: dict[str, Any], keep: int = 2) -> Path:
    """Write model + training state for `step`; keep the newest `keep` checkpoints."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.tmp*"):  # left by an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp", dir=root))
    try:
        model.save_pretrained(tmp)
        torch.save(training_state, tmp / TRAINING_STATE)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_atomically(root / "latest", lambda path: Path(path).write_text(name))
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / TRAINING_STATE, weights_only=False)
