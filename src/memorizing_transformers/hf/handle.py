"""MemoryHandle: what `add_memory` returns, the memories of the chosen layers and what to do with
them: reset, resize, disable, read only, stream a long input through a sliding window, generate
after a long prompt, save and load."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .attention import LayerMemory
from .files import load_memories, save_memories

MEMORY_PARAMETERS = ("memory_bias", "memory_gate")  # what add_memory adds to a memory layer: one number per head


def write_overlap(window: int, overlap: int | None = None) -> int:
    """The tokens a write-only memorizing call reads again before those it stores: `overlap`, by
    default an eighth of the window (see `MemoryHandle.memorize`)."""
    overlap = window // 8 if overlap is None else overlap
    if not 0 <= overlap < window:
        raise ValueError(f"need 0 <= overlap < window, got overlap={overlap}, window={window}")
    return overlap


class MemoryHandle:
    """What `add_memory` returns: the memories of the chosen layers, and what to do with them."""

    def __init__(self, model: PreTrainedModel, layers: dict[int, LayerMemory], settings: dict) -> None:
        self.model = model
        self.layers = layers
        self.settings = settings  # the arguments of add_memory, kept in memory files
        self.position = 0  # absolute position of the next token `stream` reads
        self._write_mask: torch.Tensor | None = None  # (batch, seq) bool for the next call: False = not stored
        self._writing = True  # False: the memory layers read their memory but store nothing (`read_only`)
        self._signature = inspect.signature(model.forward)

    def _before_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Decide what this call of the model writes to memory.

        A call given a KV cache (`cache`/`past_key_values`, as `generate` passes) keeps its
        tokens there, so storing them in memory too would count them twice: it writes
        nothing. Otherwise padding (attention_mask 0) is never written, nor what `stream`
        leaves for the next window (`_write_mask`)."""
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs", {})
        cache = bound.get("cache", extra.get("cache", extra.get("past_key_values")))
        if not self._writing or cache is not None:
            self._set_call_writes(False)
            return
        writes = self._write_mask
        mask = bound.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            ids = bound.get("input_ids")
            seq = ids.shape[1] if ids is not None else mask.shape[1]
            padding = mask[:, -seq:].bool()
            writes = padding if writes is None else writes & padding.to(writes.device)
        self._set_call_writes(writes)

    def _after_call(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        self._set_call_writes(None)

    def _set_call_writes(self, writes: torch.Tensor | bool | None) -> None:
        for layer in self.layers.values():
            layer.call_writes = writes

    def reset(self, rows: Sequence[int] | torch.Tensor | None = None) -> None:
        """Empty the memories of the chosen rows (all when None: streaming starts again at position 0)."""
        if rows is None:
            self.position = 0
        for store in (store for layer in self.layers.values() for store in layer.stores()):
            store.expanded = None
            if store.memory is not None:
                store.memory.reset(rows)

    def resize(self, memory_size: int) -> None:
        """Give every layer a memory of `memory_size` entries per head: the memories are emptied
        and streaming starts again at position 0 (memory files record the new size)."""
        if memory_size <= 0:
            raise ValueError(f"memory_size must be positive, got {memory_size}")
        for layer in self.layers.values():
            layer.capacity = memory_size
            for store in layer.stores():
                store.memory = store.expanded = None
        self.settings["memory_size"] = memory_size
        self.position = 0

    @contextlib.contextmanager
    def read_only(self) -> Iterator[None]:
        """Within this block the memory layers read their memory but store nothing."""
        before, self._writing = self._writing, False
        try:
            yield
        finally:
            self._writing = before

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        """Within this block the memory layers neither read nor write: the original model."""
        return self._layers_set("enabled", False)

    def write_only(self) -> contextlib.AbstractContextManager[None]:
        """Within this block the memory layers store their tokens but do not search their memory:
        each window is read as the original model reads it, at the cost of its own forward pass,
        and its keys and values are kept. What later tokens lose is what earlier windows would
        have retrieved into their hidden states (and so into the keys and values stored)."""
        return self._layers_set("searching", False)

    @contextlib.contextmanager
    def _layers_set(self, flag: str, value: bool) -> Iterator[None]:
        """Within this block every memory layer's `flag` is `value`."""
        before = {i: getattr(layer, flag) for i, layer in self.layers.items()}
        for layer in self.layers.values():
            setattr(layer, flag, value)
        try:
            yield
        finally:
            for i, layer in self.layers.items():
                setattr(layer, flag, before[i])

    def memory_parameters(self) -> dict[str, nn.Parameter]:
        """What add_memory added to the model, by their names in `model.named_parameters()`: a
        `memory_bias` (joint) or `memory_gate` (gate) per memory layer, one number per head, the
        handful of numbers a short fine-tune trains."""
        return {name: p for name, p in self.model.named_parameters() if name.endswith(MEMORY_PARAMETERS)}

    def load_memory_parameters(self, values: dict[str, Sequence[float] | torch.Tensor]) -> None:
        """Set the parameters `memory_parameters` names to `values` (a fine-tune's, by the same names).
        Refuses names this model's memory does not have, missing ones and other shapes."""
        mine = self.memory_parameters()
        if set(values) != set(mine):
            unknown, missing = sorted(set(values) - set(mine)), sorted(set(mine) - set(values))
            raise ValueError(
                f"memory parameters for another memory: {len(unknown)} unknown here (e.g. {unknown[:1]}), "
                f"{len(missing)} missing (e.g. {missing[:1]}); they come from a memory with other layers or "
                "another combine"
            )
        with torch.no_grad():
            for name, value in values.items():
                value = torch.as_tensor(value, dtype=mine[name].dtype)
                if value.shape != mine[name].shape:
                    raise ValueError(
                        f"{name} holds {tuple(value.shape)} numbers, this memory {tuple(mine[name].shape)}"
                    )
                mine[name].copy_(value)

    def fill(self) -> dict[int, list[int]]:
        """Stored entries per layer and row."""
        return {i: ([] if layer.memory is None else layer.memory.fill.tolist()) for i, layer in self.layers.items()}

    def stream(
        self, input_ids: torch.Tensor, window: int, stride: int | None = None, losses: bool = False
    ) -> torch.Tensor:
        """Read a long input through a sliding window, the memory holding what has left it.

        input_ids: (batch, seq). Calls cover `window` tokens and advance by `stride`
        (default: `window`, no overlap); positions are absolute, going on from the tokens
        streamed since the last full `reset` (`position`). A call's first `stride`
        tokens, which leave the window at the next call, are written to memory by it (the
        last call writes all of its own), so no token is ever both in the window and in
        memory. Every token is scored in the first call that sees it as a prediction
        target with the most left context. Returns next-token logits (batch, seq, vocab), or
        with `losses` the next-token cross-entropies (batch, seq - 1), computed call by call
        so that a long input never holds all its logits at once. Gradients flow when enabled
        (fine-tuning: the memory itself is always detached); wrap in torch.no_grad() otherwise.
        """
        return self._stream(input_ids, window, stride, "losses" if losses else "logits")

    def _stream(
        self, input_ids: torch.Tensor, window: int, stride: int | None, keep: str, store_new: bool = False
    ) -> torch.Tensor | None:
        """`stream`, keeping the calls' "logits", their "losses", or nothing ("none": the model is
        asked for no more logits than it must compute, a call's last). With `store_new` a call
        writes the tokens the previous call did not read (its last `stride`) rather than those
        that leave the window: each token is stored once, read with the most left context."""
        stride = window if stride is None else stride
        if window <= 0 or not 0 < stride <= window:
            raise ValueError(f"need window > 0 and 0 < stride <= window, got window={window}, stride={stride}")
        seq = input_ids.shape[1]
        self._check_positions(self.position + seq)
        extra = {"logits_to_keep": 1} if keep == "none" and "logits_to_keep" in self._signature.parameters else {}
        logits, start = [], 0
        while True:
            end = min(start + window, seq)
            last = end == seq
            chunk = input_ids[:, start:end]
            positions = torch.arange(self.position + start, self.position + end, device=chunk.device).expand_as(chunk)
            new = 0 if start == 0 else window - stride  # the earlier tokens were read by the previous call
            write = torch.zeros_like(chunk, dtype=torch.bool)
            if store_new:
                write[:, new:] = True
            else:
                write[:, : (end - start) if last else stride] = True
            self._write_mask = write
            try:
                out = self.model(input_ids=chunk, position_ids=positions, **extra).logits  # (batch, end - start, vocab)
            finally:
                self._write_mask = None
            if keep == "losses":  # targets of positions start + new .. end - 1 (none after the input's last token)
                targets = input_ids[:, start + new + 1 : end + 1]
                out = F.cross_entropy(
                    out[:, new : new + targets.shape[1]].transpose(1, 2).float(), targets, reduction="none"
                )
                logits.append(out)
            elif keep == "logits":
                logits.append(out[:, new:])
            if last:
                self.position += seq
                return torch.cat(logits, dim=1) if logits else None
            start += stride

    @torch.no_grad()
    def memorize(
        self, documents: Sequence[torch.Tensor], window: int = 512, search: bool = True, overlap: int | None = None
    ) -> int:
        """Stream documents (token ids (batch, n) each, a row per memory row), one after another,
        into the memory through a sliding window of `window` tokens: learning at inference time.
        Returns the tokens read.

        With `search` False the windows are read without searching the memory (`write_only`), at
        the model's own forward-pass speed, each call reading again the `overlap` tokens (default
        window // 8) before those it stores: a window's first tokens, read with no context,
        become attention sinks, and a memory of them would hand them to every later search
        before anything else (window / (window - overlap) times the forward pass's work)."""
        device = next(self.model.parameters()).device
        stride = None if search else window - write_overlap(window, overlap)
        with contextlib.nullcontext() if search else self.write_only():
            for ids in documents:
                self._stream(ids.to(device), window, stride, "none", store_new=not search)
        return sum(ids.shape[1] for ids in documents)

    def _check_positions(self, length: int) -> None:
        """Positions are absolute: a model with learned position embeddings (GPT-2) cannot go past them."""
        limit = getattr(self.model.config, "n_positions", None)
        if limit is not None and length > limit:
            raise ValueError(
                f"{type(self.model).__name__} has learned positions up to {limit}, and streaming uses absolute "
                f"positions: an input of {length} tokens is too long for it (RoPE models have no such limit)"
            )

    def generate(self, input_ids: torch.Tensor, window: int, search: bool = True, **generate_kwargs) -> torch.Tensor:
        """Generate after a long prompt, which follows whatever the memory already holds: all
        but its last `window` tokens are memorized (and stay there; `search` as in `memorize`), then
        Hugging Face's `generate` continues from the last window, positions going on from
        there, reading the memory without writing to it. Returns the prompt and the new
        tokens (batch * num_return_sequences, seq + new), like `generate`; beam search and
        several sequences per prompt read copies of each prompt's memory row."""
        batch, seq = input_ids.shape
        self._check_positions(self.position + seq + generate_kwargs.get("max_new_tokens", 0))
        split = max(0, seq - window)
        if split:
            self.memorize([input_ids[:, :split]], window, search=search)  # every token stored once
        last = input_ids[:, split:]
        positions = torch.arange(self.position, self.position + seq - split, device=input_ids.device).expand(batch, -1)
        with self.read_only():
            out = self.model.generate(
                last, attention_mask=torch.ones_like(last), position_ids=positions, **generate_kwargs
            )
        prefix = input_ids[:, :split].repeat_interleave(out.shape[0] // batch, dim=0)  # beams, return sequences
        return torch.cat([prefix, out], dim=1)

    def save(self, path: str | os.PathLike) -> None:
        """Write every layer's memory to one safetensors file (atomically), with the settings of
        `add_memory`, the streaming position, the shapes and the model's identity (its
        configuration's and weights' fingerprints), so that a model it does not fit refuses it."""
        save_memories(path, self.model, self.layers, self.settings, self.position)

    def load(self, path: str | os.PathLike) -> None:
        """Read memories written by `save`; refuses a file made for another model or other shapes."""
        self.position = load_memories(path, self.model, self.layers)
