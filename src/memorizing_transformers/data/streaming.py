"""Batches of long documents for a model with memory (SPEC section 2).

Each batch row is pinned to one document and streams its segments in order. When
a row's document ends, the next document starts in that row on the next step,
with a start-of-document flag that clears the row's XL cache and memory. The last
segment of a document is padded; padding is masked from the loss and the memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenizedDocument:
    """One document as token ids. `loss_mask[t]` False excludes predicting token t from the loss."""

    name: str
    ids: torch.Tensor  # (n,) long
    loss_mask: torch.Tensor | None = None  # (n,) bool; None: every token is a target

    def __post_init__(self) -> None:
        if self.ids.dim() != 1:
            raise ValueError(f"document {self.name!r}: ids must be 1-D, got shape {tuple(self.ids.shape)}")
        if self.loss_mask is not None and self.loss_mask.shape != self.ids.shape:
            raise ValueError(f"document {self.name!r}: loss_mask shape {tuple(self.loss_mask.shape)} != ids shape {tuple(self.ids.shape)}")
