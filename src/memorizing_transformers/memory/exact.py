"""Exact top-k search, batched over rows and heads, on the memory's device.

On a CPU, the kernel of cpu_kernel.py multiplies cache-sized tiles and keeps each query's best
k as it goes. Elsewhere (and on a CPU where the kernel cannot be built) the search is PyTorch
ops: inner products block by block with one matmul per block, whole (row, head) pairs over
every stored slot where that fits in a block, else blocks of slots with a running top-k merged
across them, so the (queries x memory) score matrix is never materialised for a large store.
"""

from __future__ import annotations

import math

import torch

from .backend import Store
from .cpu_kernel import topk_kernel

# The largest score block searched at once, in (row-head pairs x queries x slots) elements, on every
# device. On a CPU, cache-sized blocks (2**21, 8 MiB of fp32 scores) were cheaper at one thread, but
# at two, with freed memory kept in malloc's heap (devices.keep_freed_host_memory), the training
# steps of benchmarks.train_step with memory 8K take 0.94-0.96x their time with these, and a 64K
# search's block_topk half (few blocks, few merges): the top-k's cost is per block, not per score.
_BLOCK_ELEMENTS = 1 << 25
_GROUP = 32  # slots per group in block_topk's first cut
_SUBGROUP = 8  # and in its second
# Slot blocks are no narrower than 16k groups: with many queries (a retrofit's window of 512 x 3
# heads) narrower ones cost more in merges than the cache saves (1,536 queries over 32K slots:
# 0.78-0.83x the time of 2**25-element blocks with this floor, 1.12x with 4k groups).
_MIN_BLOCK_GROUPS = 16
# A low-precision block larger than 4 slices of 2**20 key elements is widened to fp32 slice by slice, each
# multiplied while it is in cache, rather than whole: with few queries (generation) the widened copy costs more
# than its product. One token's search of 102,400 bf16 keys in 3 heads took 17 ms widened whole, 8.3 ms in
# slices, on 2 threads (malloc keeping freed memory); the scores are the same to the bit.
_WIDEN_ELEMENTS = 1 << 20
# The CPU kernel's tiles: 256 queries x 2048 slots (2 MiB of scores) per task. At a training step's 64K search (16
# pairs x 256 queries, 64 dims, random keys) these took 227 ms where 128 x 1024 took 241 ms and 64 x 512 280, in one
# process on 2 threads (with a BLAS product per tile: 272, 295 and 338 ms; PyTorch ops took 488 before).
_QUERY_TILE, _SLOT_TILE = 256, 2048


def score_blocks(pairs: int, queries: int, slots: int, k: int, elements: int | None = None) -> tuple[int, int]:
    """How a search of `pairs` (row, head) pairs of `queries` queries over `slots` slots is cut:
    (pairs per block, slots per block), in blocks of at most `elements` scores where the floor on
    slots allows (None: _BLOCK_ELEMENTS). A block holds whole pairs over every slot where one pair's
    scores fit, so each query's top-k is taken once; the running merge across slot blocks (k more
    candidates per query and block, three top-k passes each time) is left to larger stores."""
    if elements is None:
        elements = _BLOCK_ELEMENTS
    per_block = max(1, min(pairs, elements // max(1, queries * slots)))
    chunk = max(k, _MIN_BLOCK_GROUPS * k * _GROUP, elements // (per_block * queries))
    if chunk > _GROUP:
        chunk -= chunk % _GROUP  # whole groups per block, for block_topk
    return per_block, chunk


def _best_groups(scores: torch.Tensor, k: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k groups of `size` consecutive scores with the largest maxima, per row of `scores`
    (rows, width): their scores (rows, k * size) and their group indices (rows, k), in no order."""
    rows, width = scores.shape
    groups = width // size
    grouped = scores.reshape(rows, groups, size)
    best = grouped.amax(dim=-1).topk(k, dim=-1, sorted=False).indices  # (rows, k)
    # The chosen groups' scores, as whole rows of a (rows * groups, size) view: index_select copies
    # each group at once, where a gather with an expanded index reads it score by score (about 18x
    # slower on a CPU for a training step's block).
    first = torch.arange(rows, device=scores.device)[:, None] * groups  # (rows, 1)
    candidates = grouped.reshape(-1, size).index_select(0, (best + first).flatten())  # (rows * k, size)
    return candidates.view(rows, k * size), best


def block_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(scores, k) over the last dim, best first, in three cheaper stages.

    Only the k groups with the largest maxima can hold a top-k entry (a group holding one has
    its maximum >= the k-th score, and at most k - 1 groups have a maximum above it). So the
    scores are cut into groups of 32 and the k best groups kept (k * 32 candidates), those are cut
    into groups of 8 and the k best kept again (k * 8), and the final top-k runs over these
    instead of every slot: on a CPU a top-k's cost grows with the width it searches
    (benchmarks.search times this against torch.topk on the search's blocks). Equal to
    torch.topk up to the order of tied scores.
    """
    *lead, width = scores.shape
    if width % _GROUP or width // _GROUP < 4 * k:
        return scores.topk(k, dim=-1)
    candidates, groups = _best_groups(scores.reshape(-1, width), k, _GROUP)  # (rows, k * 32), (rows, k)
    finalists, subgroups = _best_groups(candidates, k, _SUBGROUP)  # (rows, k * 8), (rows, k)
    values, index = finalists.topk(k, dim=-1)  # (rows, k), into the finalists
    index = subgroups.gather(-1, index // _SUBGROUP) * _SUBGROUP + index % _SUBGROUP  # into the candidates
    slots = groups.gather(-1, index // _GROUP) * _GROUP + index % _GROUP
    return values.view(*lead, k), slots.view(*lead, k)


def _block_scores(queries: torch.Tensor, block: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """queries (pairs, seq, head_dim) in compute_dtype against a block of keys (pairs, c, head_dim): the
    float32 scores (pairs, seq, c), a large block of another dtype widened slice by slice."""
    pairs, slots, dim = block.shape
    if block.dtype == compute_dtype or block.numel() <= 4 * _WIDEN_ELEMENTS:
        return torch.matmul(queries, block.to(compute_dtype).transpose(-1, -2)).float()
    scores = queries.new_empty(pairs, queries.shape[1], slots)
    step = max(_GROUP, _WIDEN_ELEMENTS // (pairs * dim))
    for first in range(0, slots, step):
        piece = block[:, first : first + step].to(compute_dtype).transpose(-1, -2)  # (pairs, head_dim, step)
        torch.matmul(queries, piece, out=scores[:, :, first : first + step])
    return scores.float()


def kernel_search(store: Store, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The search by the CPU kernel, for a store on the CPU; None where the kernel cannot be built."""
    if (kernel := topk_kernel()) is None:
        return None
    batch, heads, seq, _ = queries.shape
    q = queries.float().flatten(0, 1).contiguous()  # (batch * heads, seq, head_dim)
    keys = store.keys.flatten(0, 1)  # (batch * heads, capacity, head_dim)
    full = bool(store.valid[:, : store.extent].all())
    valid = store.valid.new_empty(0) if full else store.valid.contiguous()  # (batch, capacity), or none to read
    # Few (pair, query tile) tasks (a generated token's search) are split along the slots as well, so
    # that every thread has work.
    tasks = batch * heads * math.ceil(seq / _QUERY_TILE)
    chunks = max(1, min(math.ceil(torch.get_num_threads() / tasks), math.ceil(store.extent / _SLOT_TILE)))
    scores, slots = kernel.topk_inner_product(q, keys, valid, heads, store.extent, k, _QUERY_TILE, _SLOT_TILE, chunks)
    return scores.view(batch, heads, seq, k), slots.view(batch, heads, seq, k)


class ExactSearch:
    """Brute-force search over the store itself: no index to keep in sync. `kernel`: on a CPU, search with
    the CPU kernel where it can be built (False: PyTorch ops alone). `block_elements`: the largest score
    block PyTorch ops search at once (None: _BLOCK_ELEMENTS; benchmarks.search compares sizes)."""

    def __init__(self, block_elements: int | None = None, kernel: bool = True) -> None:
        self.block_elements, self.kernel = block_elements, kernel

    def exact_scores(self, store: Store) -> bool:
        return True

    def __repr__(self) -> str:
        options = [f"block_elements={self.block_elements}"] * (self.block_elements is not None)
        return f"ExactSearch({', '.join(options + ['kernel=False'] * (not self.kernel))})"

    def search(self, store: Store, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kernel and store.device.type == "cpu" and (found := kernel_search(store, queries, k)) is not None:
            return found
        batch, heads, seq, _ = queries.shape
        # CPUs without bf16/fp16 matrix units multiply low precision several times slower
        # than fp32: there, blocks are widened to fp32 before the product.
        compute_dtype = torch.float32 if store.device.type == "cpu" else store.dtype
        q = queries.to(compute_dtype).flatten(0, 1)  # (batch * heads, seq, head_dim)
        keys = store.keys.flatten(0, 1)  # (batch * heads, capacity, head_dim)
        pairs, chunk = score_blocks(batch * heads, seq, store.extent, k, self.block_elements)
        best_scores = torch.full((batch * heads, seq, k), float("-inf"), device=store.device)
        best_slots = torch.zeros((batch * heads, seq, k), dtype=torch.long, device=store.device)
        empty = None  # -inf on empty slots, 0 elsewhere: adding it is several times faster than a masked_fill_
        if not bool(store.valid[:, : store.extent].all()):  # the steady state has no slot to mask
            empty = torch.zeros(store.valid.shape, device=store.device).masked_fill_(~store.valid, float("-inf"))
            empty = empty[:, None].expand(batch, heads, -1).flatten(0, 1)[:, None]  # (batch * heads, 1, capacity)
        for first in range(0, batch * heads, pairs):
            group = slice(first, first + pairs)
            for start in range(0, store.extent, chunk):
                stop = min(start + chunk, store.extent)
                scores = _block_scores(q[group], keys[group, start:stop], compute_dtype)  # (pairs, seq, c)
                if empty is not None:
                    scores.add_(empty[group, :, start:stop])
                top_scores, top_slots = block_topk(scores, min(k, stop - start))
                if start == 0 and top_scores.shape[-1] == k:  # the first block fills the top-k
                    best_scores[group], best_slots[group] = top_scores, top_slots
                    continue
                merged_scores = torch.cat([best_scores[group], top_scores], dim=-1)
                merged_slots = torch.cat([best_slots[group], top_slots + start], dim=-1)
                best_scores[group], order = merged_scores.topk(k, dim=-1)
                best_slots[group] = merged_slots.gather(-1, order)
        return best_scores.view(batch, heads, seq, k), best_slots.view(batch, heads, seq, k)

    def written(self, store: Store, rows: torch.Tensor, slots: torch.Tensor) -> None:
        pass

    def reset(self, store: Store, rows: torch.Tensor) -> None:
        pass

    def rebuild(self, store: Store) -> None:
        pass

    def select(self, store: Store, rows: torch.Tensor) -> "ExactSearch":
        return self  # nothing of its own to select
