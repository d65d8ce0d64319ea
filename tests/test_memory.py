import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memorizing_transformers import KNNMemory
from memorizing_transformers.memory import exact
from memorizing_transformers.memory import files as memory_files
from memorizing_transformers.memory.knn_memory import make_backend


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def brute_force_topk(keys: np.ndarray, queries: np.ndarray, k: int):
    scores = queries @ keys.T  # (q, n)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def exact_search_in_blocks(monkeypatch, elements: int | None) -> exact.ExactSearch:
    """The exact search: None, the CPU kernel; else PyTorch's ops in blocks of `elements` scores, however narrow."""
    if elements is None:
        return exact.ExactSearch()
    monkeypatch.setattr(exact, "_BLOCK_ELEMENTS", elements)
    monkeypatch.setattr(exact, "_MIN_BLOCK_GROUPS", 0)
    return exact.ExactSearch(kernel=False)


# The CPU kernel; PyTorch's ops in one block, blocks of two (row, head) pairs over every slot, many small blocks
# of slots, merged.
@pytest.mark.parametrize("block_elements", [None, 1 << 25, 2 * 7 * 300, 3 * 7 * 50])
def test_search_equals_brute_force_and_faiss(monkeypatch, block_elements):
    search = exact_search_in_blocks(monkeypatch, block_elements)
    batch, heads, dim, capacity, k = 2, 3, 16, 300, 10
    memory = KNNMemory(batch, heads, dim, capacity, backend=search)
    keys, values = unit(batch, heads, capacity, dim), torch.randn(batch, heads, capacity, dim)
    memory.add(keys, values)
    queries = unit(batch, heads, 7, dim)
    found = memory.search(queries, k)
    assert found.keys.shape == (batch, heads, 7, k, dim) and found.valid.all()
    for b in range(batch):
        for h in range(heads):
            ref_scores, ref_index = brute_force_topk(keys[b, h].numpy(), queries[b, h].numpy(), k)
            np.testing.assert_allclose(found.scores[b, h].numpy(), ref_scores, rtol=1e-5, atol=1e-6)
            # Slots equal insertion order here (one write from an empty memory).
            assert np.array_equal(found.slots[b, h].numpy(), ref_index)
            assert torch.equal(found.keys[b, h], keys[b, h][torch.from_numpy(ref_index)])
            assert torch.equal(found.values[b, h], values[b, h][torch.from_numpy(ref_index)])
            index = faiss.IndexFlatIP(dim)
            index.add(keys[b, h].numpy())
            faiss_scores, faiss_index = index.search(queries[b, h].numpy(), k)
            assert np.array_equal(faiss_index, found.slots[b, h].numpy())
            np.testing.assert_allclose(faiss_scores, found.scores[b, h].numpy(), rtol=1e-5, atol=1e-5)


def stored_ids(memory: KNNMemory, row: int) -> set[int]:
    """Ids written as values[..., 0]; every head and key must agree with it."""
    valid = memory.valid[row]
    values = memory.values[row][:, valid, 0]  # (heads, n)
    keys = memory.keys[row][:, valid, 0]
    assert torch.equal(values, keys * 1000)  # each key still sits beside its own value
    assert (values == values[0]).all()
    return set(int(v) for v in values[0].tolist())


def entries_with_ids(batch, heads, dim, ids: torch.Tensor):
    """Keys and values of shape (batch, heads, seq, dim) that carry an id in their first coordinate."""
    values = ids.float()[:, None, :, None].expand(batch, heads, ids.shape[1], dim).clone()
    return values / 1000, values


def test_fifo_wrap_around_keeps_exactly_the_newest_entries():
    batch, heads, dim, capacity = 2, 2, 4, 8
    memory = KNNMemory(batch, heads, dim, capacity)
    written: list[list[int]] = [[], []]
    next_id = 1
    for size in [3, 5, 7, 11, 2, 8, 1, 13, 6]:  # several overflows, writes larger than capacity
        ids = torch.arange(next_id, next_id + batch * size).view(batch, size)
        next_id += batch * size
        mask = torch.rand(batch, size) > 0.3
        keys, values = entries_with_ids(batch, heads, dim, ids)
        memory.add(keys, values, mask=mask)
        for row in range(batch):
            written[row] += ids[row][mask[row]].tolist()
            assert stored_ids(memory, row) == set(written[row][-capacity:])
            assert memory.fill[row] == min(capacity, len(written[row]))


def test_search_returns_each_entry_with_its_own_value_after_overflow():
    memory = KNNMemory(1, 1, 8, capacity=16)
    keys = unit(1, 1, 50, 8)
    values = torch.arange(50).float()[None, None, :, None].expand(1, 1, 50, 8)
    for start in range(0, 50, 7):
        memory.add(keys[:, :, start : start + 7], values[:, :, start : start + 7])
    found = memory.search(keys, k=1)  # every key written, as a query
    recent = torch.arange(50) >= 50 - 16
    top_value = found.values[0, 0, :, 0, 0]
    assert torch.equal(top_value[recent], torch.arange(34, 50).float())
    assert torch.allclose(found.scores[0, 0, recent, 0], torch.ones(16), atol=1e-5)
    # Evicted keys can never be returned with their old values.
    assert not torch.isin(top_value[~recent], torch.arange(0, 34).float()).any()


def test_reset_rows_leaves_other_rows_untouched():
    memory = KNNMemory(3, 2, 4, capacity=10)
    memory.add(unit(3, 2, 6, 4), torch.randn(3, 2, 6, 4))
    before = {name: t.clone() for name, t in memory.state_dict().items()}
    memory.reset(torch.tensor([False, True, False]))
    assert memory.fill.tolist() == [6, 0, 6]
    for row in (0, 2):
        for name, tensor in memory.state_dict().items():
            assert torch.equal(tensor[row], before[name][row])
    assert not memory.search(unit(3, 2, 5, 4), 4).valid[1].any()
    memory.reset([0])
    assert memory.fill.tolist() == [0, 0, 6]
    # Writing after a reset starts the ring again for that row only.
    memory.add(*entries_with_ids(3, 2, 4, torch.arange(1, 13).view(3, 4)))
    assert stored_ids(memory, 0) == {1, 2, 3, 4}
    assert memory.fill.tolist() == [4, 4, 10]
    memory.reset()
    assert memory.extent == 0 and not memory.search(unit(3, 2, 5, 4), 4).valid.any()


def test_search_skips_slots_never_written():
    memory = KNNMemory(2, 1, 4, capacity=1000)
    keys = unit(2, 1, 7, 4)
    memory.add(keys, keys, mask=torch.tensor([[True] * 7, [True] * 3 + [False] * 4]))
    assert memory.extent == 7
    found = memory.search(keys, k=5)
    assert found.valid[0].sum(-1).eq(5).all() and found.valid[1].sum(-1).eq(3).all()
    assert (found.slots[found.valid] < 7).all()


# The CPU kernel; PyTorch's ops with every pair at once, and in blocks of slots.
@pytest.mark.parametrize("block_elements", [None, 1 << 25, 7 * 20])
def test_search_of_partly_filled_rows_equals_brute_force_on_their_entries(monkeypatch, block_elements):
    search = exact_search_in_blocks(monkeypatch, block_elements)
    batch, heads, dim, written, k = 3, 2, 8, 40, 6
    memory = KNNMemory(batch, heads, dim, capacity=100, backend=search)
    keys = unit(batch, heads, written, dim)
    kept = torch.ones(batch, written, dtype=torch.bool)
    kept[1, 4:] = False  # row 1 holds 4 entries (fewer than k), row 2 every other one
    kept[2, ::2] = False
    memory.add(keys, keys, mask=kept)
    queries = unit(batch, heads, 7, dim)
    found = memory.search(queries, k)
    for b in range(batch):
        stored = kept[b].nonzero().squeeze(1)  # positions written, in slot order
        for h in range(heads):
            n = min(k, len(stored))
            ref_scores, ref_index = brute_force_topk(keys[b, h, stored].numpy(), queries[b, h].numpy(), n)
            np.testing.assert_allclose(found.scores[b, h, :, :n].numpy(), ref_scores, rtol=1e-5, atol=1e-6)
            assert torch.equal(found.keys[b, h, :, :n], keys[b, h, stored][torch.from_numpy(ref_index)])
            assert found.valid[b, h, :, :n].all() and not found.valid[b, h, :, n:].any()


def test_masked_positions_are_never_stored_or_returned():
    memory = KNNMemory(2, 1, 4, capacity=32)
    ids = torch.arange(1, 21).view(2, 10)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :4] = True  # row 0: 4 tokens then padding; row 1: all padding
    memory.add(*entries_with_ids(2, 1, 4, ids), mask=mask)
    assert stored_ids(memory, 0) == {1, 2, 3, 4}
    assert memory.fill.tolist() == [4, 0]
    found = memory.search(unit(2, 1, 3, 4), k=8)
    assert found.valid[0].sum(-1).eq(4).all()  # only 4 entries exist: the rest is padding
    assert not found.valid[1].any() and torch.isinf(found.scores[1]).all()


def test_distinctive_key_is_retrieved_with_top_score():
    memory = KNNMemory(1, 4, 32, capacity=4096)
    distinctive = unit(1, 4, 1, 32)
    segment = unit(1, 4, 64, 32)
    segment[:, :, 17] = distinctive[:, :, 0]
    memory.add(segment, segment * 2)
    for _ in range(20):  # many later segments of unrelated keys
        memory.add(unit(1, 4, 64, 32), torch.randn(1, 4, 64, 32))
    found = memory.search(distinctive, k=5)
    assert found.slots[0, :, 0, 0].eq(17).all()
    assert torch.allclose(found.scores[0, :, 0, 0], torch.ones(4), atol=1e-5)
    assert (found.scores[0, :, 0, 1] < 0.99).all()
    assert torch.allclose(found.values[0, :, 0, 0], distinctive[0, :, 0] * 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_storage_finds_the_same_neighbours(dtype):
    keys, queries = unit(1, 2, 500, 32), unit(1, 2, 20, 32)
    exact, low = KNNMemory(1, 2, 32, 500), KNNMemory(1, 2, 32, 500, dtype=dtype)
    exact.add(keys, keys)
    low.add(keys, keys)
    a, b = exact.search(queries, 8), low.search(queries, 8)
    assert b.keys.dtype == torch.float32 and low.keys.dtype == dtype
    # Same neighbour sets up to near-ties at storage precision.
    agree = (a.slots[..., :, None] == b.slots[..., None, :]).any(-1).float().mean()
    assert agree > 0.95
    assert torch.allclose(a.scores, b.scores, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_store_widened_in_slices_is_searched_exactly(monkeypatch, dtype):
    monkeypatch.setattr(exact, "_WIDEN_ELEMENTS", 2 * 3 * 16 * 40)  # slices of 40 slots, 300 slots to search
    batch, heads, dim, capacity, k = 2, 3, 16, 300, 10
    memory = KNNMemory(batch, heads, dim, capacity, dtype=dtype)
    memory.add(unit(batch, heads, capacity, dim), torch.randn(batch, heads, capacity, dim))
    queries = unit(batch, heads, 3, dim)
    found = memory.search(queries, k)
    widened = memory.keys.float()  # what the search multiplies, slice by slice
    for b in range(batch):
        for h in range(heads):
            ref_scores, ref_index = brute_force_topk(widened[b, h].numpy(), queries[b, h].numpy(), k)
            np.testing.assert_allclose(found.scores[b, h].numpy(), ref_scores, rtol=1e-5, atol=1e-6)
            assert np.array_equal(found.slots[b, h].numpy(), ref_index)


def test_save_and_load_round_trip(tmp_path):
    memory = KNNMemory(2, 2, 4, capacity=6, dtype=torch.bfloat16)
    memory.add(unit(2, 2, 9, 4), torch.randn(2, 2, 9, 4), mask=torch.rand(2, 9) > 0.2)
    path = tmp_path / "memory.safetensors"
    memory.save(path)
    loaded = KNNMemory.load(path)
    assert loaded.dtype == torch.bfloat16 and loaded.capacity == 6
    for name, tensor in memory.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    queries = unit(2, 2, 3, 4)
    assert torch.equal(loaded.search(queries, 3).slots, memory.search(queries, 3).slots)


def test_interrupted_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "memory.safetensors"
    memory = KNNMemory(1, 1, 4, capacity=4)
    memory.add(unit(1, 1, 2, 4), torch.randn(1, 1, 2, 4))
    memory.save(path)
    original = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(memory_files, "save_file", crash)
    memory.add(unit(1, 1, 2, 4), torch.randn(1, 1, 2, 4))
    with pytest.raises(KeyboardInterrupt):
        memory.save(path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["memory.safetensors"]


@pytest.mark.parametrize("backend", ["exact", "faiss_flat"])
def test_grouped_queries_search_their_key_value_head(backend):
    """Queries of 6 heads over a memory of 3 (grouped-query attention) get what a memory of 6 heads, head
    h holding what head h // 2 holds, gives them: query head h searches key/value head h // 2."""
    keys, values = unit(2, 3, 40, 8), torch.randn(2, 3, 40, 8)
    grouped = KNNMemory(2, 3, 8, capacity=64, backend=make_backend(backend))
    grouped.add(keys, values)
    reference = KNNMemory(2, 6, 8, capacity=64, backend=make_backend(backend))
    reference.add(keys.repeat_interleave(2, dim=1), values.repeat_interleave(2, dim=1))
    queries = unit(2, 6, 5, 8)
    found, expected = grouped.search(queries, 4), reference.search(queries, 4)
    assert found.slots.shape == (2, 6, 5, 4) and found.keys.shape == (2, 6, 5, 4, 8)
    for got, want in zip(found, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_clear_errors(tmp_path):
    memory = KNNMemory(2, 3, 8, capacity=16)
    with pytest.raises(ValueError, match="batch size 1 but this memory holds 2 rows"):
        memory.add(torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))
    with pytest.raises(ValueError, match=r"shape \(batch, heads=3, seq, head_dim=8\)"):
        memory.add(torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8))
    with pytest.raises(ValueError, match=r"shape \(batch, heads=a multiple of 3, seq, head_dim=8\)"):
        memory.search(torch.randn(2, 4, 5, 8), 4)
    with pytest.raises(ValueError, match="values must have the shape of keys"):
        memory.add(torch.randn(2, 3, 5, 8), torch.randn(2, 3, 4, 8))
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, seq\)"):
        memory.add(torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="out of range"):
        memory.reset([2])
    with pytest.raises(ValueError, match="capacity must be positive"):
        KNNMemory(1, 1, 8, capacity=0)
    other = KNNMemory(2, 3, 8, capacity=32)
    with pytest.raises(ValueError, match=r"'keys' has shape \(2, 3, 32, 8\), but this memory expects \(2, 3, 16, 8\)"):
        memory.load_state_dict(other.state_dict())
    not_memory = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(not_memory))
    with pytest.raises(ValueError, match="is not a KNNMemory file"):
        KNNMemory.load(not_memory)
    with pytest.raises(FileNotFoundError, match="no memory file"):
        KNNMemory.load(tmp_path / "missing.safetensors")
