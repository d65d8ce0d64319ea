"""Batches of long documents for a model with memory (SPEC section 2).

Each batch row is pinned to one document and streams its segments in order. When
a row's document ends, the next document starts in that row on the next step,
with a start-of-document flag that clears the row's XL cache and memory. The last
segment of a document is padded; padding is masked from the loss and the memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenizedDocument:
    """One document as token ids. `loss_mask[t]` False excludes predicting token t from the loss."""

    name: str
    ids: torch.Tensor  # (n,) long
    loss_mask: torch.Tensor | None = None  # (n,) bool; None: every token is a target
    num_bytes: int | None = None  # UTF-8 bytes of the text of ids[1:] (the scored tokens), for bits per byte

    def __post_init__(self) -> None:
        if self.ids.dim() != 1:
            raise ValueError(f"document {self.name!r}: ids must be 1-D, got shape {tuple(self.ids.shape)}")
        if self.loss_mask is not None and self.loss_mask.shape != self.ids.shape:
            raise ValueError(
                f"document {self.name!r}: loss_mask shape {tuple(self.loss_mask.shape)} != ids shape "
                f"{tuple(self.ids.shape)}"
            )


@dataclass
class Batch:
    """One step of `batch_size` streams, each at its own place in its own document."""

    input_ids: torch.Tensor  # (batch, seq) long, 0 at padding
    targets: torch.Tensor  # (batch, seq) long, the next token; -100 where not scored
    attention_mask: torch.Tensor  # (batch, seq) bool, False at padding
    positions: torch.Tensor  # (batch, seq) long, position of each target in its document
    start_of_document: torch.Tensor  # (batch,) bool, True where the row's document begins here
    document_index: torch.Tensor  # (batch,) long, index of each row's document in the batcher's list, -1 if idle

    @property
    def num_targets(self) -> int:
        return int((self.targets != -100).sum())


class StreamingBatcher:
    """Rows pinned to documents, consecutive segments, flags at document starts.

    Documents are dealt to rows from one queue, in an order shuffled per epoch from
    `seed`; a row whose document ends takes the next one from the queue. Segment s of
    a document of n tokens holds inputs ids[sL : sL+L] and targets ids[sL+1 : sL+L+1],
    so every token but the first is a target exactly once, and no segment holds two
    documents. With `epochs=None` the stream never ends (training); otherwise rows
    that find the queue empty are idle (all padding) until every row is done.
    `state_dict`/`load_state_dict` resume the stream exactly where it was.
    """

    def __init__(
        self,
        documents: list[TokenizedDocument],
        batch_size: int,
        segment_length: int,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = 1,
    ) -> None:
        if batch_size <= 0 or segment_length <= 0:
            raise ValueError(f"batch_size and segment_length must be positive, got {batch_size} and {segment_length}")
        self.documents = [d for d in documents if d.ids.numel() >= 2]  # fewer than 2 tokens: nothing to predict
        if not self.documents:
            raise ValueError("no document has at least 2 tokens: there is nothing to stream")
        self.batch_size, self.segment_length = batch_size, segment_length
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.epoch = 0  # epoch of the next document in the queue
        self.queue_position = 0  # index into this epoch's order
        self.rows: list[tuple[int, int] | None] = [None] * batch_size  # (document index, offset) per row

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.documents)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.documents), generator=generator).tolist()

    def _next_document(self) -> int | None:
        if self.queue_position == len(self.documents):
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                return None
            self.epoch += 1
            self.queue_position = 0
        index = self._order(self.epoch)[self.queue_position]
        self.queue_position += 1
        return index

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        B, L = self.batch_size, self.segment_length
        input_ids = torch.zeros(B, L, dtype=torch.long)
        targets = torch.full((B, L), -100, dtype=torch.long)
        attention_mask = torch.zeros(B, L, dtype=torch.bool)
        positions = torch.zeros(B, L, dtype=torch.long)
        start = torch.zeros(B, dtype=torch.bool)
        document_index = torch.full((B,), -1, dtype=torch.long)
        for row in range(B):
            if self.rows[row] is None:
                document = self._next_document()
                start[row] = True  # a new document, or an idle row: either way nothing to remember
                if document is None:
                    continue
                self.rows[row] = (document, 0)
            document, offset = self.rows[row]
            document_index[row] = document
            doc = self.documents[document]
            n = min(L, doc.ids.numel() - 1 - offset)  # inputs that have a target
            input_ids[row, :n] = doc.ids[offset : offset + n]
            attention_mask[row, :n] = True
            row_targets = doc.ids[offset + 1 : offset + n + 1]
            if doc.loss_mask is not None:
                row_targets = row_targets.masked_fill(~doc.loss_mask[offset + 1 : offset + n + 1], -100)
            targets[row, :n] = row_targets
            positions[row, :n] = torch.arange(offset + 1, offset + n + 1)
            offset += n
            self.rows[row] = None if offset >= doc.ids.numel() - 1 else (document, offset)
        if not attention_mask.any():
            raise StopIteration
        return Batch(input_ids, targets, attention_mask, positions, start, document_index)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "queue_position": self.queue_position, "rows": list(self.rows), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or len(state["rows"]) != self.batch_size:
            raise ValueError("batcher state was saved for a different seed or batch size")
        self.epoch, self.queue_position = state["epoch"], state["queue_position"]
        self.rows = [None if r is None else tuple(r) for r in state["rows"]]
