"""Inverted-file (IVF) search on a CPU: k-means lists per (row, head), scanned list by list by the CPU kernel.

Each (row, head) of a memory gets capacity / list_size centroids, trained by k-means when the row first holds
min(capacity, 64 x lists) keys (10 iterations on a sample of 40 keys per list, as faiss trains its IVF indices), and
every stored key belongs to the list of the centroid with which its inner product is largest. A query scans the
`nprobe` lists whose centroids score highest with it. The lists (topk_kernel.cpp's InvertedLists) hold a copy of
their keys, contiguous and in the store's dtype, as a faiss IVF index does, and follow the ring buffer write by
write: a written slot leaves its list and joins its new one. The kernel multiplies each list's keys at once by every
query that probes it, and its scores are the stored keys' own products in float32.

Rows holding fewer keys than training takes are searched by `young_rows` (memory.knn_memory.make_backend gives the
exact search), so a young memory, or one just reset, loses no recall; a reset empties a row's lists and keeps its
centroids. Off the CPU, or where the kernel cannot be built, every row is searched by `young_rows`, and no lists
are kept or trained.
"""

from __future__ import annotations

import copy
import math

import torch

from .backend import SearchBackend, Store, ivf_lists, ivf_train_size, search_young
from .cpu_kernel import topk_kernel

_SLOT_TILE = 2048  # keys of one list multiplied at once
_SAMPLE_PER_LIST, _ITERATIONS = 40, 10  # k-means' training sample and iterations, faiss's defaults
_NEAREST_BLOCK = 1 << 24  # scores of points against centroids taken at once


def nearest(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The centroid (groups, count, dim) with the largest inner product with each point (groups, n, dim): (groups, n)
    long, the scores taken a block of points at a time (a 1M-key row's against 4,096 centroids would be 16 GiB)."""
    groups, n, _ = points.shape
    block = max(1, _NEAREST_BLOCK // (groups * centroids.shape[1]))
    return torch.cat(
        [
            torch.matmul(points[:, first : first + block].float(), centroids.transpose(1, 2)).argmax(dim=-1)
            for first in range(0, n, block)
        ],
        dim=1,
    )


def kmeans(points: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` centroids per group of points (groups, n, dim), assigning each point by largest inner product, as
    faiss's IVF training does for inner-product indices: (groups, count, dim) float32. Written here, a few lines of
    torch, so that this backend does not need the optional faiss."""
    groups, n, dim = points.shape
    points = points.float()
    if n > _SAMPLE_PER_LIST * count:
        points = points[:, torch.randperm(n, generator=generator)[: _SAMPLE_PER_LIST * count]]
    centroids = points[:, torch.randperm(points.shape[1], generator=generator)[:count]].clone()  # (groups, count, dim)
    for _ in range(_ITERATIONS):
        owner = nearest(points, centroids)  # (groups, n)
        sums = torch.zeros_like(centroids).scatter_add_(1, owner[..., None].expand(-1, -1, dim), points)
        counts = torch.zeros(groups, count).scatter_add_(1, owner, torch.ones(owner.shape))[..., None]
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)  # an empty list keeps its centroid
    return centroids


class IVFSearch:
    """k-means lists per (row, head) searched by the CPU kernel; `young_rows` searches the rows not indexed yet."""

    def __init__(self, young_rows: SearchBackend, list_size: int = 256, nprobe: int = 16) -> None:
        if list_size <= 0 or nprobe <= 0:
            raise ValueError(f"ivf list_size and nprobe must be positive, got {list_size} and {nprobe}")
        self.young_rows, self.list_size, self.nprobe = young_rows, list_size, nprobe
        self.centroids: torch.Tensor | None = None  # (batch, heads, lists, head_dim) float32
        self.trained: torch.Tensor | None = None  # (batch,) bool: rows whose centroids are trained
        self.index = None  # the kernel's InvertedLists, one set per (row, head) pair; None without the kernel
        self.shape: tuple | None = None  # the _key of the store the state is for

    def __repr__(self) -> str:
        return f"IVFSearch(list_size={self.list_size}, nprobe={self.nprobe})"

    def exact_scores(self, store: Store) -> bool:
        return True

    def train_size(self, store: Store) -> int:
        return ivf_train_size(store, self.list_size)

    def _key(self, store: Store) -> tuple:
        """What the state is for: the store's shape, dtype and device, and the list size."""
        return (*store.keys.shape, store.dtype, store.device, self.list_size)

    def _ensure(self, store: Store) -> None:
        batch, heads, capacity, dim = store.keys.shape
        if self.shape != self._key(store):
            self.shape = self._key(store)
            self.centroids = torch.zeros(batch, heads, ivf_lists(store, self.list_size), dim, device=store.device)
            self.trained = torch.zeros(batch, dtype=torch.bool, device=store.device)
            kernel = topk_kernel() if store.device.type == "cpu" else None
            lists = (batch * heads, ivf_lists(store, self.list_size), capacity, dim, store.dtype)
            self.index = kernel.InvertedLists(*lists) if kernel is not None else None

    def _file(self, store: Store, row: int, slots: torch.Tensor) -> None:
        """File a trained row's keys at `slots` (n,) in the lists of their nearest centroids."""
        keys = store.keys[row][:, slots]  # (heads, n, head_dim)
        lists = nearest(keys, self.centroids[row])  # (heads, n)
        heads = store.num_heads
        pairs = (row * heads + torch.arange(heads))[:, None].expand(-1, len(slots))  # (heads, n)
        self.index.assign(pairs.flatten(), slots.expand(heads, -1).flatten(), lists.flatten(), keys.flatten(0, 1))

    def _train(self, store: Store, row: int) -> None:
        """Train a row's centroids on its stored keys, and file every key in its list."""
        slots = store.valid[row].nonzero().squeeze(1)  # (n,)
        generator = torch.Generator().manual_seed(row)  # the same keys give the same lists
        self.centroids[row] = kmeans(store.keys[row][:, slots].cpu(), ivf_lists(store, self.list_size), generator).to(
            store.device
        )
        self.trained[row] = True
        self._clear(store, row)
        self._file(store, row, slots)

    def _clear(self, store: Store, row: int) -> None:
        self.index.clear(row * store.num_heads + torch.arange(store.num_heads))

    def written(self, store: Store, rows: torch.Tensor, slots: torch.Tensor) -> None:
        self._ensure(store)
        if self.index is None:  # no kernel: every row is searched by young_rows, no lists kept or trained
            return
        for row in rows.unique().tolist():
            if self.trained[row]:
                self._file(store, row, slots[rows == row])
            elif int(store.valid[row].sum()) >= self.train_size(store):
                self._train(store, row)

    def reset(self, store: Store, rows: torch.Tensor) -> None:
        self._ensure(store)
        if self.index is None:
            return
        for row in rows.nonzero().squeeze(1).tolist():
            self._clear(store, row)  # the rows keep their centroids

    def rebuild(self, store: Store) -> None:
        self.shape = None  # new state, trained on the store loaded
        self._ensure(store)
        if self.index is None:
            return
        for row in (store.fill >= self.train_size(store)).nonzero().squeeze(1).tolist():
            self._train(store, row)

    def select(self, store: Store, rows: torch.Tensor) -> "IVFSearch":
        """The selected rows keep their centroids and lists (copied): no k-means, no key filed again."""
        selected = copy.copy(self)
        if self.index is None:  # no lists to copy: the state is made for the new store on first use
            selected.shape = None
            return selected
        selected.shape = self._key(store)
        selected.centroids = self.centroids.index_select(0, rows.to(self.centroids.device))
        selected.trained = self.trained.index_select(0, rows.to(self.trained.device))
        heads = store.num_heads
        selected.index = self.index.select((rows.cpu()[:, None] * heads + torch.arange(heads)).flatten())
        return selected

    def search(self, store: Store, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._ensure(store)
        indexed = self.trained & (store.fill >= self.train_size(store))  # (batch,)
        if self.index is None or not bool(indexed.any()):
            return self.young_rows.search(store, queries, k)
        batch, heads, seq, _ = queries.shape
        q = queries.float()  # (batch, heads, seq, head_dim)
        probes = (
            torch.matmul(q, self.centroids.transpose(-1, -2))
            .topk(min(self.nprobe, ivf_lists(store, self.list_size)))
            .indices
        )
        probes[~indexed] = -1  # young rows probe nothing here: they are searched below
        # Few (row, head) pairs (batch 1) are split along the lists as well, so that every thread has work.
        chunks = max(1, min(math.ceil(torch.get_num_threads() / (batch * heads)), ivf_lists(store, self.list_size)))
        scores, slots = self.index.search(q.flatten(0, 1).contiguous(), probes.flatten(0, 1), k, _SLOT_TILE, chunks)
        scores, slots = scores.view(batch, heads, seq, k), slots.view(batch, heads, seq, k)
        search_young(self.young_rows, store, queries, k, (~indexed).nonzero().squeeze(1).tolist(), scores, slots)
        return scores, slots
