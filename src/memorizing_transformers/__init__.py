"""Memorizing Transformers (Wu et al., ICLR 2022) in PyTorch."""

from .config import MemorizingConfig
from .memory.knn_memory import KNNMemory
from .model.positions import relative_position_bucket
from .model.state import MemorizingState
from .model.transformer import MemorizingLM, MemorizingTransformerOutput
from .pretrained import MemorizingTransformer

__all__ = [
    "KNNMemory",
    "MemorizingConfig",
    "MemorizingLM",
    "MemorizingState",
    "MemorizingTransformer",
    "MemorizingTransformerOutput",
    "relative_position_bucket",
]
