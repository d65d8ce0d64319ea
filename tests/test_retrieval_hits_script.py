"""experiments/retrieval_hits.py on tiny models: one case per kind of model, each head's figures pooled."""

import math
import sys
from pathlib import Path

import torch
from tiny_models import tiny_llama

from memorizing_transformers import MemorizingConfig, MemorizingTransformer
from memorizing_transformers.data.tokenizer import load_tokenizer
from memorizing_transformers.evaluation.retrieval import KINDS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import retrieval_hits  # noqa: E402

TEXT = "def add(a, b):\n    return a + b\n\n" * 40


def check(heads: list[dict], count: int) -> None:
    assert len(heads) == count
    for head in heads:
        assert head["queries"] > 0
        for kind in KINDS:
            figures = head[kind]
            assert 0.0 <= figures["in_memory"] <= 1.0
            if not math.isnan(figures["share"]):
                assert 0.0 <= figures["share"] <= figures["found"] <= 1.0 and 0.0 < figures["base_rate"] <= 1.0
                assert 0.0 <= figures["chance"] <= 1.0 and 0.0 <= figures["weight"] <= 1.0 + 1e-9


def test_a_model_trained_here_given_a_memory_in_one_layer(tmp_path):
    torch.manual_seed(0)
    model = MemorizingTransformer(MemorizingConfig.preset("tiny", vocab_size=50257, knn_layers=()))
    model.save_pretrained(tmp_path / "model")
    ids = torch.tensor(model.tokenizer(TEXT)["input_ids"][:200])
    heads = retrieval_hits.own_case(tmp_path / "model", 1, memory_size=64, k=4, docs=[("doc", TEXT, ids)] * 2)
    check(heads, model.config.n_heads)
    # Two copies of the same document pool to the figures of one.
    alone = retrieval_hits.own_case(tmp_path / "model", 1, memory_size=64, k=4, docs=[("doc", TEXT, ids)])
    assert [h["answer"]["share"] for h in heads] == [h["answer"]["share"] for h in alone]


def test_a_hugging_face_model_given_a_memory_in_one_layer(tmp_path):
    tiny_llama(vocab_size=50257, max_position_embeddings=1024).save_pretrained(tmp_path / "llama")
    load_tokenizer().save_pretrained(tmp_path / "llama")
    heads = retrieval_hits.hf_case(tmp_path / "llama", 1, memory_size=256, k=4, docs=[("doc", TEXT, None)], tokens=700)
    check(heads, 4)
