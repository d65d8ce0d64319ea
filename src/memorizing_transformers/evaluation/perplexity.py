"""Token-level perplexity over whole documents, streamed with memory."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.streaming import StreamingBatcher, TokenizedDocument
from ..model.transformer import MemorizingLM
from .stream import stream_batches


@dataclass
class EvalResult:
    loss: float  # mean next-token cross-entropy, nats
    perplexity: float
    bits_per_byte: float | None  # None unless whole documents with known byte counts were scored
    tokens: int
    documents: int
    loss_by_segment: list[float]  # mean loss of targets in the i-th segment of their document
    tokens_by_segment: list[int]
    # With `token_losses=True`: per document, the loss of predicting each token (position 0,
    # which nothing predicts, and unscored tokens are NaN). Not part of `to_dict`.
    token_losses: list[torch.Tensor] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "token_losses"}


def evaluate(
    model: MemorizingLM,
    documents: list[TokenizedDocument],
    batch_size: int = 1,
    max_tokens: int | None = None,
    progress: bool = False,
    token_losses: bool = False,
) -> EvalResult:
    """Stream `documents` once (in order, rows pinned to documents, `stream_batches`) and score
    every target. `max_tokens` stops early (a partial, quicker estimate);
    `token_losses` keeps every token's loss (`EvalResult.token_losses`)."""
    L = model.config.segment_length
    batcher = StreamingBatcher(documents, batch_size, L, shuffle=False, epochs=1)
    total_loss, total_tokens = 0.0, 0
    by_segment_loss: dict[int, float] = {}
    by_segment_count: dict[int, int] = {}
    per_token = [torch.full((d.ids.numel(),), float("nan")) for d in batcher.documents] if token_losses else None
    bar = tqdm(
        total=max_tokens or sum(d.ids.numel() - 1 for d in batcher.documents),
        disable=not progress,
        unit="tok",
        desc="evaluate",
    )
    batches = stream_batches(model, batcher)
    for batch, logits in batches:
        scored = batch.targets != -100  # (batch, seq)
        losses = F.cross_entropy(
            logits.float().transpose(1, 2), batch.targets.to(model.device), ignore_index=-100, reduction="none"
        )
        losses = losses.cpu()
        if per_token is not None:
            for row in scored.any(dim=1).nonzero().flatten().tolist():
                per_token[int(batch.document_index[row])][batch.positions[row][scored[row]]] = losses[row][scored[row]]
        losses, segments = losses[scored], ((batch.positions[scored] - 1) // L)
        total_loss += float(losses.sum())
        total_tokens += int(scored.sum())
        for segment in segments.unique().tolist():
            pick = segments == segment
            by_segment_loss[segment] = by_segment_loss.get(segment, 0.0) + float(losses[pick].sum())
            by_segment_count[segment] = by_segment_count.get(segment, 0) + int(pick.sum())
        bar.update(int(scored.sum()))
        if max_tokens is not None and total_tokens >= max_tokens:
            break
    batches.close()  # the model back in its mode
    bar.close()
    if total_tokens == 0:
        raise ValueError("no token was scored: the documents hold no targets")
    complete = max_tokens is None and all(d.num_bytes for d in batcher.documents)
    loss = total_loss / total_tokens
    bits_per_byte = total_loss / math.log(2) / sum(d.num_bytes for d in batcher.documents) if complete else None
    segments = sorted(by_segment_count)
    return EvalResult(
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_byte=bits_per_byte,
        tokens=total_tokens,
        documents=len(batcher.documents),
        loss_by_segment=[by_segment_loss[s] / by_segment_count[s] for s in segments],
        tokens_by_segment=[by_segment_count[s] for s in segments],
        token_losses=per_token,
    )
