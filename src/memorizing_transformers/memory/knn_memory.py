"""KNNMemory: a fixed-capacity FIFO store of (key, value) pairs per (batch row, head).

The stored keys and values are addressed by one ring-buffer pointer per row, so
eviction can never desynchronise keys from their values. Search is delegated to a
backend (the interface: `memory/backend.py`), which reads only a `Store` view of the keys:
exact torch search by default, or faiss indices that mirror the store; the memory
gathers the winners either way. `make_backend` is the one way to build a backend by name.
"""

from __future__ import annotations

import copy
import os
from typing import NamedTuple, Sequence

import torch
from einops import rearrange

from .backend import BACKENDS, SearchBackend, Store
from .exact import ExactSearch
from .files import load_memory_file, save_memory_file
from .ivf import IVFSearch


def make_backend(name: str, ivf_list_size: int = 256, ivf_nprobe: int = 16) -> SearchBackend:
    """A backend by name, with every setting a backend takes: "exact" (the CPU kernel or torch), "ivf"
    (memory_size / ivf_list_size k-means lists, ivf_nprobe of them scanned per query by the CPU kernel), "faiss_flat"
    (IndexFlatIP) or "faiss_ivf" (a faiss IVF index, lists and probes as "ivf"). The IVF backends search a row
    exactly until it holds enough keys to train its lists."""
    if name == "exact":
        return ExactSearch()
    if name == "ivf":
        return IVFSearch(ExactSearch(), list_size=ivf_list_size, nprobe=ivf_nprobe)
    if name in ("faiss_flat", "faiss_ivf"):
        from .faiss_search import FaissSearch  # faiss is an optional extra

        return FaissSearch(ExactSearch(), name.removeprefix("faiss_"), list_size=ivf_list_size, nprobe=ivf_nprobe)
    raise ValueError(f"unknown memory backend {name!r}: choose one of {', '.join(BACKENDS)}")


class SearchResult(NamedTuple):
    """Top-k entries per query, best first. Entries with `valid` False are padding."""

    keys: torch.Tensor | None  # (batch, heads, queries, k, head_dim); None when not asked for
    values: torch.Tensor  # (batch, heads, queries, k, head_dim)
    scores: torch.Tensor  # (batch, heads, queries, k) float32 inner products, -inf where invalid
    valid: torch.Tensor  # (batch, heads, queries, k) bool
    slots: torch.Tensor  # (batch, heads, queries, k) long slot index in the ring buffer


class KNNMemory:
    """Per-row, per-head ring buffer of `capacity` (key, value) pairs with top-k search.

    Interface: `add` (write, oldest entries evicted first), `search` (top-k by inner
    product), `reset` (chosen rows), `state_dict`/`load_state_dict`, `save`/`load`.
    Nothing here tracks gradients: stored tensors are always detached.
    """

    def __init__(
        self,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str | SearchBackend = "exact",
        beside: torch.device | str | None = None,
    ) -> None:
        """`backend`: a SearchBackend, or a name given to `make_backend` with its default settings.
        `beside`: the device of the model this memory serves; a memory on the CPU beside a model on
        a GPU keeps its keys and values in pinned host memory, which copies to and from it faster."""
        for name, value in (
            ("batch_size", batch_size),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
            ("capacity", capacity),
        ):
            if value <= 0:
                raise ValueError(f"KNNMemory {name} must be positive, got {value}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"KNNMemory dtype must be float32, bfloat16 or float16, got {dtype}")
        self.batch_size, self.num_heads, self.head_dim, self.capacity = batch_size, num_heads, head_dim, capacity
        self.dtype = dtype
        shape = (batch_size, num_heads, capacity, head_dim)
        on_host = torch.device(device or "cpu").type == "cpu"
        pin_memory = on_host and beside is not None and torch.device(beside).type == "cuda"
        # keys, values: (batch, heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin_memory)
        self.values = torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin_memory)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)  # (batch, capacity)
        self.next_slot = torch.zeros(batch_size, dtype=torch.long, device=device)  # (batch,) ring pointer
        self.extent = 0  # slots [extent, capacity) are empty in every row: search skips them
        self.backend = make_backend(backend) if isinstance(backend, str) else backend

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def store(self) -> Store:
        """What the backend reads: the stored keys and which slots hold an entry."""
        return Store(self.keys, self.valid, self.extent)

    @property
    def fill(self) -> torch.Tensor:
        """Number of stored entries per row: (batch,) long."""
        return self.valid.sum(dim=1)

    def to(self, device: torch.device | str) -> "KNNMemory":
        for name in ("keys", "values", "valid", "next_slot"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def __repr__(self) -> str:
        return (
            f"KNNMemory(batch_size={self.batch_size}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"capacity={self.capacity}, dtype={self.dtype}, backend={self.backend!r}, fill={self.fill.tolist()})"
        )

    # ------------------------------------------------------------------ checks
    def _check_heads(self, name: str, x: torch.Tensor, grouped: bool = False) -> None:
        """x: (batch, heads, seq, head_dim) with this memory's heads, or with `grouped` a multiple of them."""
        heads_fit = x.dim() == 4 and (x.shape[1] % self.num_heads == 0 if grouped else x.shape[1] == self.num_heads)
        if not heads_fit or x.shape[3] != self.head_dim:
            heads = f"a multiple of {self.num_heads}" if grouped else str(self.num_heads)
            raise ValueError(
                f"{name} must have shape (batch, heads={heads}, seq, head_dim={self.head_dim}), got {tuple(x.shape)}"
            )
        if x.shape[0] != self.batch_size:
            raise ValueError(f"{name} have batch size {x.shape[0]} but this memory holds {self.batch_size} rows")

    # ------------------------------------------------------------------ write
    @torch.no_grad()
    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Append (key, value) pairs in sequence order; the oldest entries are overwritten when full.

        keys, values: (batch, heads, seq, head_dim). mask: (batch, seq) bool, False for
        positions that must not be stored (padding). Stored detached, in this memory's dtype.
        """
        self._check_heads("keys", keys)
        if values.shape != keys.shape:
            raise ValueError(f"values must have the shape of keys {tuple(keys.shape)}, got {tuple(values.shape)}")
        batch, _, seq, _ = keys.shape
        if mask is None:
            mask = torch.ones(batch, seq, dtype=torch.bool, device=keys.device)
        if mask.shape != (batch, seq):
            raise ValueError(f"mask must have shape (batch, seq) = {(batch, seq)}, got {tuple(mask.shape)}")
        mask = mask.to(device=self.device, dtype=torch.bool)

        rank = mask.long().cumsum(dim=1) - 1  # (batch, seq): index of each kept token among its row's writes
        count = mask.sum(dim=1)  # (batch,)
        # A write of more than `capacity` tokens keeps only its newest `capacity`:
        # exactly what writing them one by one into the ring would leave, and no two
        # writes hit one slot (index_put_ leaves the winner of a collision undefined).
        keep = mask & (rank >= (count - self.capacity)[:, None])
        rows, tokens = keep.nonzero(as_tuple=True)  # (n,), (n,)
        slots = (self.next_slot[rows] + rank[rows, tokens]) % self.capacity  # (n,) distinct within a row
        self.keys[rows, :, slots] = keys.detach()[rows, :, tokens].to(self.device, self.dtype)
        self.values[rows, :, slots] = values.detach()[rows, :, tokens].to(self.device, self.dtype)
        self.valid[rows, slots] = True
        self.next_slot = (self.next_slot + count) % self.capacity
        if slots.numel():
            self.extent = max(self.extent, int(slots.max()) + 1)
            self.backend.written(self.store, rows, slots)

    @torch.no_grad()
    def reset(self, rows: torch.Tensor | Sequence[int] | None = None) -> None:
        """Empty the chosen rows (all rows when None): a bool mask (batch,) or row indices."""
        if rows is None:
            rows = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        rows = torch.as_tensor(rows, device=self.device)
        if rows.dtype == torch.bool:
            if rows.shape != (self.batch_size,):
                raise ValueError(f"a row mask must have shape ({self.batch_size},), got {tuple(rows.shape)}")
        elif rows.numel() and (rows.min() < 0 or rows.max() >= self.batch_size):
            raise ValueError(f"row indices {rows.tolist()} out of range for a memory of {self.batch_size} rows")
        else:
            rows = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device).index_fill_(0, rows.long(), True)
        self.valid[rows] = False
        self.next_slot[rows] = 0
        self._update_extent()
        self.backend.reset(self.store, rows)

    def _update_extent(self) -> None:
        used = self.valid.any(dim=0).nonzero()
        self.extent = int(used.max()) + 1 if used.numel() else 0

    @torch.no_grad()
    def select_rows(self, index: torch.Tensor | Sequence[int]) -> "KNNMemory":
        """A new memory whose row i is a copy of this memory's row index[i] (rows may repeat):
        what beam search needs to expand memories to its beams and to follow their reordering."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        if index.dim() != 1 or not index.numel():
            raise ValueError(f"row index must be a non-empty 1-D list of rows, got shape {tuple(index.shape)}")
        if int(index.min()) < 0 or int(index.max()) >= self.batch_size:
            raise ValueError(f"row indices {index.tolist()} out of range for a memory of {self.batch_size} rows")
        selected = copy.copy(self)
        selected.batch_size = index.numel()
        for name in ("keys", "values", "valid", "next_slot"):
            setattr(selected, name, getattr(self, name).index_select(0, index))
        selected.backend = self.backend.select(selected.store, index)
        return selected

    # ------------------------------------------------------------------ read
    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, gather_keys: bool = True) -> SearchResult:
        """Top-k stored entries by inner product for each query, per (row, head).

        queries: (batch, heads, seq, head_dim), on any device: the search runs on the memory's, the
        result is on the queries'. With heads = groups x the memory's heads (grouped-query attention),
        the query heads of a group search their key/value head together (query head h reads memory
        head h // groups) and the result is laid out by query head. Returns min(k, capacity) entries per query,
        best first; slots that are empty are never returned as valid. Exact with the
        "exact" and "faiss_flat" backends, approximate with "faiss_ivf". With `gather_keys`
        False the result's keys are None: a caller that needs only the scores (inference: no
        gradient to carry back to the queries) skips gathering them.
        """
        self._check_heads("queries", queries, grouped=True)
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if (groups := queries.shape[1] // self.num_heads) > 1:
            found = self.search(rearrange(queries, "b (h g) s d -> b h (g s) d", g=groups), k, gather_keys)
            return SearchResult(
                *(None if t is None else rearrange(t, "b h (g s) ... -> b (h g) s ...", g=groups) for t in found)
            )
        batch, heads, seq, dim = queries.shape
        k = min(k, self.capacity)
        best_scores, best_slots = self.backend.search(self.store, queries.detach().to(self.device), k)
        valid = torch.isfinite(best_scores)  # (batch, heads, seq, k)

        # Gather the winners from the flattened store: (batch*heads*capacity, head_dim).
        base = (torch.arange(batch * heads, device=self.device) * self.capacity).view(batch, heads, 1, 1)
        out_shape = (batch, heads, seq, k, dim)

        def gather(stored: torch.Tensor) -> torch.Tensor:  # (batch, heads, seq, k, head_dim)
            flat = (base + best_slots).reshape(-1)
            return stored.reshape(-1, dim).index_select(0, flat).view(out_shape).to(queries.dtype)

        keys = None  # gathered only when asked for, or needed to score the winners again
        if not self.backend.exact_scores(self.store):
            # faiss's bf16 / fp16 lists are scored a little off: the winners' scores are computed again
            # from the stored keys, so that every backend reports the same inner products, best first. The
            # slots are put in that order before the values are gathered (an index_select from the store
            # costs about half a gather along k of what has been gathered).
            found_keys = gather(self.keys)
            scores = torch.einsum("bhsd,bhskd->bhsk", queries.detach().float().to(self.device), found_keys.float())
            best_scores, order = scores.masked_fill(~valid, float("-inf")).sort(dim=-1, descending=True, stable=True)
            best_slots, valid = best_slots.gather(3, order), valid.gather(3, order)
        if gather_keys:
            keys = gather(self.keys)
        values = gather(self.values)
        found = SearchResult(keys if gather_keys else None, values, best_scores, valid, best_slots)
        if queries.device == self.device:
            return found
        return SearchResult(*(None if t is None else t.to(queries.device, non_blocking=True) for t in found))

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "valid": self.valid, "next_slot": self.next_slot}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"memory state is missing {missing}")
        for name, target in expected.items():
            if tuple(state[name].shape) != tuple(target.shape):
                raise ValueError(
                    f"memory state {name!r} has shape {tuple(state[name].shape)}, "
                    f"but this memory expects {tuple(target.shape)}"
                )
            target.copy_(state[name].to(target.device, target.dtype))
        self._update_extent()
        self.backend.rebuild(self.store)

    def metadata(self) -> dict[str, str]:
        return {
            "format": "memorizing_transformers.KNNMemory",
            "batch_size": str(self.batch_size),
            "num_heads": str(self.num_heads),
            "head_dim": str(self.head_dim),
            "capacity": str(self.capacity),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file atomically (temporary file, then rename)."""
        save_memory_file(path, self.state_dict(), self.metadata())

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: torch.device | str | None = None, backend: str | SearchBackend = "exact"
    ) -> "KNNMemory":
        """Read a memory written by `save` (its index, if any, is rebuilt); refuses other files."""
        meta, tensors = load_memory_file(path, "memorizing_transformers.KNNMemory", "a KNNMemory file")
        memory = cls(
            int(meta["batch_size"]),
            int(meta["num_heads"]),
            int(meta["head_dim"]),
            int(meta["capacity"]),
            dtype=getattr(torch, meta["dtype"]),
            device=device,
            backend=backend,
        )
        memory.load_state_dict(tensors)
        return memory
