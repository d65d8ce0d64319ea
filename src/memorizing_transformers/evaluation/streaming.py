"""Stream one long document through a model, segment by segment, with its memory."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.transformer import MemorizingTransformer


@dataclass
class SegmentResult:
    index: int
    tokens: int  # tokens scored in this segment
    loss: float  # mean next-token cross-entropy (nats)
    memory_fill: int  # entries in the first memory layer after the segment (0 without memory)
    seconds: float


@torch.no_grad()
def stream_document(model: MemorizingTransformer, token_ids: torch.Tensor) -> Iterator[SegmentResult]:
    """Feed `token_ids` (seq,) in segments of `config.segment_length`, carrying the state.

    Each segment predicts the token after each of its positions, the last one
    included (its target is the first token of the next segment), so every token
    but the first is scored exactly once.
    """
    if token_ids.dim() != 1 or token_ids.numel() < 2:
        raise ValueError(f"token_ids must be a 1-D tensor of at least 2 tokens, got shape {tuple(token_ids.shape)}")
    token_ids = token_ids.to(model.device)
    L = model.config.segment_length
    state = model.new_state(1)
    for index, start in enumerate(range(0, token_ids.numel() - 1, L)):
        began = time.perf_counter()
        inputs = token_ids[start : start + L]
        targets = token_ids[start + 1 : start + L + 1]
        out = model(inputs[None], state=state)
        state = out.state
        logits = out.logits[0, : targets.numel()].float()
        loss = F.cross_entropy(logits, targets).item()
        fill = next(iter(state.memory_fill().values()), [0])[0]
        yield SegmentResult(index, targets.numel(), loss, fill, time.perf_counter() - began)
