"""What `MemorizingLM.forward` accepts: tensors, lists or a tokenizer's output, checked and
converted to (batch, seq) tensors, with a one-line error for anything else."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def prepare_inputs(
    input_ids: Any, attention_mask: Any, labels: Any, vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """input_ids (batch, seq) long, attention_mask (batch, seq) bool and labels (batch, seq) long
    or None, on `device`; a 1-D input is one row, a mapping is read for `input_ids` and
    `attention_mask`."""
    if isinstance(input_ids, Mapping):
        if "input_ids" not in input_ids:
            raise ValueError(f"the input mapping has no 'input_ids' (keys: {sorted(input_ids)})")
        if attention_mask is None:
            attention_mask = input_ids.get("attention_mask")
        input_ids = input_ids["input_ids"]
    input_ids = _as_2d("input_ids", input_ids, device)
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: there are no tokens to run the model on (was the text empty?)")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    input_ids = input_ids.long()
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token id {low if low < 0 else high} is out of range for vocab_size {vocab_size}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = _as_2d("attention_mask", attention_mask, device).bool()
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
        )
    if labels is not None:
        labels = _as_2d("labels", labels, device).long()
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids has {tuple(input_ids.shape)}")
    return input_ids, attention_mask, labels


def _as_2d(name: str, value: Any, device: torch.device) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value, device=device)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{name} must be a tensor or a (nested) list of equal-length rows: {err}") from None
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, seq) or (seq,), got shape {tuple(tensor.shape)}")
    return tensor
