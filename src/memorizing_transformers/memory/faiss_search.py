"""faiss indices that mirror a KNNMemory's ring buffer, one per (row, head).

Each index holds the row's valid keys for one head, with the ring-buffer slot as the
faiss id. A write first removes the ids of the slots it overwrites and then adds the
new keys under the same ids, so the index always holds exactly the store's entries:
FIFO eviction never desynchronises ids, and there is no periodic wipe. faiss offers no
batched search over many indices, hence the loop over (row, head); each call searches
all of a segment's queries at once and runs multi-threaded inside faiss.

kinds:
- "flat": IndexFlatIP behind IndexIDMap2, exact;
- "ivf": an inverted-file index (inner product) with capacity / list_size lists, `nprobe`
  of them searched per query. Its lists hold the keys themselves (not residuals) in half
  precision, IndexIVFScalarQuantizer codes: a bf16 or fp16 store's keys byte for byte, a
  float32 store's rounded to fp16 (`half_lists`; scanning half the bytes halves the search,
  and on a trained model's keys at 64K recall@32 moved from 0.986 to 0.983). The memory
  scores the winners again from its store, so the scores it reports are exact. Its coarse
  quantizer is trained, once per (row, head), when that row first holds min(capacity,
  64 x lists) keys (k-means, 10 iterations on a sample of 40 keys per list). A row holding
  fewer keys than that is searched by the backend given as `young_rows`
  (memory.knn_memory.make_backend gives the exact torch search), so a young memory, or one
  just reset, loses no recall. A reset empties the lists and keeps the trained quantizer.
faiss computes in float32 on the CPU: queries are copied to the host and results back.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

try:
    import faiss
except ImportError as error:  # pragma: no cover - faiss is an optional extra
    raise ImportError(
        "the faiss memory backends need faiss: pip install 'memorizing-transformers[faiss]' (or faiss-cpu)"
    ) from error

from .backend import SearchBackend, Store, ivf_lists, ivf_train_size, search_young


class FaissSearch:
    """faiss indices per (row, head); `young_rows` searches the rows an IVF index cannot serve yet."""

    def __init__(
        self,
        young_rows: SearchBackend,
        kind: str = "ivf",
        list_size: int = 256,
        nprobe: int = 16,
        half_lists: bool = True,
    ) -> None:
        if kind not in ("flat", "ivf"):
            raise ValueError(f"faiss index kind must be 'flat' or 'ivf', got {kind!r}")
        if list_size <= 0 or nprobe <= 0:
            raise ValueError(f"ivf list_size and nprobe must be positive, got {list_size} and {nprobe}")
        self.kind, self.list_size, self.nprobe, self.young_rows = kind, list_size, nprobe, young_rows
        self.half_lists = half_lists  # float32 stores' IVF lists in fp16 (else IndexIVFFlat, exact scores)
        self.indices: list[list[faiss.Index] | None] = []  # [row][head]; None: an IVF row not trained yet

    def __repr__(self) -> str:
        extra = f", list_size={self.list_size}, nprobe={self.nprobe}, half_lists={self.half_lists}"
        extra = extra if self.kind == "ivf" else ""
        return f"FaissSearch(kind={self.kind!r}{extra})"

    def _codes(self, store: Store) -> torch.dtype:
        """The dtype of an IVF index's lists."""
        return torch.float16 if store.dtype == torch.float32 and self.half_lists else store.dtype

    def exact_scores(self, store: Store) -> bool:
        """Flat indices and float32 IVF lists score the stored keys in float32; bf16 / fp16 codes
        are scored by faiss's scalar-quantizer kernels, a little off the stored keys' products."""
        return self.kind == "flat" or self._codes(store) == torch.float32

    def train_size(self, store: Store) -> int:
        return ivf_train_size(store, self.list_size)

    def _ensure(self, store: Store) -> None:
        if len(self.indices) != store.batch_size:
            self.indices = [self._flat(store) if self.kind == "flat" else None for _ in range(store.batch_size)]

    @staticmethod
    def _flat(store: Store) -> list[faiss.Index]:
        return [faiss.IndexIDMap2(faiss.IndexFlatIP(store.head_dim)) for _ in range(store.num_heads)]

    def _ivf(self, store: Store) -> faiss.Index:
        """An untrained IVF index whose lists hold keys in `_codes`' dtype."""
        quantizer, dim, lists = faiss.IndexFlatIP(store.head_dim), store.head_dim, ivf_lists(store, self.list_size)
        if self._codes(store) == torch.float32:
            return faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        codes = {torch.bfloat16: faiss.ScalarQuantizer.QT_bf16, torch.float16: faiss.ScalarQuantizer.QT_fp16}
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, lists, codes[self._codes(store)], faiss.METRIC_INNER_PRODUCT
        )
        index.by_residual = False  # store the keys themselves: bit-identical to a half-precision store's
        return index

    @staticmethod
    def _host(x: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())

    def _host_keys(self, store: Store, keys: torch.Tensor) -> np.ndarray:
        """Keys for the indices, as float32 on the host; those bound for fp16 lists kept inside fp16's
        range (a key past it would be coded as inf: clamped, it is still found, and scored from the store)."""
        if self.kind == "ivf" and self._codes(store) == torch.float16:
            limit = torch.finfo(torch.float16).max
            keys = keys.clamp(-limit, limit)
        return self._host(keys)

    def _train(self, store: Store, row: int) -> None:
        """Give a row IVF indices trained on, and holding, its stored keys."""
        slots = store.valid[row].nonzero().squeeze(1)  # (n,)
        keys = store.keys[row][:, slots]  # (heads, n, head_dim)
        indices = []
        for head in range(store.num_heads):
            data = self._host_keys(store, keys[head])
            index = self._ivf(store)
            index.cp.niter, index.cp.max_points_per_centroid = 10, 40  # k-means on a fixed-seed sample
            index.train(data)
            index.nprobe = self.nprobe
            index.add_with_ids(data, slots.cpu().numpy())
            indices.append(index)
        self.indices[row] = indices

    def _add(self, store: Store, row: int, slots: torch.Tensor) -> None:
        ids = slots.cpu().numpy()
        keys = store.keys[row][:, slots.to(store.device)]  # (heads, n, head_dim)
        for head, index in enumerate(self.indices[row]):
            index.remove_ids(faiss.IDSelectorBatch(ids))  # the overwritten entries, if any
            index.add_with_ids(self._host_keys(store, keys[head]), ids)

    def written(self, store: Store, rows: torch.Tensor, slots: torch.Tensor) -> None:
        self._ensure(store)
        rows, slots = rows.cpu(), slots.cpu()
        for row in rows.unique().tolist():
            if self.indices[row] is not None:
                self._add(store, row, slots[rows == row])
            elif int(store.valid[row].sum()) >= self.train_size(store):
                self._train(store, row)

    def reset(self, store: Store, rows: torch.Tensor) -> None:
        self._ensure(store)
        for row in rows.nonzero().squeeze(1).tolist():
            for index in self.indices[row] or ():
                index.reset()  # an IVF index keeps its trained quantizer

    def rebuild(self, store: Store) -> None:
        self.indices = []
        self._ensure(store)
        for row in range(store.batch_size):
            if self.kind == "flat":
                self._add(store, row, store.valid[row].nonzero().squeeze(1))
            elif int(store.valid[row].sum()) >= self.train_size(store):
                self._train(store, row)

    def select(self, store: Store, rows: torch.Tensor) -> "FaissSearch":
        selected = copy.copy(self)  # its indices are built anew from the selected rows' keys
        selected.rebuild(store)
        return selected

    def search(self, store: Store, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._ensure(store)
        batch, heads, seq, _ = queries.shape
        if self.kind == "flat":
            indexed = list(range(batch))
        else:  # a row holding fewer keys than it takes to train its lists is searched by young_rows
            enough = (store.fill >= self.train_size(store)).tolist()
            indexed = [row for row in range(batch) if self.indices[row] is not None and enough[row]]
        if not indexed:
            return self.young_rows.search(store, queries, k)
        scores_t = torch.empty((batch, heads, seq, k), device=store.device)
        slots_t = torch.empty((batch, heads, seq, k), dtype=torch.long, device=store.device)
        search_young(
            self.young_rows, store, queries, k, [row for row in range(batch) if row not in indexed], scores_t, slots_t
        )
        host = self._host(queries[indexed])
        for i, row in enumerate(indexed):
            for head in range(heads):
                scores, ids = self.indices[row][head].search(host[i, head], k)
                ids_t = torch.from_numpy(ids)
                missing = ids_t < 0  # faiss pads with id -1 when fewer than k entries are found
                scores_t[row, head] = torch.from_numpy(scores).masked_fill_(missing, float("-inf")).to(store.device)
                slots_t[row, head] = ids_t.clamp_(min=0).to(store.device)
        return scores_t, slots_t
