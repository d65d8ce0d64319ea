"""Configuration of a Memorizing Transformer and its presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch

MEMORY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MemorizingConfig:
    """Hyper-parameters of a decoder-only Memorizing Transformer.

    The defaults describe the `small` preset with the GPT-2 vocabulary of the
    default tokenizer. Use `MemorizingConfig.preset(name, **overrides)` for
    `tiny` (tests), `small` (trains on a CPU in minutes) and `paper`
    (the final model of Wu et al., 2022).
    """

    vocab_size: int = 50257
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    # Key/value heads (None: n_heads). Fewer share each one among n_heads / n_kv_heads query heads
    # (grouped-query attention; 1: multi-query), in the XL cache and the memory too, which is then
    # that many times smaller and cheaper to search.
    n_kv_heads: int | None = None
    head_dim: int = 64
    d_ff: int = 1024
    dropout: float = 0.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True

    # Tokens per segment: a longer input is cut into segments fed in order.
    segment_length: int = 256
    # Keys/values of the last `xl_length` tokens kept as a Transformer-XL cache
    # (0 disables it). The paper uses one previous segment.
    xl_length: int = 256

    # Other long-range baselines in the same code base (0 disables each):
    # - attention_window: each query attends only to keys fewer than this many tokens back,
    #   over [XL cache ; segment] (causal sliding-window attention in the style of Longformer;
    #   with xl_length >= attention_window - 1 every query sees exactly its window);
    # - xl_compression: the XL cache is compressed to this many slots by a learned projection
    #   along its length (a causal Linformer: only past segments are projected, so no query
    #   sees a later token; Linformer's own projection of the whole sequence would).
    # - global_tokens: the first global_tokens tokens of each document stay visible to every
    #   later token of it, past the window and the XL cache (Longformer's global attention, causal).
    attention_window: int = 0
    xl_compression: int = 0
    global_tokens: int = 0

    # T5 relative position bias (causal).
    num_buckets: int = 32
    max_distance: int = 128

    # Queries and keys are normalised to unit length; the softmax temperature
    # is a learned per-head scale that starts at `qk_scale_init`
    # (None: sqrt(head_dim), which gives unit-variance logits at init).
    qk_norm_eps: float = 1e-6
    qk_scale_init: float | None = None

    # kNN memory: layer indices (negative counts from the top, like the paper's -4).
    knn_layers: tuple[int, ...] = (-4,)
    memory_size: int = 8192
    knn_k: int = 32
    memory_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # How the memory is searched: "exact" (the CPU kernel, or torch on the model's device), "ivf"
    # (approximate: memory_size / ivf_list_size k-means lists per row and head, ivf_nprobe of
    # them scanned per query by the CPU kernel; exact off the CPU), "faiss_flat" (exact, faiss
    # IndexFlatIP) or "faiss_ivf" (approximate, a faiss IVF index with the same lists and probes,
    # holding the keys in half precision).
    memory_backend: Literal["exact", "ivf", "faiss_flat", "faiss_ivf"] = "exact"
    ivf_list_size: int = 256
    ivf_nprobe: int = 16
    # "gate": separate softmax over the retrieved entries, mixed with local attention by a
    # learned per-head sigmoid gate, the parameter `memory_gate` (the paper). "joint": retrieved
    # entries join the local softmax ("joint_softmax", as earlier versions wrote, still reads).
    memory_combine: Literal["gate", "joint"] = "gate"
    # What a memory layer writes: "segment", each segment's keys/values once it has attended
    # (the paper: the memory then also holds what the XL cache holds); "evicted", what leaves
    # the XL cache as the segment enters it, so that memory and cache never hold the same
    # token (with the joint softmax and k as large as the memory, attention over [memory ;
    # XL cache ; segment] is then full attention over the document).
    memory_writes: Literal["segment", "evicted"] = "segment"
    # Initial value of `memory_gate` (the share of memory = sigmoid of it): 0 in the paper. A
    # negative value starts with the memory nearly shut, which lets local copy circuits form
    # first. (`add_memory` starts pretrained models' gates at -3, so that they begin as the
    # model they were.)
    memory_gate_init: float = 0.0
    # The softmax temperature of retrieved entries: None shares the layer's learned per-head
    # scale; a number gives memory layers a scale of their own per head, starting there, so
    # that retrieval can be sharp where local attention is diffuse (its sharpness comes from
    # the position bias, which retrieved entries lack).
    memory_qk_scale_init: float | None = None
    # Added at initialisation to the first layer's position bias at distance 1 (every head),
    # so that layer starts out attending to the previous token. 0: no such prior.
    previous_token_bias_init: float = 0.0

    def __post_init__(self) -> None:
        if self.memory_combine == "joint_softmax":  # the name earlier versions saved
            self.memory_combine = "joint"
        self._check_types()
        positive = {
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "head_dim": self.head_dim,
            "d_ff": self.d_ff,
            "segment_length": self.segment_length,
            "num_buckets": self.num_buckets,
            "max_distance": self.max_distance,
            "memory_size": self.memory_size,
            "knn_k": self.knn_k,
            "ivf_list_size": self.ivf_list_size,
            "ivf_nprobe": self.ivf_nprobe,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"MemorizingConfig.{name} must be positive, got {value}")
        if self.n_kv_heads is not None and (
            not _is_int(self.n_kv_heads) or self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads
        ):
            raise ValueError(
                f"MemorizingConfig.n_kv_heads must be a positive divisor of n_heads ({self.n_heads}), "
                f"got {self.n_kv_heads!r}"
            )
        for name in ("xl_length", "attention_window", "xl_compression", "global_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"MemorizingConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.xl_compression and not self.xl_length:
            raise ValueError("MemorizingConfig.xl_compression compresses the XL cache: it needs xl_length > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MemorizingConfig.dropout must be in [0, 1), got {self.dropout}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"MemorizingConfig.{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        if self.num_buckets < 2:
            raise ValueError(f"MemorizingConfig.num_buckets must be at least 2, got {self.num_buckets}")
        for i in self.knn_layers:
            if not -self.n_layers <= i < self.n_layers:
                raise ValueError(f"kNN layer index {i} is out of range for a model of {self.n_layers} layers")
        if len(set(self.memory_layer_indices)) != len(self.knn_layers):
            raise ValueError(f"knn_layers {self.knn_layers} name the same layer twice")

    def _check_types(self) -> None:
        """Each field holds a value of its type (an integer where a float is expected becomes
        that float); anything else is refused with the field's name, before it reaches a layer."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), _FIELD_TYPES[f.name]
            if kind is int and not _is_int(value):
                raise ValueError(f"MemorizingConfig.{f.name} must be an integer, got {value!r}")
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"MemorizingConfig.{f.name} must be true or false, got {value!r}")
            if kind in (float, float | None) and not (value is None and kind is not float):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"MemorizingConfig.{f.name} must be a number, got {value!r}")
                setattr(self, f.name, float(value))
        if (
            isinstance(self.knn_layers, (str, bytes))
            or not hasattr(self.knn_layers, "__iter__")
            or not all(_is_int(i) for i in self.knn_layers)
        ):
            raise ValueError(
                f"MemorizingConfig.knn_layers must be a list of layer indices, e.g. [-2], got {self.knn_layers!r}"
            )
        self.knn_layers = tuple(int(i) for i in self.knn_layers)

    @property
    def memory_layer_indices(self) -> tuple[int, ...]:
        """The kNN layers as non-negative indices, in order."""
        return tuple(sorted(i % self.n_layers for i in self.knn_layers))

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when it is None."""
        return self.n_heads if self.n_kv_heads is None else int(self.n_kv_heads)

    @property
    def initial_qk_scale(self) -> float:
        return self.qk_scale_init if self.qk_scale_init is not None else math.sqrt(self.head_dim)

    @property
    def torch_memory_dtype(self) -> torch.dtype:
        return MEMORY_DTYPES[self.memory_dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MemorizingConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MemorizingConfig fields: {unknown}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "MemorizingConfig":
        """A named preset (`tiny`, `small`, `paper`) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# The options a Literal field allows (memory_backend's are memory.backend.BACKENDS: a test keeps them equal).
_CHOICES = {
    name: get_args(hint) for name, hint in get_type_hints(MemorizingConfig).items() if get_origin(hint) is Literal
}
_FIELD_TYPES = {
    name: (hint if get_origin(hint) is not Literal else str) for name, hint in get_type_hints(MemorizingConfig).items()
}

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: what the tests use.
    "tiny": dict(
        vocab_size=512,
        d_model=64,
        n_layers=4,
        n_heads=4,
        head_dim=16,
        d_ff=128,
        segment_length=16,
        xl_length=16,
        knn_layers=(2,),
        memory_size=128,
        knn_k=4,
    ),
    # Minutes on a CPU.
    "small": dict(),
    # The final model of the paper: 12 layers, d 1024, 8 x 128 heads, FFN 4096,
    # 512-token segments with an XL cache of one segment, memory 65,536 in layer -4, k 32.
    "paper": dict(
        vocab_size=32000,
        d_model=1024,
        n_layers=12,
        n_heads=8,
        head_dim=128,
        d_ff=4096,
        segment_length=512,
        xl_length=512,
        knn_layers=(-4,),
        memory_size=65536,
        knn_k=32,
    ),
}
