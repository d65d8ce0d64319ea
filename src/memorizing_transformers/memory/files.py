"""The safetensors files that hold memories, one format for every kind (a `KNNMemory`, a
`MemorizingState`, the memories of `add_memory`): tensors, and metadata naming the kind
(`format`), the version of the layout (`format_version`) and a checksum of the tensors.
Writing is atomic; reading checks existence, kind, version, integrity and checksum first.
`fingerprint` is the one hash that ties a file to the model whose keys it holds."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..atomic import write_atomically

# The layout of the files this version writes; files written before versions were recorded
# (every kind but KNNMemory's) have this same layout.
FORMAT_VERSION = "1"


def fingerprint(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    """A short SHA-256 of a configuration and of tensors' names and bytes (as stored, in
    their own dtype): equal exactly when both are."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def save_memory_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` and `metadata` to a safetensors file atomically, with a checksum of the
    tensors in the metadata. Tensors that share storage (views of one tensor, which
    safetensors refuses) are written as copies."""
    owned, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        pointer = tensor.untyped_storage().data_ptr()
        whole = (
            tensor.is_contiguous()
            and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        )
        owned[name] = tensor if whole and pointer not in seen else tensor.clone(memory_format=torch.contiguous_format)
        seen.add(pointer)
    metadata = {**metadata, "format_version": FORMAT_VERSION, "checksum": fingerprint({}, owned)}
    write_atomically(Path(path), lambda tmp: save_file(owned, tmp, metadata=metadata))


def memory_file_metadata(path: str | os.PathLike, file_format: str, what: str) -> dict[str, str]:
    """The metadata of the memory file at `path`, after checking that it is a `file_format` file.

    `what` names the kind of file in the error message (e.g. "a KNNMemory file")."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a memory file")
    if not path.is_file():
        raise FileNotFoundError(f"no memory file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not {what}: it is truncated, corrupt or not a safetensors file ({err})") from None
    if metadata.get("format") != file_format:
        raise ValueError(f"{path} is not {what} (metadata format={metadata.get('format')!r})")
    if metadata.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(
            f"{path} has memory format version {metadata['format_version']}, and this version of "
            f"memorizing-transformers reads version {FORMAT_VERSION}"
        )
    return metadata


def load_memory_file(
    path: str | os.PathLike, file_format: str, what: str
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a memory file written by `save_memory_file`; a file whose
    tensors do not match their checksum (a flipped byte, a truncated copy) is refused.
    Files written before checksums existed have none and are read as they are."""
    metadata = memory_file_metadata(path, file_format, what)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is truncated or corrupt ({err})") from None
    if "checksum" in metadata and fingerprint({}, tensors) != metadata["checksum"]:
        raise ValueError(f"{path} is corrupt: its tensors do not match the checksum written with them")
    return metadata, tensors
