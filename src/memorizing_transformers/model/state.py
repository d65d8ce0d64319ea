"""The stream state: everything that crosses a segment boundary.

In the manner of Hugging Face's Cache classes, one object holds, for a batch of
streams, the Transformer-XL cache of every layer and the kNN memory of every
memory layer. `MemorizingTransformer.forward` takes it and returns it; the model
itself holds no per-stream state, so training and evaluation streams never mix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import MemorizingConfig
from ..memory.files import load_memory_file, save_memory_file
from ..memory.knn_memory import KNNMemory, make_backend

STATE_FILE_FORMAT = "memorizing_transformers.MemorizingState"


@dataclass
class XLCache:
    """Keys and values of the last tokens seen by one layer (detached)."""

    keys: torch.Tensor  # (batch, heads, cache_len, head_dim), unit-normalised
    values: torch.Tensor  # (batch, heads, cache_len, head_dim)
    mask: torch.Tensor  # (batch, cache_len) bool, False for padding or a reset row


class MemorizingState:
    """XL caches (one per layer) and kNN memories (one per memory layer) for `batch_size` streams."""

    # What Hugging Face's generate() asks of a cache: this state is recurrent (like a
    # linear-attention cache), so generate leaves the slicing of inputs to the model.
    is_compileable = False
    is_croppable = False
    is_linear = (True,)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tokens_seen

    def __init__(self, config: MemorizingConfig, batch_size: int, device: torch.device | str | None = None) -> None:
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
        self.memories: dict[int, KNNMemory] = {
            layer: KNNMemory(
                batch_size,
                config.n_heads,
                config.head_dim,
                config.memory_size,
                dtype=config.torch_memory_dtype,
                device=device,
                backend=make_backend(config.memory_backend, config.ivf_list_size, config.ivf_nprobe),
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
        selected = MemorizingState.__new__(MemorizingState)
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

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Follow beam search's reordering of its beams (row i becomes row beam_idx[i]), in place;
        what Hugging Face's generate asks of a cache."""
        if torch.equal(beam_idx.cpu(), torch.arange(self.batch_size)):
            return
        selected = self.select_rows(beam_idx)
        self.batch_size, self.xl, self.memories = selected.batch_size, selected.xl, selected.memories
        self.globals, self.doc_tokens = selected.globals, selected.doc_tokens

    def update_xl(self, layer: int, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Append a segment's keys/values (batch, heads, seq, head_dim) to a layer's cache, keeping the
        last xl_length."""
        length = self.config.xl_length
        if length == 0:
            return
        cache = self.xl[layer]
        if cache is not None:
            keys = torch.cat([cache.keys, keys], dim=2)
            values = torch.cat([cache.values, values], dim=2)
            mask = torch.cat([cache.mask, mask], dim=1)
        self.xl[layer] = XLCache(keys[:, :, -length:].detach(), values[:, :, -length:].detach(), mask[:, -length:])

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

    def save(self, path: str | os.PathLike, model_fingerprint: str) -> None:
        """Write the whole state (XL caches and memories) to a safetensors file, atomically, with
        the fingerprint of the model that made it (`MemorizingTransformer.fingerprint()`)."""
        metadata = {
            "format": STATE_FILE_FORMAT,
            "model": model_fingerprint,
            "batch_size": str(self.batch_size),
            "tokens_seen": str(self.tokens_seen),
            "config": json.dumps(self.config.to_dict()),
        }
        save_memory_file(path, self.state_dict(), metadata)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        config: MemorizingConfig,
        model_fingerprint: str,
        device: torch.device | str | None = None,
    ) -> "MemorizingState":
        """Read a state written by `save`; refuses one made by another model (weights or configuration)."""
        metadata, tensors = load_memory_file(path, STATE_FILE_FORMAT, "a memory file of a MemorizingTransformer")
        if metadata["model"] != model_fingerprint:
            saved = MemorizingConfig.from_dict(json.loads(metadata["config"]))
            differences = sorted(k for k, v in saved.to_dict().items() if config.to_dict().get(k) != v)
            reason = f"configurations differ in {differences}" if differences else "same configuration, other weights"
            raise ValueError(
                f"{path} was made by model {metadata['model']}, not by this one ({model_fingerprint}): {reason}"
            )
        state = cls(config, int(metadata["batch_size"]), device=device)
        state.load_state_dict(tensors)
        state.tokens_seen = int(metadata["tokens_seen"])
        return state
