"""The search side of a KNNMemory: one small interface, several implementations.

A `KNNMemory` owns the stored keys and values (a ring buffer per row) and asks its
backend for the slots of the top-k entries; the memory gathers the entries itself, so
every backend returns the same `SearchResult`. Backends that keep an index of their own
hear of every write and reset, and rebuild it from the store after a load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from .knn_memory import KNNMemory

BACKENDS = ("exact", "faiss_flat", "faiss_ivf")


class SearchBackend(Protocol):
    def exact_scores(self, memory: "KNNMemory") -> bool:
        """Whether `search` returns the inner products with the stored keys themselves (else the
        memory computes the winners' scores again from its store)."""

    def search(self, memory: "KNNMemory", queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k by inner product. queries: (batch, heads, seq, head_dim) on the memory's device.

        Returns scores (batch, heads, seq, k) float32, best first, -inf where fewer than k
        entries exist, and slots (batch, heads, seq, k) long into the ring buffer.
        """

    def written(self, memory: "KNNMemory", rows: torch.Tensor, slots: torch.Tensor) -> None:
        """`memory` has just stored entries at (rows[i], slots[i]), replacing what was there."""

    def reset(self, memory: "KNNMemory", rows: torch.Tensor) -> None:
        """The rows of the bool mask `rows` (batch,) have just been emptied."""

    def rebuild(self, memory: "KNNMemory") -> None:
        """The whole store has just been replaced (a load)."""


def make_backend(name: str, ivf_list_size: int = 256, ivf_nprobe: int = 16) -> SearchBackend:
    """A backend by name: "exact" (torch), "faiss_flat" (IndexFlatIP) or "faiss_ivf" (IVF, lists in the store's dtype)."""
    if name == "exact":
        from .exact import ExactSearch

        return ExactSearch()
    if name in ("faiss_flat", "faiss_ivf"):
        from .faiss_search import FaissSearch

        return FaissSearch(name.removeprefix("faiss_"), list_size=ivf_list_size, nprobe=ivf_nprobe)
    raise ValueError(f"unknown memory backend {name!r}: choose one of {', '.join(BACKENDS)}")
