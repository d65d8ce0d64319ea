"""Attention: local causal attention over [XL cache ; segment], and the kNN-augmented variant.

Per head, queries and keys are normalised to unit length and a learned per-head
scale is the softmax temperature, so keys written to the memory long ago stay
comparable with today's queries. Local attention adds the T5 relative position
bias. Retrieved memories, whose distances are not kept, get the bias of the farthest
bucket: the one full attention gives every key `max_distance` or more back, which a
memory entry is whenever the XL cache is at least `max_distance` long (the joint softmax;
in the gated combination, a constant per head, it would cancel in the memory's own softmax).
In a memory layer the order is fixed:
retrieve -> attend and combine -> write the segment's keys/values (or, with
`memory_writes="evicted"`, those that leave the XL cache as the segment enters it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import MemorizingConfig
from ..memory.knn_memory import KNNMemory, SearchResult
from .positions import RelativePositionBias
from .state import MemorizingState, XLCache


def joint_probs(
    local_logits: torch.Tensor, mem_logits: torch.Tensor, mem_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over the local logits (batch, heads, seq, keys) and the retrieved ones
    (batch, heads, seq, k), invalid entries excluded; the probabilities split back in two."""
    logits = torch.cat([local_logits, mem_logits.masked_fill(~mem_valid, float("-inf"))], dim=-1)
    probs = torch.softmax(logits.float(), dim=-1).to(local_logits.dtype)
    return probs.split([local_logits.shape[-1], mem_logits.shape[-1]], dim=-1)


def retrieved_logits(queries: torch.Tensor, found: SearchResult, scale: torch.Tensor | float) -> torch.Tensor:
    """The retrieved entries' logits: queries (batch, heads, seq, head_dim), the ones searched with,
    against the keys found, times `scale` (a float, or broadcastable to (batch, heads, seq, k)).
    Returns (batch, heads, seq, k). From the keys when the search gathered them, so that the
    queries get their gradient; else (`gather_keys=False`, at inference) from the search's own
    scores, the same inner products in float32, 0 where no entry was found."""
    if found.keys is None:
        return found.scores.masked_fill(~found.valid, 0.0).to(queries.dtype) * scale
    return torch.einsum("bhsd,bhskd->bhsk", queries, found.keys.to(queries.dtype)) * scale


def memory_readout(mem_logits: torch.Tensor, mem_values: torch.Tensor, mem_valid: torch.Tensor) -> torch.Tensor:
    """A separate softmax over the retrieved entries: empty ones get probability 0, and a
    query with no valid entry gets a zero output. Returns (batch, heads, seq, head_dim)."""
    probs = (
        torch.softmax(mem_logits.float().masked_fill(~mem_valid, torch.finfo(torch.float32).min), dim=-1) * mem_valid
    )
    return torch.einsum("bhtk,bhtkd->bhtd", probs.to(mem_values.dtype), mem_values)


def local_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q keys^T + bias) values: q (batch, heads, seq, head_dim), already scaled; keys, values
    (batch, heads, kv_len, head_dim); bias additive, broadcastable to (batch, heads, seq, kv_len), -inf
    where not allowed, with at least one key allowed per query. Returns (batch, heads, seq, head_dim).

    PyTorch's fused CPU kernel takes no mask that needs a gradient (a learned position bias, in
    training); its fallback then adds a pass that zeroes rows with no allowed key, which callers
    never have, and runs its products slower. There the product is written out; elsewhere
    scaled_dot_product_attention."""
    if q.device.type == "cpu" and bias.requires_grad and torch.is_grad_enabled():
        return torch.matmul(torch.softmax(torch.matmul(q, keys.transpose(-1, -2)) + bias, dim=-1), values)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=1.0)


def gate_share(memory_gate: torch.Tensor, mem_valid: torch.Tensor) -> torch.Tensor:
    """sigmoid(memory_gate) per head, 0 where nothing valid was retrieved: (batch, heads, seq, 1)."""
    return torch.sigmoid(memory_gate)[None, :, None, None] * mem_valid.any(dim=-1, keepdim=True)


def memory_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    local_bias: torch.Tensor,
    mem_logits: torch.Tensor,
    mem_values: torch.Tensor,
    mem_valid: torch.Tensor,
    memory_gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory-attention kernel, shared by our layers and the retrofit of pretrained models:
    local attention over `keys`/`values` combined with the entries retrieved from a kNN memory.

    q: (batch, heads, seq, head_dim), already scaled; keys, values: (batch, heads, kv_len, head_dim);
    local_bias: additive, broadcastable to (batch, heads, seq, kv_len) (-inf where not allowed);
    mem_logits: (batch, heads, seq, k) the retrieved entries' logits, scaled and biased as the
    caller's combination wants; mem_values: (batch, heads, seq, k, head_dim); mem_valid:
    (batch, heads, seq, k) bool. With `memory_gate` (heads,), the paper's gate: a separate softmax
    over the retrieved entries mixed per head by sigmoid(memory_gate) (0 where nothing valid was
    retrieved); without, one joint softmax over local and retrieved entries. Returns the output
    (batch, heads, seq, head_dim) and the share of each query's output that came from memory
    (batch, heads, seq): the gate, or the retrieved entries' softmax mass.
    """
    if memory_gate is not None:
        local = local_attention(q, keys, values, local_bias)
        gate = gate_share(memory_gate, mem_valid)
        return gate * memory_readout(mem_logits, mem_values, mem_valid) + (1 - gate) * local, gate.squeeze(-1)
    local_logits = torch.matmul(q, keys.transpose(-1, -2)) + local_bias  # (batch, heads, seq, kv_len)
    local_probs, mem_probs = joint_probs(local_logits, mem_logits, mem_valid)
    out = torch.matmul(local_probs, values) + torch.einsum("bhtk,bhtkd->bhtd", mem_probs, mem_values)
    return out, mem_probs.sum(dim=-1)


class Retrieved(nn.Module):
    """What a memory layer retrieved, passed through this module (which does nothing with it) so
    that a forward hook can see it: `record()` collects it call by call (the inspector does)."""

    def forward(self, slots: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor, share: torch.Tensor) -> None:
        """slots, logits, valid: (batch, heads, seq, k) the retrieved entries' slots, their logits
        and which are valid; share: (batch, heads, seq) the share of the output from memory."""

    @contextmanager
    def record(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Within this block, every call's retrieval is appended to the list yielded (on the CPU,
        logits and share in float32)."""
        records: list[dict[str, torch.Tensor]] = []

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: None) -> None:
            slots, logits, valid, share = (t.detach().cpu() for t in args)
            records.append({"slots": slots, "logits": logits.float(), "valid": valid, "share": share.float()})

        handle = self.register_forward_hook(hook)
        try:
            yield records
        finally:
            handle.remove()


class Attention(nn.Module):
    """Multi-head attention with T5 bias and an XL cache; with `use_memory`, also a kNN memory. With
    n_kv_heads below n_heads, each key/value head (in the cache and the memory too) serves a group of
    n_heads / n_kv_heads query heads: query head h reads key/value head h // groups."""

    def __init__(self, config: MemorizingConfig, use_memory: bool = False) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.eps = config.qk_norm_eps
        self.knn_k = config.knn_k
        self.combine = config.memory_combine
        self.memory_writes, self.xl_length = config.memory_writes, config.xl_length
        inner = config.n_heads * config.head_dim
        self.qkv = nn.Linear(config.d_model, inner + 2 * config.kv_heads * config.head_dim, bias=False)
        self.out = nn.Linear(inner, config.d_model, bias=False)
        self.log_scale = nn.Parameter(torch.full((config.n_heads,), math.log(config.initial_qk_scale)))
        self.position_bias = RelativePositionBias(config.n_heads, config.num_buckets, config.max_distance)
        self.use_memory = use_memory
        if use_memory:
            self.retrieved = Retrieved()  # hooks see what the layer retrieves (see evaluation/inspect.py)
        self.xl_compression = config.xl_compression
        if config.xl_compression:
            # (slots, xl_length) projections of the cache's keys and values along its length;
            # the newest cache entries meet the last columns, so a short cache uses the tail.
            self.compress_keys = nn.Parameter(
                torch.randn(config.xl_compression, config.xl_length) / math.sqrt(config.xl_length)
            )
            self.compress_values = nn.Parameter(
                torch.randn(config.xl_compression, config.xl_length) / math.sqrt(config.xl_length)
            )
        if use_memory and config.memory_qk_scale_init is not None:
            self.memory_log_scale = nn.Parameter(torch.full((config.n_heads,), math.log(config.memory_qk_scale_init)))
        if use_memory and self.combine == "gate":
            # g = sigmoid(memory_gate): the share of memory in each head's output (0.5 at the paper's init).
            self.memory_gate = nn.Parameter(torch.full((config.n_heads,), config.memory_gate_init))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        # Weights saved by earlier versions call the gate `gate_bias`.
        if prefix + "gate_bias" in state_dict:
            state_dict[prefix + "memory_gate"] = state_dict.pop(prefix + "gate_bias")
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(
        self,
        x: torch.Tensor,
        buckets: torch.Tensor,
        allowed: torch.Tensor,
        token_mask: torch.Tensor,
        state: MemorizingState,
        layer: int,
        global_tokens: tuple[XLCache | None, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One segment through the layer.

        x: (batch, seq, d_model). buckets: (cache_len + 2 seq - 1,) T5 buckets of the distances
        key - query in the segment, ascending (positions.segment_distances).
        allowed: (batch or 1, 1, seq, cache_len + seq) bool, which keys each query may attend.
        token_mask: (batch, seq) bool, False at padding (never written to memory).
        state, layer: the stream state, which gives this layer its XL cache and memory and keeps
        the segment's keys and values.
        global_tokens: the stored global tokens (an XLCache of global_tokens slots, or None),
        their T5 buckets (batch, seq, slots) and which queries attend each (batch, 1, 1, slots).
        Returns the output (batch, seq, d_model) and this segment's normalised keys and
        values (batch, kv_heads, seq, head_dim) for the XL cache.
        """
        memory = state.memories.get(layer)
        if self.use_memory and memory is None:
            raise ValueError("this attention layer has a kNN memory but the state holds none for it")
        q, k, v = (
            rearrange(t, "b t (h d) -> b h t d", d=self.head_dim)
            for t in self.qkv(x).split([self.n_heads * self.head_dim, *2 * [self.kv_heads * self.head_dim]], dim=-1)
        )
        q = F.normalize(q, dim=-1, eps=self.eps)  # (batch, heads, seq, head_dim)
        k = F.normalize(k, dim=-1, eps=self.eps)  # (batch, kv_heads, seq, head_dim), as v
        q_scaled = q * self.log_scale.exp()[None, :, None, None]
        keys, values, key_mask = state.update(layer, k, v, token_mask)  # [XL cache ; segment]
        cached = (keys, values, key_mask)  # what evicted writes read, before compression or global tokens
        cache_len = keys.shape[2] - k.shape[2]
        bias = self.position_bias.segment(buckets, q.shape[2])[None].to(q.dtype)  # (1, heads, seq, cache_len + seq)
        local_bias = bias.masked_fill(~allowed, float("-inf"))  # (batch or 1, heads, seq, cache_len + seq)
        if self.xl_compression and cache_len:
            keys, values, local_bias = self._compress_cache(keys, values, key_mask, cache_len, local_bias)
        if global_tokens is not None and global_tokens[0] is not None:
            store, global_buckets, global_allowed = global_tokens
            global_bias = (
                self.position_bias.embedding(global_buckets).permute(0, 3, 1, 2).to(q.dtype)
            )  # (batch, heads, seq, slots)
            local_bias = torch.cat(
                [
                    global_bias.masked_fill(~global_allowed, float("-inf")),
                    local_bias.expand(global_bias.shape[0], -1, -1, -1),
                ],
                dim=-1,
            )
            keys = torch.cat([store.keys.to(k.dtype), keys], dim=2)
            values = torch.cat([store.values.to(v.dtype), values], dim=2)
        if (groups := self.n_heads // self.kv_heads) > 1:  # each query head its group's key/value head
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)

        if not self.use_memory:
            out = local_attention(q_scaled, keys, values, local_bias)
        else:
            # Retrieve before writing: a query never sees its own segment in memory.
            found = memory.search(q, self.knn_k, gather_keys=q.requires_grad)  # (batch, heads, seq, k, ...)
            own_scale = getattr(self, "memory_log_scale", None)  # (heads,) a temperature of the memory's own
            log_scale = self.log_scale if own_scale is None else own_scale
            mem_logits = retrieved_logits(q, found, log_scale.exp()[None, :, None, None])  # (batch, heads, seq, k)
            if self.combine != "gate":  # in the gate's separate softmax this bias, a constant per head, would cancel
                mem_logits = mem_logits + self.position_bias.embedding.weight[-1].to(q.dtype)[None, :, None, None]
            out, share = memory_attention(
                q_scaled,
                keys,
                values,
                local_bias,
                mem_logits,
                found.values,
                found.valid,
                getattr(self, "memory_gate", None),
            )
            self.retrieved(found.slots, mem_logits, found.valid, share)
            self._write(memory, *cached, k.shape[2])
        return self.out(rearrange(out, "b h t d -> b t (h d)")), k.detach(), v.detach()

    def _compress_cache(
        self, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor, cache_len: int, local_bias: torch.Tensor
    ):
        """The XL cache's entries (the first `cache_len` of keys/values (batch, heads, cache_len + seq,
        head_dim)) projected along their length to `xl_compression` slots (padding and reset rows
        contribute nothing), then the segment's own keys and values. Every query may see every
        slot: all of them hold only the past. Slots get no position bias. Returns keys, values
        and the additive mask for them."""
        cached = key_mask[:, :cache_len]  # (batch, cache_len)
        valid = cached[:, None, :, None].to(keys.dtype)  # (batch, 1, cache_len, 1)
        slot_keys = torch.einsum(
            "rm,bhmd->bhrd", self.compress_keys[:, -cache_len:].to(keys.dtype), keys[:, :, :cache_len] * valid
        )
        slot_values = torch.einsum(
            "rm,bhmd->bhrd", self.compress_values[:, -cache_len:].to(values.dtype), values[:, :, :cache_len] * valid
        )
        local_bias = local_bias.expand(keys.shape[0], -1, -1, -1)  # a mask shared by the batch comes as one row
        seq, slots = keys.shape[2] - cache_len, self.xl_compression
        any_past = cached.any(dim=1)[:, None, None, None]  # (batch, 1, 1, 1): a reset row has no past
        slot_bias = torch.zeros(1, 1, seq, slots, dtype=local_bias.dtype, device=keys.device).masked_fill(
            ~any_past, float("-inf")
        )
        local_bias = torch.cat(
            [slot_bias.expand(local_bias.shape[0], local_bias.shape[1], -1, -1), local_bias[..., cache_len:]], dim=-1
        )
        segment = slice(cache_len, None)
        return (
            torch.cat([slot_keys, keys[:, :, segment]], dim=2),
            torch.cat([slot_values, values[:, :, segment]], dim=2),
            local_bias,
        )

    def _write(
        self, memory: KNNMemory, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor, seq: int
    ) -> None:
        """Write the segment's keys/values (the last `seq` of [XL cache ; segment], (batch, heads,
        cache_len + seq, head_dim)), or what leaves the XL cache as the segment enters it."""
        if self.memory_writes == "segment":
            memory.add(keys[:, :, -seq:], values[:, :, -seq:], mask=key_mask[:, -seq:])
            return
        leaving = keys.shape[2] - self.xl_length  # the oldest of [cache ; segment] beyond the cache's length
        if leaving > 0:
            memory.add(keys[:, :, :leaving], values[:, :, :leaving], mask=key_mask[:, :leaving])
