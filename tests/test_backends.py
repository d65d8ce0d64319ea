"""Search backends: the same neighbours as brute force, FIFO kept identical across backends."""

import os
import shutil
import subprocess
import sys

import faiss
import pytest
import torch
import torch.nn.functional as F

from memorizing_transformers import KNNMemory, MemorizingConfig, MemorizingTransformer
from memorizing_transformers.memory.cpu_kernel import topk_kernel
from memorizing_transformers.memory.exact import ExactSearch, block_topk
from memorizing_transformers.memory.faiss_search import FaissSearch
from memorizing_transformers.memory.ivf import IVFSearch
from memorizing_transformers.memory.knn_memory import make_backend


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


# The IVF backends with nprobe >= lists search every list: exact, so they must agree exactly too ("faiss_ivf" with
# float32 stores' lists kept in float32; in fp16, the default, see test_half_lists_of_a_float32_store).
EXACT_BACKENDS = {
    "exact": lambda: make_backend("exact"),  # on a CPU, the CPU kernel
    "exact_pytorch_ops": lambda: ExactSearch(kernel=False),
    "faiss_flat": lambda: make_backend("faiss_flat"),
    "faiss_ivf_all_lists": lambda: FaissSearch(ExactSearch(), "ivf", list_size=4, nprobe=1000, half_lists=False),
    "ivf_all_lists": lambda: IVFSearch(ExactSearch(), list_size=4, nprobe=1000),
}


def skip_without_compiler():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the exact search runs on PyTorch's ops alone")


def needs_compiler():
    skip_without_compiler()
    kernel = topk_kernel()
    assert kernel is not None, "a C++ compiler is present, yet the CPU kernel was not built"
    return kernel


@pytest.fixture(params=["avx512", "avx2", "baseline"])
def kernel(request):
    """The CPU kernel, its product and scan compiled for each instruction set (those this CPU lacks skipped)."""
    kernel = needs_compiler()
    if request.param not in kernel.instruction_sets():
        pytest.skip(f"this CPU has no {request.param}")
    kernel.use_instructions(request.param)
    yield kernel
    kernel.use_instructions(kernel.instruction_sets()[0])


@pytest.mark.parametrize("width", [64 * 32, 64 * 32 + 5, 100])
def test_block_topk_equals_topk(width):
    scores = torch.randn(3, 2, 5, width)
    scores[0, 0, 0, : width // 2] = float("-inf")  # masked slots, as after a reset
    for laid_out in (scores, scores.transpose(1, 2)):  # contiguous, and not
        values, index = block_topk(laid_out, 8)
        ref = laid_out.topk(8, dim=-1)
        assert torch.equal(values, ref.values)
        assert torch.equal(index, ref.indices)


def brute_force(keys, valid, queries, k):
    """Reference top-k over the valid entries of one (row, head): scores, slots."""
    scores = (queries @ keys.T).masked_fill(~valid, float("-inf"))
    return scores.topk(k, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", sorted(EXACT_BACKENDS))
def test_exact_backends_return_brute_force_neighbours(backend, dtype):
    batch, heads, dim, capacity, k = 2, 3, 16, 96, 6
    memory = KNNMemory(batch, heads, dim, capacity, dtype=dtype, backend=EXACT_BACKENDS[backend]())
    for _ in range(5):  # 5 x 40 writes into 96 slots: wraps around, partly masked
        memory.add(unit(batch, heads, 40, dim), torch.randn(batch, heads, 40, dim), mask=torch.rand(batch, 40) > 0.2)
    queries = unit(batch, heads, 7, dim)
    found = memory.search(queries, k)
    for b in range(batch):
        for h in range(heads):
            ref = brute_force(memory.keys[b, h].float(), memory.valid[b], queries[b, h], k)
            torch.testing.assert_close(found.scores[b, h], ref.values, rtol=1e-5, atol=1e-5)
            assert torch.equal(found.slots[b, h], ref.indices)
            assert torch.equal(found.values[b, h], memory.values[b, h][ref.indices])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("query_tile, slot_tile, chunks", [(256, 2048, 1), (3, 32, 1), (4, 17, 3), (1, 5, 40)])
def test_cpu_kernel_equals_brute_force_in_any_tiles_and_chunks(kernel, dtype, query_tile, slot_tile, chunks):
    batch, heads, dim, capacity, extent, k = 2, 3, 16, 90, 80, 6
    keys = unit(batch, heads, capacity, dim).to(dtype)
    valid = torch.rand(batch, capacity) > 0.3
    valid[:, extent:] = False
    valid[1, :] = False
    valid[1, [2, 40, 77]] = True  # fewer entries than k
    queries = unit(batch, heads, 7, dim)
    scores, slots = kernel.topk_inner_product(
        queries.flatten(0, 1), keys.flatten(0, 1), valid, heads, extent, k, query_tile, slot_tile, chunks
    )
    scores, slots = scores.view(batch, heads, 7, k), slots.view(batch, heads, 7, k)
    for b in range(batch):
        for h in range(heads):
            ref = brute_force(keys[b, h].float(), valid[b], queries[b, h], k)
            torch.testing.assert_close(scores[b, h], ref.values, rtol=1e-5, atol=1e-5)
            found = torch.isfinite(ref.values)
            assert torch.equal(slots[b, h][found], ref.indices[found]) and not slots[b, h][~found].any()


@pytest.mark.parametrize("query_tile, slot_tile, chunks", [(256, 2048, 1), (3, 32, 1), (4, 17, 3)])
def test_cpu_kernel_breaks_ties_by_slot(kernel, query_tile, slot_tile, chunks):
    """Keys that repeat score alike: the lowest slots win, however many candidates were cut along the way."""
    keys = unit(1, 1, 1, 8).expand(1, 2, 300, 8).contiguous()  # every key the same
    valid = torch.ones(1, 300, dtype=torch.bool)
    valid[0, ::3] = False
    queries = unit(1, 2, 5, 8)
    scores, slots = kernel.topk_inner_product(
        queries.flatten(0, 1), keys.flatten(0, 1), valid, 2, 300, 4, query_tile, slot_tile, chunks
    )
    assert slots.tolist() == [[[1, 2, 4, 5]] * 5] * 2
    torch.testing.assert_close(scores, (queries.flatten(0, 1) @ keys[0, 0, 0])[..., None].expand(-1, -1, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slot_tile, chunks", [(2048, 1), (16, 1), (17, 4), (5, 50)])  # tiles: whole blocks of 16
def test_cpu_ivf_kernel_equals_brute_force_over_the_probed_lists(kernel, dtype, slot_tile, chunks):
    # Lists of about 40 keys (blocks of 16, the last one part-filled, shrinking and growing as slots move), 9
    # queries (the product's groups of 4 padded), 13 dimensions (no whole vector).
    pairs, seq, dim, capacity, lists, nprobe, k = 4, 9, 13, 240, 6, 3, 6
    index = kernel.InvertedLists(pairs, lists, capacity, dim, dtype)
    lists_of = torch.full((pairs, capacity), -1)
    for _ in range(3):  # slots written again and again move between lists
        keys = unit(pairs, capacity, dim).to(dtype)
        lists_of = torch.randint(0, lists, (pairs, capacity))
        pair, slot = torch.meshgrid(torch.arange(pairs), torch.arange(capacity), indexing="ij")
        index.assign(pair.flatten(), slot.flatten(), lists_of.flatten(), keys.flatten(0, 1))
    index.clear(torch.tensor([1]))
    lists_of[1] = -1
    few = torch.tensor([0, 40, 80])  # pair 1 holds 3 entries: fewer than k
    index.assign(torch.ones(3, dtype=torch.long), few, torch.zeros(3, dtype=torch.long), keys[1, few])
    lists_of[1, few] = 0
    assert torch.equal(index.lists_of(), lists_of) and index.sizes().tolist() == [capacity, 3, capacity, capacity]
    queries = unit(pairs, seq, dim)
    probes = torch.stack([torch.randperm(lists)[:nprobe] for _ in range(pairs * seq)]).view(pairs, seq, nprobe)
    probes[1] = 0  # every probe on the same list: its entries are offered once
    probes[2] = -1  # a pair probing nothing
    scores, slots = index.search(queries, probes, k, slot_tile, chunks)
    for pair in range(pairs):
        probed = (lists_of[pair, None, :, None] == probes[pair, :, None, :]).any(-1) & (lists_of[pair] >= 0)
        ref = (queries[pair] @ keys[pair].float().T).masked_fill(~probed, float("-inf")).topk(k, dim=-1)
        torch.testing.assert_close(scores[pair], ref.values, rtol=1e-5, atol=1e-5)
        found = torch.isfinite(ref.values)
        assert torch.equal(slots[pair][found], ref.indices[found]) and not slots[pair][~found].any()
    assert (torch.isfinite(scores[1]).sum(-1) == 3).all() and not torch.isfinite(scores[2]).any()


def test_ivf_backend_without_its_kernel_searches_exactly(monkeypatch):
    import memorizing_transformers.memory.ivf as ivf

    monkeypatch.setattr(ivf, "topk_kernel", lambda: None)  # no compiler, or a store off the CPU
    memory = KNNMemory(2, 2, 8, capacity=64, backend=make_backend("ivf", ivf_list_size=4, ivf_nprobe=1))
    reference = KNNMemory(2, 2, 8, capacity=64)
    keys = unit(2, 2, 80, 8)
    for m in (memory, reference):
        m.add(keys, keys)
    assert memory.backend.index is None and not memory.backend.trained.any()  # no lists kept, none trained
    queries = unit(2, 2, 6, 8)
    assert torch.equal(memory.search(queries, 8).slots, reference.search(queries, 8).slots)


@pytest.mark.slow
def test_cpu_kernel_is_built_on_first_use_past_a_killed_builds_leftovers_then_imported_as_built(tmp_path):
    skip_without_compiler()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    # PyTorch's builder waits for its lock file to go away: one left by a killed build must not hang the next;
    # nor may the library it left half-written keep the kernel from being built.
    stale_lock = "name, library = cpu_kernel.library_path(); library.parent.mkdir(parents=True); "
    stale_lock += "(library.parent / 'lock').touch(); library.write_bytes(b'half written'); "
    for setup, built in ((stale_lock, True), ("", False)):
        code = f"from memorizing_transformers.memory import cpu_kernel; {setup}assert cpu_kernel.topk_kernel()"
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        assert ("compiling the exact search's CPU kernel" in run.stderr) == built, run.stderr


def trained_rows(backend):
    """Which rows an IVF backend has trained lists for."""
    if isinstance(backend, IVFSearch):
        return backend.trained.tolist()
    return [row is not None for row in backend.indices]


def index_sizes(memory):
    """Entries in each (row, head) index; None for a row whose IVF lists are not trained yet."""
    backend = memory.backend
    if isinstance(backend, IVFSearch):
        held = backend.index.sizes().view(len(backend.trained), -1).tolist()  # (batch, heads)
        return [sizes if trained else None for sizes, trained in zip(held, trained_rows(backend))]
    return [None if row is None else [index.ntotal for index in row] for row in backend.indices]


@pytest.mark.parametrize("backend", ["faiss_flat", "faiss_ivf_all_lists", "ivf_all_lists"])
def test_fifo_wrap_around_and_resets_identical_across_backends(backend):
    batch, heads, dim, capacity, k = 3, 2, 8, 64, 5
    reference = KNNMemory(batch, heads, dim, capacity)
    other = KNNMemory(batch, heads, dim, capacity, backend=EXACT_BACKENDS[backend]())
    events = [
        ("add", 30),
        ("add", 50),
        ("reset", [1]),
        ("add", 7),
        ("add", 130),
        ("reset", [0, 2]),
        ("add", 64),
        ("add", 20),
    ]
    for kind, arg in events:
        if kind == "add":
            keys, values, mask = (
                unit(batch, heads, arg, dim),
                torch.randn(batch, heads, arg, dim),
                torch.rand(batch, arg) > 0.25,
            )
            reference.add(keys, values, mask=mask)
            other.add(keys, values, mask=mask)
        else:
            reference.reset(arg)
            other.reset(arg)
        # Every index holds exactly its row's stored entries: nothing stale, nothing missing.
        sizes = index_sizes(other)
        assert [s for s in sizes if s is not None] == [
            [int(n)] * heads for s, n in zip(sizes, reference.fill) if s is not None
        ]
        queries = unit(batch, heads, 9, dim)
        a, b = reference.search(queries, k), other.search(queries, k)
        assert torch.equal(a.valid, b.valid)
        assert torch.equal(a.slots[a.valid], b.slots[b.valid])
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.values[a.valid], b.values[b.valid])
    assert None not in index_sizes(other)  # every row went through its index (IVF: trained when first full)


def clustered(n, dim, centres, generator):
    """Unit vectors around `centres` (c, dim): the shape of real attention keys, unlike uniform noise."""
    pick = torch.randint(0, centres.shape[0], (n,), generator=generator)
    return F.normalize(centres[pick] + torch.randn(n, dim, generator=generator) / dim**0.5, dim=-1)


@pytest.mark.parametrize("name", ["faiss_ivf", "ivf"])
def test_ivf_recall_on_clustered_keys_stays_high_through_fifo_eviction(name):
    generator = torch.Generator().manual_seed(0)
    heads, dim, capacity, k = 2, 32, 4096, 32
    centres = F.normalize(torch.randn(64, dim, generator=generator), dim=-1)
    exact_memory = KNNMemory(1, heads, dim, capacity)
    backend = make_backend(name, ivf_list_size=128, ivf_nprobe=8)  # 32 lists
    ivf = KNNMemory(1, heads, dim, capacity, backend=backend)
    for _ in range(24):  # 6,144 writes: the ring wraps, the index follows
        keys = clustered(heads * 256, dim, centres, generator).view(1, heads, 256, dim)
        exact_memory.add(keys, keys)
        ivf.add(keys, keys)
    if name == "faiss_ivf":
        assert all(isinstance(index, faiss.IndexIVFScalarQuantizer) for index in ivf.backend.indices[0])
    assert ivf.backend.train_size(ivf) == 2048  # 64 keys per list: exact search until then
    assert index_sizes(ivf) == [[capacity] * heads]
    queries = clustered(heads * 64, dim, centres, generator).view(1, heads, 64, dim)
    a, b = exact_memory.search(queries, k), ivf.search(queries, k)
    recall = (a.slots[..., :, None] == b.slots[..., None, :]).any(-1).float().mean()
    assert recall >= 0.9, recall
    assert recall < 1.0  # it is approximate: 8 of 32 lists were searched
    # Whatever it returns is a real entry, with its own key and value.
    torch.testing.assert_close(b.scores, torch.einsum("bhqd,bhqkd->bhqk", queries, b.keys))


@pytest.mark.parametrize("backend", ["faiss_ivf", "ivf"])
def test_ivf_index_is_rebuilt_on_load(tmp_path, backend):
    memory = KNNMemory(2, 2, 8, capacity=300, dtype=torch.bfloat16, backend=backend)
    memory.add(unit(2, 2, 400, 8), torch.randn(2, 2, 400, 8), mask=torch.rand(2, 400) > 0.3)
    memory.save(tmp_path / "m.safetensors")
    loaded = KNNMemory.load(tmp_path / "m.safetensors", backend=backend)
    assert index_sizes(loaded) == index_sizes(memory)
    queries = unit(2, 2, 5, 8)
    assert torch.equal(loaded.search(queries, 4).slots, memory.search(queries, 4).slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_gives_the_same_logits_with_every_exact_backend(dtype):
    config = MemorizingConfig.preset("tiny", memory_dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(0)
    model = MemorizingTransformer(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, config.segment_length * 12))  # memory of 128 overflows
    logits = {}
    for backend in ("exact", "faiss_flat"):
        reconfigured = MemorizingTransformer(
            MemorizingConfig.from_dict({**config.to_dict(), "memory_backend": backend})
        )
        reconfigured.load_state_dict(model.state_dict())
        with torch.no_grad():
            logits[backend] = reconfigured(ids).logits
    torch.testing.assert_close(logits["faiss_flat"], logits["exact"], rtol=1e-4, atol=1e-4)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="memory_backend must be one of"):
        MemorizingConfig(memory_backend="annoy")
    with pytest.raises(ValueError, match="unknown memory backend 'annoy'"):
        KNNMemory(1, 1, 4, 8, backend="annoy")


@pytest.mark.parametrize("name", ["faiss_ivf", "ivf"])
def test_ivf_rows_are_searched_exactly_until_they_hold_enough_keys_to_train(name):
    backend = make_backend(name, ivf_list_size=4, ivf_nprobe=1)  # 16 lists, nprobe 1: inexact once trained
    memory = KNNMemory(2, 2, 8, capacity=64, backend=backend)
    reference = KNNMemory(2, 2, 8, capacity=64)
    keys = unit(2, 2, 40, 8)
    for m in (memory, reference):
        m.add(keys, keys)
    queries = unit(2, 2, 6, 8)
    assert trained_rows(backend) == [False, False]
    assert torch.equal(memory.search(queries, 8).slots, reference.search(queries, 8).slots)
    more = unit(2, 2, 30, 8)
    for m in (memory, reference):
        m.add(more, more, mask=torch.tensor([[True] * 30, [False] * 30]))
    assert trained_rows(backend) == [True, False]  # row 0 now holds 64 keys
    a, b = reference.search(queries, 8), memory.search(queries, 8)
    assert torch.equal(a.slots[1], b.slots[1])  # row 1: still exact, searched alone over the slots it uses
    torch.testing.assert_close(a.scores[1], b.scores[1])
    young = memory.store.select([1])
    assert young.extent == 40 and young.keys.shape == (1, 2, 40, 8) and torch.equal(young.keys, memory.keys[1:, :, :40])


@pytest.mark.parametrize(
    "dtype, half_lists, codes_dtype",
    [
        (torch.float32, True, torch.float16),
        (torch.float32, False, torch.float32),
        (torch.bfloat16, True, torch.bfloat16),
        (torch.float16, True, torch.float16),
    ],
)
def test_ivf_lists_hold_the_stores_keys_in_half_precision(dtype, half_lists, codes_dtype):
    backend = FaissSearch(ExactSearch(), "ivf", list_size=32, nprobe=1000, half_lists=half_lists)
    memory = KNNMemory(1, 2, 16, capacity=256, dtype=dtype, backend=backend)
    memory.add(unit(1, 2, 256, 16), torch.randn(1, 2, 256, 16))
    for index in memory.backend.indices[0]:
        assert index.code_size == 16 * codes_dtype.itemsize
        # Each list's codes are the store's keys, byte for byte in the lists' dtype.
        for lst in range(index.nlist):
            n = index.invlists.list_size(lst)
            codes = faiss.rev_swig_ptr(index.invlists.get_codes(lst), n * index.code_size).copy()
            ids = torch.from_numpy(faiss.rev_swig_ptr(index.invlists.get_ids(lst), n).copy())
            head = memory.backend.indices[0].index(index)
            stored = torch.frombuffer(codes, dtype=codes_dtype).view(n, 16)
            assert torch.equal(stored, memory.keys[0, head][ids].to(codes_dtype))


def test_half_lists_of_a_float32_store_find_brute_forces_neighbours_and_report_exact_scores():
    generator = torch.Generator().manual_seed(1)
    heads, dim, capacity, k = 2, 32, 1024, 16
    centres = F.normalize(torch.randn(32, dim, generator=generator), dim=-1)
    keys = clustered(heads * capacity, dim, centres, generator).view(1, heads, capacity, dim)
    keys[0, 0, 7] = 1e6  # past fp16's range: clamped in the list, still found, scored from the store
    reference, memory = KNNMemory(1, heads, dim, capacity), KNNMemory(1, heads, dim, capacity, backend="faiss_ivf")
    memory.backend.nprobe = 1000  # every list: only the fp16 rounding of the lists stands between them
    for m in (reference, memory):
        m.add(keys, torch.randn(1, heads, capacity, dim, generator=torch.Generator().manual_seed(2)))
    queries = clustered(heads * 64, dim, centres, generator).view(1, heads, 64, dim)
    a, b = reference.search(queries, k), memory.search(queries, k)
    assert not memory.backend.exact_scores(memory.store)
    recall = (a.slots[..., :, None] == b.slots[..., None, :]).any(-1).float().mean()
    assert recall >= 0.99, recall
    huge = (a.slots[0, 0] == 7).any(-1)  # found first by the queries it points along, by no other
    assert huge.any() and torch.equal(huge, (b.slots[0, 0, :, 0] == 7))
    # The scores are the stored keys' products, best first, whatever the lists' rounding.
    found_keys = torch.stack([memory.keys[0, h][b.slots[0, h]] for h in range(heads)])[None]  # (1, heads, q, k, dim)
    torch.testing.assert_close(b.scores, torch.einsum("bhqd,bhqkd->bhqk", queries, found_keys))
    assert (b.scores[..., :-1] >= b.scores[..., 1:]).all()


def test_ivf_rows_selected_keep_their_lists_and_find_what_their_source_rows_find():
    # Beam search selects rows at every step: the IVF backend gives them their source rows' centroids, no k-means.
    generator = torch.Generator().manual_seed(3)
    centres = F.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    memory = KNNMemory(2, 2, 16, capacity=256, backend=make_backend("ivf", ivf_list_size=16, ivf_nprobe=2))
    keys = clustered(2 * 2 * 300, 16, centres, generator).view(2, 2, 300, 16)
    memory.add(keys, keys)  # both rows wrap: trained on their first 256 keys
    memory.reset([1])
    memory.add(keys[:, :, :40], keys[:, :, :40])  # row 1 young again, its centroids kept
    selected = memory.select_rows([1, 0, 0])
    assert selected.backend.trained.tolist() == [True, True, True]
    assert torch.equal(selected.backend.centroids, memory.backend.centroids[[1, 0, 0]])
    assert index_sizes(selected) == [[40, 40], [256, 256], [256, 256]]
    queries = clustered(2 * 2 * 9, 16, centres, generator).view(2, 2, 9, 16)
    a, b = memory.search(queries, 5), selected.search(queries[[1, 0, 0]], 5)
    assert torch.equal(b.slots, a.slots[[1, 0, 0]])
    torch.testing.assert_close(b.scores, a.scores[[1, 0, 0]])
    assert index_sizes(memory) == [[256, 256], [40, 40]]  # the source is left as it was
