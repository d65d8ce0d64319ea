"""The retrofit's attention function, "memorizing", and the memory of one layer (`LayerMemory`).

A memory layer receives the queries, keys and values the model has already projected (and,
under RoPE, rotated), searches its memory, combines through the shared kernel
(`model.attention.memory_attention`) and then writes the keys and values of the tokens of this
call; a layer without memory, or with its memory disabled, runs PyTorch's SDPA as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import rotate_half

from ..memory.knn_memory import KNNMemory, make_backend
from ..model.attention import Retrieved, memory_attention, retrieved_logits

ATTENTION_NAME = "memorizing"
POSITIONS = ("true", "fixed")


def rotate(x: torch.Tensor, distances: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, seq, head_dim) rotated as RoPE rotates a vector `distances` (batch or 1,
    seq) positions further on (negative: back), with the model's own frequencies `inv_freq`
    (head_dim / 2,) and without its attention scaling: a pure rotation, as Hugging Face's
    `apply_rotary_pos_emb` pairs the dimensions (`rotate_half`), computed in float32."""
    freqs = distances[..., None].float() * inv_freq.float().to(x.device)  # (batch, seq, head_dim / 2)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (batch, 1, seq, head_dim)
    wide = x.float()
    return (wide * angles.cos() + rotate_half(wide) * angles.sin()).to(x.dtype)


@dataclass
class LayerMemory:
    """The memory of one attention layer, attached to the attention module as `knn_memory`."""

    layer: int
    capacity: int
    knn_k: int
    num_kv_heads: int
    head_dim: int
    combine: Literal["joint", "gate"]
    dtype: torch.dtype
    backend: str
    ivf_list_size: int = 256  # the IVF backends' settings (see memory.knn_memory.make_backend)
    ivf_nprobe: int = 16
    # Where retrieved entries stand: "true", at their own positions (keys stored as rotated, so a
    # score is full attention's logit); "fixed", all at `distance` tokens before the query (keys
    # stored unrotated, the query rotated by `distance`), with the frequencies of the model's
    # rotary embedding module `rotary` (read at each call: a cast or a dynamic RoPE changes them).
    positions: str = "true"
    distance: int = 0
    rotary: nn.Module | None = None
    memory_device: torch.device | str | None = None  # where the memory lives (None: the model's device)
    memory: KNNMemory | None = None  # created at the first call, for its batch size
    enabled: bool = True
    # False: the layer stores its tokens but does not search (the handle's `write_only`): each
    # window is read as the model alone reads it, at the cost of its own forward pass.
    searching: bool = True
    # Hooks see what the layer retrieves, call by call (see evaluation/inspect.py).
    retrieved: Retrieved = field(default_factory=Retrieved)
    # Read-only calls with more rows than the memory (beam search, several return sequences
    # per prompt) read a copy whose rows repeat each memory row, as generate repeats the prompts.
    expanded: KNNMemory | None = None
    # With sink_tokens: the first tokens written since a reset, kept apart (never evicted) and
    # attended by every later query (a LayerMemory of their number, searched whole).
    sink: "LayerMemory | None" = None
    # What the current call of the model stores: None (every token), a (batch, seq) bool mask,
    # or False (nothing: the caller keeps these tokens in a KV cache). Set for the call by the
    # handle's forward pre-hook on the model (`MemoryHandle._before_call`).
    call_writes: torch.Tensor | bool | None = None

    def shape(self, batch_size: int) -> dict[str, int | str]:
        shape = {
            "batch_size": batch_size,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "capacity": self.capacity,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        return shape | ({"sink_tokens": self.sink.capacity} if self.sink else {})

    def stores(self) -> list["LayerMemory"]:
        """This layer's memory and, with sink tokens, its sink store."""
        return [self] + ([self.sink] if self.sink else [])

    def for_call(self, batch_size: int, device: torch.device, writes: bool) -> KNNMemory:
        """The memory a call of `batch_size` rows reads (and, when `writes`, writes).

        An empty memory takes the call's batch size; a filled one is never silently replaced:
        a read-only call whose batch is a multiple of its rows reads each row repeated, any
        other mismatch is refused."""
        memory = self.memory
        if memory is None or (memory.batch_size != batch_size and not bool(memory.valid.any())):
            shape = (batch_size, self.num_kv_heads, self.head_dim, self.capacity)
            where = self.memory_device or device
            backend = make_backend(self.backend, self.ivf_list_size, self.ivf_nprobe)
            self.memory = KNNMemory(*shape, dtype=self.dtype, device=where, backend=backend, beside=device)
            self.expanded = None
            return self.memory
        if memory.batch_size == batch_size:
            return memory
        if writes or batch_size % memory.batch_size:
            raise ValueError(
                f"the memory of layer {self.layer} holds {memory.batch_size} filled row(s), but this input has "
                f"{batch_size} rows: give one input row per memory row, or reset() the memory first"
            )
        if self.expanded is None or self.expanded.batch_size != batch_size:
            repeats = batch_size // memory.batch_size
            self.expanded = memory.select_rows(torch.arange(memory.batch_size).repeat_interleave(repeats))
        return self.expanded


def memorizing_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The "memorizing" attention function. query: (batch, heads, seq, head_dim); key, value:
    (batch, kv_heads, kv_len, head_dim), the cache included; attention_mask: additive
    (batch, 1, seq, kv_len). Returns (batch, seq, heads, head_dim), as HF's functions do."""
    layer: LayerMemory | None = getattr(module, "knn_memory", None)
    if layer is None or not layer.enabled:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, seq, dim = query.shape
    scaling = dim**-0.5 if scaling is None else scaling
    groups = heads // key.shape[1]
    writes = layer.call_writes
    memory = layer.for_call(batch, query.device, writes=writes is not False)
    sinks = None if layer.sink is None else layer.sink.for_call(batch, query.device, writes=writes is not False)
    new_keys = key[:, :, -seq:]  # this call's tokens, rotated at their positions under RoPE
    searching = query  # (batch, heads, seq, head_dim): what scores the retrieved keys
    if layer.positions == "fixed":  # keys kept unrotated; each query turned to `distance` tokens on
        positions = kwargs.get("position_ids")
        if positions is None:  # as Hugging Face numbers a call without them: after its cache
            positions = torch.arange(key.shape[2] - seq, key.shape[2], device=query.device)[None]
        positions = positions[:, -seq:].to(query.device)
        new_keys = rotate(new_keys, -positions, layer.rotary.inv_freq)
        if layer.searching:
            searching = rotate(query, layer.distance - positions, layer.rotary.inv_freq)
    if not layer.searching:  # write only: the window as the model alone reads it, then the store
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        _store(layer, memory, sinks, new_keys, value[:, :, -seq:], writes)
        return out, None

    # Retrieve: the query heads of a group search their key/value head's memory together. The keys
    # found are gathered only when the logits must carry a gradient back to the queries.
    found = memory.search(searching, layer.knn_k, gather_keys=query.requires_grad)  # (batch, heads, seq, k, ...)
    mem_logits, mem_values = retrieved_logits(searching, found, scaling), found.values
    mem_valid, mem_slots = found.valid, found.slots
    if sinks is not None:  # every sink token, for every query (slots past the memory's capacity)
        sunk = sinks.search(searching, sinks.capacity, gather_keys=query.requires_grad)
        mem_logits = torch.cat([mem_logits, retrieved_logits(searching, sunk, scaling)], dim=3)
        mem_values, mem_valid = torch.cat([mem_values, sunk.values], dim=3), torch.cat([mem_valid, sunk.valid], dim=3)
        mem_slots = torch.cat([mem_slots, sunk.slots + layer.capacity], dim=3)

    keys_all = key.repeat_interleave(groups, dim=1)  # (batch, heads, kv_len, head_dim)
    values_all = value.repeat_interleave(groups, dim=1)
    if attention_mask is None:  # causal: the queries are the last `seq` of the keys
        kv_len = key.shape[2]
        future = torch.ones(seq, kv_len, dtype=torch.bool, device=query.device).triu(kv_len - seq + 1)
        local_bias = torch.zeros(seq, kv_len, dtype=query.dtype, device=query.device).masked_fill(future, float("-inf"))
    else:
        local_bias = attention_mask[..., : key.shape[2]].to(query.dtype)
    biased = mem_logits  # the joint softmax adds each head's learned retrieved-logit bias
    if layer.combine == "joint":
        biased = mem_logits + module.memory_bias[None, :, None, None].to(mem_logits.dtype)
    out, share = memory_attention(
        query * scaling,
        keys_all,
        values_all,
        local_bias,
        biased,
        mem_values.to(query.dtype),
        mem_valid,
        getattr(module, "memory_gate", None),
    )
    layer.retrieved(mem_slots, mem_logits, mem_valid, share)

    _store(layer, memory, sinks, new_keys, value[:, :, -seq:], writes)
    return out.transpose(1, 2).contiguous(), None


def _store(
    layer: LayerMemory,
    memory: KNNMemory,
    sinks: KNNMemory | None,
    keys: torch.Tensor,
    values: torch.Tensor,
    writes: torch.Tensor | bool | None,
) -> None:
    """Write this call's keys and values (batch, kv_heads, seq, head_dim) where `writes` (the
    layer's `call_writes`) says, unless the caller keeps them in a KV cache (False)."""
    if writes is False:
        return
    batch, _, seq, _ = keys.shape
    written = torch.ones(batch, seq, dtype=torch.bool, device=keys.device) if writes is None else writes.to(keys.device)
    if sinks is not None:  # a row's first written tokens fill its sink store, the rest go to memory
        rank = written.long().cumsum(dim=1) - 1
        to_sinks = written & (rank < (sinks.capacity - sinks.fill.to(keys.device))[:, None])
        sinks.add(keys, values, mask=to_sinks)
        layer.sink.expanded, written = None, written & ~to_sinks
    memory.add(keys, values, mask=written)
    layer.expanded = None
