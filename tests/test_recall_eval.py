import dataclasses

import torch

from memorizing_transformers import MemorizingConfig, MemorizingTransformer
from memorizing_transformers.data.synthetic import RecallTask, curriculum_documents
from memorizing_transformers.evaluation.recall import recall_accuracy


class Oracle(MemorizingTransformer):
    """Predicts every next token perfectly (reads the document it is given)."""

    def __init__(self, config, documents):
        super().__init__(config)
        self.next_token = {}
        for d in documents:
            ids = d.document.ids
            for t in range(ids.numel() - 1):
                self.next_token[(tuple(ids[: t + 1].tolist()))] = int(ids[t + 1])

    def forward(self, input_ids, attention_mask=None, state=None, start_of_document=None, **kwargs):
        out = super().forward(
            input_ids, attention_mask=attention_mask, state=state, start_of_document=start_of_document
        )
        self.history = getattr(self, "history", [[] for _ in range(input_ids.shape[0])])
        logits = torch.zeros_like(out.logits)
        for row in range(input_ids.shape[0]):
            if start_of_document[row]:
                self.history[row] = []
            for t in range(int(attention_mask[row].sum())):
                self.history[row].append(int(input_ids[row, t]))
                logits[row, t, self.next_token.get(tuple(self.history[row]), 0)] = 1.0
        out.logits = logits
        return out


def test_recall_accuracy_counts_every_answer_once():
    task = RecallTask(num_names=8, num_values=4, document_length=64, max_distance=64)
    documents = task.generate_many(range(5))
    config = MemorizingConfig.preset("tiny", vocab_size=task.vocab_size, segment_length=8, xl_length=8)
    perfect = recall_accuracy(Oracle(config, documents), documents, batch_size=2)
    total = sum(d.answer_positions.numel() for d in documents)
    assert sum(v["count"] for v in perfect.values()) == total
    assert all(v["accuracy"] == 1.0 for v in perfect.values() if v["count"])
    untrained = recall_accuracy(MemorizingTransformer(config), documents, batch_size=3)
    assert sum(v["count"] for v in untrained.values()) == total
    assert all(v["accuracy"] < 1.0 for v in untrained.values() if v["count"])


def test_curriculum_grows_distances_in_reading_order():
    task = RecallTask(num_names=32, num_values=16, document_length=512, max_distance=512)
    documents = curriculum_documents(task, steps=2000, batch_size=4, segment_length=32)
    # 16 segments a document: the batch of 4 rows takes 4 new documents every 16 steps.
    assert len(documents) == 4 * (2000 // 16 + 1)
    regenerated = dataclasses.replace(task, max_distance=32).generate(seed=0).document
    assert torch.equal(documents[0].ids, regenerated.ids)
    late = dataclasses.replace(task, max_distance=256).generate(seed=4 * 100).document  # step 1600
    assert torch.equal(documents[400].ids, late.ids)
