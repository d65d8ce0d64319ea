"""T5 relative position buckets and the learned per-head bias."""

from __future__ import annotations

import math

import torch
from torch import nn


def relative_position_bucket(
    relative_position: torch.Tensor, causal: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """Map `key_position - query_position` to a T5 bucket id.

    Half of the buckets (per direction) hold exact small distances, the rest grow
    logarithmically up to `max_distance`; farther distances share the last bucket.
    With `causal=True` keys after the query (positive relative positions) all fall
    in bucket 0, and every bucket is spent on the past.
    """
    relative_position = relative_position.long()
    buckets = torch.zeros_like(relative_position)
    if causal:
        distance = (-relative_position).clamp(min=0)
    else:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # clamp(min=1) only keeps log() finite where `is_small` already picks the exact bucket.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def segment_distances(query_length: int, cache_length: int, device: torch.device | None = None) -> torch.Tensor:
    """Every `key - query` a segment's queries meet over keys [XL cache ; segment], ascending:
    -(cache_length + query_length - 1) .. query_length - 1, a (cache_length + 2 query_length - 1,)
    long tensor. Entry `query_length - 1 - i + j` is the distance from query i to key j."""
    return torch.arange(-(cache_length + query_length - 1), query_length, device=device)


def segment_relative_positions(
    query_length: int, cache_length: int, device: torch.device | None = None
) -> torch.Tensor:
    """Relative positions `key - query` for queries of a segment over keys [XL cache ; segment].

    Query i of the segment sits at absolute position `cache_length + i`, i.e. it is
    aligned with the *last* `query_length` keys; key j sits at position j. Returns a
    (query_length, cache_length + query_length) long tensor.
    """
    query_pos = torch.arange(query_length, device=device) + cache_length  # (q,)
    key_pos = torch.arange(cache_length + query_length, device=device)  # (k,)
    return key_pos[None, :] - query_pos[:, None]


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head), added to the attention logits."""

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, n_heads)
        nn.init.zeros_(self.embedding.weight)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """buckets (q, k) long -> bias (heads, q, k)."""
        return self.embedding(buckets).permute(2, 0, 1)

    def segment(self, distance_buckets: torch.Tensor, query_length: int) -> torch.Tensor:
        """The bias (heads, q, cache_len + q) of a segment's queries over [XL cache ; segment], from
        the buckets of `segment_distances` (cache_len + 2q - 1,). It depends on key - query alone,
        so it is one bias per distance laid out as a Toeplitz matrix (row i: the window of
        distances starting at -(cache_len + i)): the gradient then sums over a few hundred
        distances, not over every (query, key) pair as an embedding lookup's backward would."""
        keys = distance_buckets.shape[0] - query_length + 1
        per_distance = self.embedding(distance_buckets).T  # (heads, cache_len + 2q - 1)
        return per_distance.unfold(1, keys, 1).flip(1)  # (heads, q, keys): row q - 1 - r is window r
