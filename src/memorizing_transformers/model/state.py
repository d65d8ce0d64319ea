"""The stream state: everything that crosses a segment boundary.

In the manner of Hugging Face's Cache classes, one object holds, for a batch of
streams, the Transformer-XL cache of every layer and the kNN memory of every
memory layer. `MemorizingTransformer.forward` takes it and returns it; the model
itself holds no per-stream state, so training and evaluation streams never mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import MemorizingConfig
from ..memory.knn_memory import KNNMemory, make_backend


@dataclass
class XLCache:
    """Keys and values of the last tokens seen by one layer (detached)."""

    keys: torch.Tensor  # (batch, heads, cache_len, head_dim), unit-normalised
    values: torch.Tensor  # (batch, heads, cache_len, head_dim)
    mask: torch.Tensor  # (batch, cache_len) bool, False for padding or a reset row


class MemorizingState:
    """XL caches (one per layer) and kNN memories (one per memory layer) for `batch_size` streams.

    The memories live on `memory_device` (default: `device`, the model's): "cpu" for a model on a
    GPU keeps them in pinned host memory, searched there, for memories larger than the GPU holds."""

    def __init__(
        self,
        config: MemorizingConfig,
        batch_size: int,
        device: torch.device | str | None = None,
        memory_device: torch.device | str | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.config = config
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.tokens_seen = 0  # columns of input read since the state was made (or since generation began)
        self.xl: list[XLCache | None] = [None] * config.n_layers
        # With global_tokens: per layer, the keys/values of each row's document's first
        # global_tokens tokens (slot j = document position j), and how many tokens of its
        # current document each row has read.
        self.globals: list[XLCache | None] = [None] * config.n_layers
        self.doc_tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # (batch,)
        memories = self.device if memory_device is None else torch.device(memory_device)
        self.memories: dict[int, KNNMemory] = {
            layer: KNNMemory(
                batch_size,
                config.kv_heads,
                config.head_dim,
                config.memory_size,
                dtype=config.torch_memory_dtype,
                device=memories,
                backend=make_backend(config.memory_backend, config.ivf_list_size, config.ivf_nprobe),
                beside=self.device,
            )
            for layer in config.memory_layer_indices
        }

    @property
    def cache_length(self) -> int:
        """Number of cached tokens per layer (the same for every layer)."""
        cache = self.xl[0]
        return 0 if cache is None else cache.keys.shape[2]

    def memory_fill(self) -> dict[int, list[int]]:
        """Stored entries per memory layer and row."""
        return {layer: memory.fill.tolist() for layer, memory in self.memories.items()}

    def reset(self, rows: torch.Tensor | Sequence[int] | None = None) -> None:
        """Forget the chosen rows (bool mask (batch,) or indices; all when None): XL cache and memory."""
        for memory in self.memories.values():
            memory.reset(rows)
        if rows is None:
            self.xl = [None] * self.config.n_layers
            self.globals = [None] * self.config.n_layers
            self.doc_tokens.zero_()
            return
        rows = torch.as_tensor(rows, device=self.device)
        self.doc_tokens[rows] = 0
        for cache in (*self.xl, *self.globals):
            if cache is not None:
                cache.mask[rows.to(cache.mask.device)] = False

    def select_rows(self, index: torch.Tensor | Sequence[int]) -> "MemorizingState":
        """A new state whose row i is a copy of row index[i] of this one (rows may repeat), XL
        caches and memories alike: how beam search expands a stream to its beams."""
        index = torch.as_tensor(index, dtype=torch.long)
        selected = type(self).__new__(type(self))
        selected.config, selected.device, selected.tokens_seen = self.config, self.device, self.tokens_seen
        selected.batch_size = index.numel()
        selected.xl, selected.globals = (
            [
                None
                if c is None
                else XLCache(*(t.index_select(0, index.to(t.device)) for t in (c.keys, c.values, c.mask)))
                for c in caches
            ]
            for caches in (self.xl, self.globals)
        )
        selected.doc_tokens = self.doc_tokens.index_select(0, index.to(self.device))
        selected.memories = {layer: memory.select_rows(index) for layer, memory in self.memories.items()}
        return selected

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A segment's keys/values (batch, heads, seq, head_dim) and mask (batch, seq) in; out, what the
        layer attends: [XL cache ; segment] keys, values and mask (as Hugging Face's `Cache.update`
        returns). The layer's cache keeps the last xl_length of them, detached."""
        cache = self.xl[layer]
        if cache is not None:
            keys = torch.cat([cache.keys.to(keys.dtype), keys], dim=2)  # (batch, heads, cache_len + seq, head_dim)
            values = torch.cat([cache.values.to(values.dtype), values], dim=2)
            mask = torch.cat([cache.mask, mask], dim=1)  # (batch, cache_len + seq)
        length = self.config.xl_length
        if length:
            self.xl[layer] = XLCache(keys[:, :, -length:].detach(), values[:, :, -length:].detach(), mask[:, -length:])
        return keys, values, mask

    def update_globals(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """Keep the keys/values (batch, heads, seq, head_dim) of the segment's tokens that are among
        their document's first global_tokens (positions (batch, seq): document positions)."""
        count = self.config.global_tokens
        if self.globals[layer] is None:
            shape = (keys.shape[0], keys.shape[1], count, keys.shape[3])
            self.globals[layer] = XLCache(
                keys.new_zeros(shape),
                values.new_zeros(shape),
                torch.zeros(keys.shape[0], count, dtype=torch.bool, device=keys.device),
            )
        rows, tokens = (mask & (positions < count)).nonzero(as_tuple=True)
        store, slots = self.globals[layer], positions[rows, tokens]
        store.keys[rows, :, slots] = keys.detach()[rows, :, tokens]
        store.values[rows, :, slots] = values.detach()[rows, :, tokens]
        store.mask[rows, slots] = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All tensors of the state, e.g. to checkpoint a training stream mid-document."""
        tensors: dict[str, torch.Tensor] = {}
        for layer, cache in enumerate(self.xl):
            if cache is not None:
                tensors.update(
                    {f"xl.{layer}.keys": cache.keys, f"xl.{layer}.values": cache.values, f"xl.{layer}.mask": cache.mask}
                )
        for layer, memory in self.memories.items():
            tensors.update({f"memory.{layer}.{name}": t for name, t in memory.state_dict().items()})
        if self.config.global_tokens:
            tensors["doc_tokens"] = self.doc_tokens
            for layer, store in enumerate(self.globals):
                if store is not None:
                    tensors.update(
                        {
                            f"globals.{layer}.keys": store.keys,
                            f"globals.{layer}.values": store.values,
                            f"globals.{layer}.mask": store.mask,
                        }
                    )
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for layer in range(self.config.n_layers):
            if f"xl.{layer}.keys" in tensors:
                self.xl[layer] = XLCache(
                    *(tensors[f"xl.{layer}.{name}"].to(self.device) for name in ("keys", "values", "mask"))
                )
            else:
                self.xl[layer] = None
        for layer, memory in self.memories.items():
            prefix = f"memory.{layer}."
            memory.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        if "doc_tokens" in tensors:
            self.doc_tokens = tensors["doc_tokens"].to(self.device)
        self.globals = [
            XLCache(*(tensors[f"globals.{layer}.{name}"].to(self.device) for name in ("keys", "values", "mask")))
            if f"globals.{layer}.keys" in tensors
            else None
            for layer in range(self.config.n_layers)
        ]
