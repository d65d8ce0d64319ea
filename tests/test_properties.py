"""Property-based tests (hypothesis): KNNMemory against a brute-force model of itself, through
random sequences of writes (with masks), searches, row resets and save/load, on every
backend; the streaming batcher against the documents it streams."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_streaming import documents, replay

from memorizing_transformers import KNNMemory
from memorizing_transformers.data.streaming import StreamingBatcher

BATCH, HEADS, DIM = 2, 2, 8


class BruteForceMemory:
    """What a memory must hold: per row, the last `capacity` written (key, value) pairs, in order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(BATCH)]

    def add(self, keys, values, mask):
        for b in range(BATCH):
            for t in range(keys.shape[2]):
                if mask[b, t]:
                    self.rows[b].append((keys[b, :, t], values[b, :, t]))
            self.rows[b] = self.rows[b][-self.capacity :]

    def reset(self, rows):
        for b in rows:
            self.rows[b] = []

    def search(self, queries, k):
        """Per (row, head, query): the top-k scores among the stored keys, best first."""
        out = torch.full((BATCH, HEADS, queries.shape[2], k), float("-inf"))
        for b in range(BATCH):
            if self.rows[b]:
                keys = torch.stack([key for key, _ in self.rows[b]], dim=1)  # (heads, n, dim)
                scores = torch.einsum("hqd,hnd->hqn", queries[b], keys)
                top = scores.topk(min(k, scores.shape[-1]), dim=-1).values
                out[b, :, :, : top.shape[-1]] = top
        return out


def unit(*shape):
    return torch.nn.functional.normalize(torch.randn(*shape), dim=-1)


operation = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 12), st.floats(0.0, 1.0)),
    st.tuples(st.just("search"), st.integers(1, 4), st.integers(1, 6)),
    st.tuples(st.just("reset"), st.sets(st.integers(0, BATCH - 1), max_size=BATCH)),
    st.tuples(
        st.just("reload"),
    ),
)


@pytest.mark.parametrize("backend", ["exact", "ivf", "faiss_flat", "faiss_ivf"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(capacity=st.integers(1, 20), operations=st.lists(operation, min_size=1, max_size=12), seed=st.integers(0, 2**16))
def test_memory_equals_a_brute_force_model(backend, capacity, operations, seed, tmp_path):
    # ivf and faiss_ivf with every list probed are exact too: the property holds for all four.
    from memorizing_transformers.memory.knn_memory import make_backend

    torch.manual_seed(seed)

    def new_backend():
        return make_backend(backend, ivf_list_size=4, ivf_nprobe=1000)

    memory = KNNMemory(BATCH, HEADS, DIM, capacity, backend=new_backend())
    model = BruteForceMemory(capacity)
    for op in operations:
        if op[0] == "add":
            _, seq, keep = op
            keys, values = unit(BATCH, HEADS, seq, DIM), torch.randn(BATCH, HEADS, seq, DIM)
            mask = torch.rand(BATCH, seq) < keep
            memory.add(keys, values, mask)
            model.add(keys, values, mask)
        elif op[0] == "search":
            _, seq, k = op
            queries = unit(BATCH, HEADS, seq, DIM)
            found = memory.search(queries, k)
            expected = model.search(queries, min(k, capacity))
            torch.testing.assert_close(found.scores, expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(found.valid, torch.isfinite(expected))
            # each returned entry is a stored (key, value) pair of its row and head
            for b in range(BATCH):
                for h in range(HEADS):
                    stored = {tuple(key[h].tolist()): value[h] for key, value in model.rows[b]}
                    for q, j in torch.nonzero(found.valid[b, h]).tolist():
                        assert torch.equal(found.values[b, h, q, j], stored[tuple(found.keys[b, h, q, j].tolist())])
        elif op[0] == "reset":
            rows = sorted(op[1])
            memory.reset(rows)
            model.reset(rows)
        else:
            memory.save(tmp_path / "m.safetensors")
            memory = KNNMemory.load(tmp_path / "m.safetensors", backend=new_backend())
        assert memory.fill.tolist() == [len(r) for r in model.rows]


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 60), min_size=1, max_size=8),
    batch_size=st.integers(1, 4),
    segment_length=st.integers(1, 17),
    seed=st.integers(0, 1000),
)
def test_the_batcher_scores_every_token_once_and_never_mixes_documents(lengths, batch_size, segment_length, seed):
    docs = documents(lengths, seed=seed)
    if not any(n >= 2 for n in lengths):
        with pytest.raises(ValueError, match="nothing to stream"):
            StreamingBatcher(docs, batch_size=batch_size, segment_length=segment_length, seed=seed)
        return
    batcher = StreamingBatcher(docs, batch_size=batch_size, segment_length=segment_length, seed=seed)
    streamed = replay(batcher)  # checks row pinning, flags and padding on the way
    assert len(streamed) == sum(n >= 2 for n in lengths)
    for index, record in streamed.items():
        doc = batcher.documents[index]
        assert torch.equal(torch.cat(record["targets"]), doc.ids[1:])  # every target once, in order
        assert torch.equal(torch.cat(record["positions"]), torch.arange(1, doc.ids.numel()))
