"""experiments/causality_check.py: a causal model's losses before the cut do not move when the tokens
after it change; a model that reads ahead is caught."""

import sys
from pathlib import Path

import torch

from memorizing_transformers import MemorizingConfig, MemorizingTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import causality_check  # noqa: E402

CONFIG = MemorizingConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=2, head_dim=16, d_ff=64, segment_length=16,
    xl_length=16, knn_layers=(1,), memory_size=64, knn_k=4, memory_gate_init=0.0,
)  # fmt: skip


def test_a_causal_model_passes_and_one_that_reads_ahead_fails(monkeypatch):
    torch.manual_seed(0)
    model = MemorizingTransformer(CONFIG).eval()
    ids = torch.randint(0, 64, (200,))
    result = causality_check.check(model, ids, cut=120)
    assert result["identical_before_cut"] and result["max_difference_before_cut"] == 0.0
    assert result["differ_after_cut"]
    # A "model" whose input is rolled so that each position reads two tokens ahead: the check fails.
    forward = MemorizingTransformer.forward
    monkeypatch.setattr(
        MemorizingTransformer, "forward", lambda self, input_ids, *a, **k: forward(self, input_ids.roll(-2, 1), *a, **k)
    )
    leaky = causality_check.check(model, ids, cut=120)
    assert not leaky["identical_before_cut"] and leaky["max_difference_before_cut"] > 0
