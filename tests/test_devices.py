"""What must hold on every device: run on the CPU by `make test`, on CUDA by `make gpu-check`
(MT_TEST_DEVICE=cuda); each compares the device's result with the CPU's or with a reference."""

import dataclasses

import pytest
import torch
from tiny_models import tiny_llama

from memorizing_transformers import KNNMemory, MemorizingConfig, MemorizingTransformer
from memorizing_transformers.memory.backend import BACKENDS
from memorizing_transformers.training.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.device


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_search_finds_what_brute_force_finds(device, backend, dtype):
    if backend.startswith("faiss"):
        pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(2, 3, 300, 16, generator=generator), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(2, 3, 20, 16, generator=generator), dim=-1)
    memory = KNNMemory(2, 3, 16, capacity=256, dtype=dtype, device=device, backend=backend)
    memory.add(keys.to(device), keys.to(device))  # 300 into 256: the oldest 44 evicted
    found = memory.search(queries.to(device), 8)
    stored = keys[:, :, 44:].to(dtype).float()
    truth = torch.einsum("bhsd,bhnd->bhsn", queries, stored).topk(8, dim=-1)
    if backend == "faiss_ivf":  # approximate: most of the true neighbours
        slots = (found.slots.cpu() - 44) % 256  # slot of position p is p mod 256
        assert (slots[..., :, None] == truth.indices[..., None, :]).any(-1).float().mean() > 0.5
        return
    torch.testing.assert_close(found.scores.cpu(), truth.values, rtol=1e-2, atol=1e-2)
    assert found.keys.device.type == device.type and found.values.device.type == device.type


@pytest.mark.parametrize("memory_device", [None, "cpu"])  # the memories on the device, or in host memory
def test_the_model_streams_on_the_device_as_on_the_cpu(device, tmp_path, memory_device):
    torch.manual_seed(0)
    cpu = MemorizingTransformer(MemorizingConfig.preset("tiny", memory_size=64)).eval()
    moved = MemorizingTransformer(cpu.config).eval().to(device)
    moved.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        expected = cpu(ids).logits
        state, parts = moved.new_state(2, memory_device=memory_device), []
        assert {m.device.type for m in state.memories.values()} == {(memory_device and "cpu") or device.type}
        for start in range(0, 48, 16):  # three segments, the memory read and written where it lives
            out = moved(ids[:, start : start + 16].to(device), state=state)
            state, parts = out.state, parts + [out.logits.cpu()]
        torch.testing.assert_close(torch.cat(parts, dim=1), expected, rtol=1e-3, atol=1e-3)
        # the state saved on the device reads back and goes on as it would have
        moved.save_memory(state, tmp_path / "state.safetensors")
        loaded = moved.load_memory(tmp_path / "state.safetensors")
        more = torch.randint(0, 512, (2, 16))
        torch.testing.assert_close(
            moved(more.to(device), state=loaded).logits, moved(more.to(device), state=state).logits
        )


@pytest.mark.parametrize("memory_device", [None, "cpu"])
def test_training_resumes_on_the_device_as_if_never_stopped(device, tmp_path, memory_device):
    from memorizing_transformers.data.streaming import TokenizedDocument

    documents = [TokenizedDocument(f"d{i}", torch.randint(0, 512, (200,))) for i in range(6)]
    settings = TrainConfig(steps=6, batch_size=2, eval_every=0, checkpoint_every=3, log_every=1, warmup_steps=2)
    settings = dataclasses.replace(settings, memory_device=memory_device)

    def trainer(run, steps=6):
        torch.manual_seed(0)
        model = MemorizingTransformer(MemorizingConfig.preset("tiny", memory_size=64)).to(device)
        return Trainer(model, dataclasses.replace(settings, steps=steps), documents, None, run)

    straight = trainer(tmp_path / "a")
    straight.train(progress=False)
    assert {m.device.type for m in straight.state.memories.values()} == {(memory_device and "cpu") or device.type}
    stopped = trainer(tmp_path / "b")
    stopped.train(progress=False, until_step=3)
    resumed = trainer(tmp_path / "b")
    assert resumed.resume() and resumed.step == 3
    resumed.train(progress=False)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("memory_device", [None, "cpu"])
def test_a_retrofitted_memory_of_every_earlier_token_is_full_attention_on_the_device(device, memory_device):
    from memorizing_transformers.hf.retrofit import add_memory

    model = tiny_llama().to(device)
    ids = torch.randint(0, 97, (1, 40), device=device)
    with torch.no_grad():
        full = model(ids).logits
        handle = add_memory(model, knn_layers=[0, 1, 2], memory_size=64, knn_k=40, memory_device=memory_device)
        streamed = handle.stream(ids, window=8)
    torch.testing.assert_close(streamed, full, rtol=1e-3, atol=1e-3)
    assert handle.layers[0].memory.device.type == ((memory_device and "cpu") or device.type)


def test_keep_freed_host_memory_serves_large_tensors_from_the_heap():
    import ctypes

    from memorizing_transformers.devices import keep_freed_host_memory

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc >= 2.33")

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd")] + [
            (name, ctypes.c_size_t) for name in ("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
        ]

    mallinfo2.restype = Mallinfo2
    assert keep_freed_host_memory()
    mapped = mallinfo2().hblkhd  # bytes in chunks mapped one allocation at a time
    big = torch.empty(64 * 2**20 // 4)  # 64 MiB: mapped on its own by default
    assert mallinfo2().hblkhd == mapped
    del big
