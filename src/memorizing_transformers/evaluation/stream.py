"""The one loop that streams documents through a model to score them: perplexity, recall
accuracy and the inspector's per-token losses all read its batches and logits."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..data.streaming import Batch, StreamingBatcher
from ..model.transformer import MemorizingLM


@torch.no_grad()
def stream_batches(model: MemorizingLM, batcher: StreamingBatcher) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Each batch of `batcher` (rows pinned to documents) and the model's logits for it
    (batch, seq, vocab), read in eval mode with a fresh stream state of its own; the model's
    mode is restored when the loop ends or is left."""
    was_training = model.training
    model.eval()
    state = model.new_state(batcher.batch_size)
    try:
        for batch in batcher:
            out = model(
                batch.input_ids,
                attention_mask=batch.attention_mask,
                state=state,
                start_of_document=batch.start_of_document,
            )
            state = out.state
            yield batch, out.logits
    finally:
        model.train(was_training)
