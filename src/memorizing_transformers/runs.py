"""The layout of a run directory: `checkpoints/step-NNNNNNN/` folders and a `checkpoints/latest`
file naming the newest complete one (training/checkpoint.py writes them). Reading it needs
nothing of training: evaluation and the command line find a run's model here."""

from __future__ import annotations

import re
from pathlib import Path

_STEP = re.compile(r"step-(\d+)")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint folders, newest (highest step) first."""
    root = checkpoint_root(run_dir)
    found = [p for p in root.glob("step-*") if p.is_dir() and _STEP.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=checkpoint_step, reverse=True)


def checkpoint_step(path: Path) -> int:
    return int(_STEP.fullmatch(path.name).group(1))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names when it exists; otherwise the highest-step one; None if none."""
    pointer = checkpoint_root(run_dir) / "latest"
    if pointer.is_file():
        path = checkpoint_root(run_dir) / pointer.read_text().strip()
        if path.is_dir() and _STEP.fullmatch(path.name):
            return path
    found = checkpoints(run_dir)
    return found[0] if found else None


def resolve_model_dir(path: str | Path) -> Path:
    """A saved model folder: the path itself, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"no such model folder or run directory: {path}")
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a saved model (no config.json) nor a run with checkpoints")
    return latest
