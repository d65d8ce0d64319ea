"""Reading the safetensors files that hold memories: existence and format checked first."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import safe_open


def memory_file_metadata(path: str | os.PathLike, file_format: str, what: str) -> dict[str, str]:
    """The metadata of the memory file at `path`, after checking that it is a `file_format` file.

    `what` names the kind of file in the error message (e.g. "a KNNMemory file")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no memory file at {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != file_format:
        raise ValueError(f"{path} is not {what} (metadata format={metadata.get('format')!r})")
    return metadata
