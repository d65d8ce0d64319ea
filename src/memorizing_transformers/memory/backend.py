"""The search side of a KNNMemory: the data a backend reads, and the interface it implements.

A `KNNMemory` owns the stored keys and values (a ring buffer per row) and asks its backend
for the slots of the top-k entries; the memory gathers the entries itself, so every backend
returns the same `SearchResult`. A backend reads only a `Store` (the stored keys and which
slots hold an entry), never the memory: data in, data out. Backends that keep an index of
their own hear of every write and reset, rebuild it from the store after a load, and give a
backend for rows selected from their store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

BACKENDS = ("exact", "ivf", "faiss_flat", "faiss_ivf")


@dataclass(frozen=True)
class Store:
    """What a search backend reads of a memory."""

    keys: torch.Tensor  # (batch, heads, capacity, head_dim), in the memory's dtype
    valid: torch.Tensor  # (batch, capacity) bool: which slots hold an entry
    extent: int  # slots [extent, capacity) are empty in every row

    # The store's shape: (batch_size, num_heads, capacity, head_dim).
    batch_size = property(lambda self: self.keys.shape[0])
    num_heads = property(lambda self: self.keys.shape[1])
    capacity = property(lambda self: self.keys.shape[2])
    head_dim = property(lambda self: self.keys.shape[3])
    device = property(lambda self: self.keys.device)
    dtype = property(lambda self: self.keys.dtype)

    @property
    def fill(self) -> torch.Tensor:
        """Stored entries per row: (batch,) long."""
        return self.valid.sum(dim=1)

    def select(self, rows: list[int]) -> "Store":
        """The store of these rows alone, cut to the slots they use (a copy of those slots' keys)."""
        index = torch.tensor(rows, device=self.device)
        valid = self.valid.index_select(0, index)  # (len(rows), capacity)
        used = valid.any(dim=0).nonzero()
        extent = int(used.max()) + 1 if used.numel() else 0
        return Store(self.keys[:, :, :extent].index_select(0, index), valid[:, :extent], extent)


class SearchBackend(Protocol):
    def exact_scores(self, store: Store) -> bool:
        """Whether `search` returns the inner products with the stored keys themselves (else the
        memory computes the winners' scores again from its store)."""

    def search(self, store: Store, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k by inner product. queries: (batch, heads, seq, head_dim) on the store's device.

        Returns scores (batch, heads, seq, k) float32, best first, -inf where fewer than k
        entries exist, and slots (batch, heads, seq, k) long into the ring buffer.
        """

    def written(self, store: Store, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """The store has just received entries at (rows[i], slots[i]), replacing what was there."""

    def reset(self, store: Store, rows: torch.Tensor) -> None:
        """The rows of the bool mask `rows` (batch,) have just been emptied."""

    def rebuild(self, store: Store) -> None:
        """The whole store has just been replaced (a load)."""

    def select(self, store: Store, rows: torch.Tensor) -> "SearchBackend":
        """A backend for `store`, which holds rows `rows` (long, may repeat) of this backend's store, in that order
        (KNNMemory.select_rows, as beam search reorders its beams); this backend is left as it was."""


def ivf_lists(store: Store, list_size: int) -> int:
    """The lists of an IVF index over one (row, head) of the store: capacity / list_size."""
    return max(1, store.capacity // list_size)


def ivf_train_size(store: Store, list_size: int) -> int:
    """Keys a row must hold for its IVF lists to be trained (64 a list, as faiss asks), and to be searched through
    them: until then the IVF backends search the row exactly."""
    return min(store.capacity, 64 * ivf_lists(store, list_size))


def search_young(
    backend: SearchBackend, store: Store, queries: torch.Tensor, k: int, young: list[int],
    scores: torch.Tensor, slots: torch.Tensor,
) -> None:  # fmt: skip
    """Search the rows `young` of an index's store with `backend`, into the results scores and slots (batch, heads,
    seq, k). Young rows hold a prefix of their slots (a reset restarts a row at slot 0, and a row that wrapped holds
    enough keys to be indexed): searched alone, over the slots they use."""
    if young:
        rows = torch.tensor(young, device=store.device)
        scores[rows], slots[rows] = backend.search(store.select(young), queries[rows], k)
