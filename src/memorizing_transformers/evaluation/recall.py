"""Answer accuracy on the synthetic recall task, by where each answer's binding lies."""

from __future__ import annotations

import torch

from ..data.streaming import StreamingBatcher
from ..data.synthetic import RecallDocument, accuracy_by_category
from ..model.transformer import MemorizingLM
from .stream import stream_batches


def recall_accuracy(
    model: MemorizingLM, documents: list[RecallDocument], batch_size: int = 8
) -> dict[str, dict[str, float]]:
    """Stream the documents (rows pinned to documents, `stream_batches`) and score the
    greedy prediction at every answer, grouped into "segment", "xl" and "memory" answers."""
    config = model.config
    batcher = StreamingBatcher(
        [d.document for d in documents], batch_size, config.segment_length, shuffle=False, epochs=1
    )
    if len(batcher.documents) != len(documents):
        raise ValueError("every recall document must hold at least 2 tokens")
    correct = [torch.zeros(d.document.ids.numel(), dtype=torch.bool) for d in documents]  # per position
    for batch, logits in stream_batches(model, batcher):
        hits = (logits.argmax(dim=-1).cpu() == batch.targets) & (batch.targets != -100)  # (batch, seq)
        for row, column in hits.nonzero().tolist():
            correct[int(batch.document_index[row])][batch.positions[row, column]] = True
    hits = torch.cat([c[d.answer_positions] for c, d in zip(correct, documents)])
    categories = torch.cat([d.categories(config.segment_length, config.xl_length) for d in documents])
    return accuracy_by_category(hits, categories)
