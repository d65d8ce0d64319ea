"""The safetensors files that hold memories: reading them (existence and format checked
first) and the fingerprint that ties one to the model whose keys it holds."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


def fingerprint(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    """A short SHA-256 of a configuration and of tensors' names and bytes (as stored, in
    their own dtype): equal exactly when both are."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


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
