"""Training-step time of the popular PyTorch implementation, for side-by-side figures.

Times lucidrains/memorizing-transformers-pytorch 0.4.1 at the same configuration as ours. It is an
optional extra, used only when importable:

    pip install einops-exts joblib filelock faiss-cpu
    pip install --no-deps memorizing-transformers-pytorch==0.4.1

(--no-deps: its wheel asks for faiss-gpu, whose files would overwrite faiss-cpu's `faiss` module).

Facts about that library this relies on: its layers are numbered from 1; each kNN layer has one
faiss HNSW index per batch row over a single shared key head (keys l2-normalised), plus a memmap
file of keys and values under `knn_memories_directory` (default ./.tmp/knn.memories, here a
temporary directory); a layer adds every key it drops from its XL window (all its keys without XL),
and an index is wiped whole once it would hold more than `max_knn_memories` entries.
"""

from __future__ import annotations

import contextlib
import tempfile

import torch
import torch.nn.functional as F

from .common import Case

# Each variant's (kNN memory, XL cache).
VARIANTS = {"vanilla": (False, False), "XL only": (False, True), "memory": (True, False), "memory + XL": (True, True)}


def available() -> bool:
    try:
        import memorizing_transformers_pytorch  # noqa: F401
    except Exception:
        return False
    return True


def case(
    label: str,
    variant: str,
    vocab_size: int,
    d_model: int,
    n_layers: int,
    n_heads: int,
    head_dim: int,
    knn_layer: int,
    k: int,
    segment_length: int,
    batch: int,
    memory_size: int,
    xl_length: int,
    resources: contextlib.ExitStack,
    device: torch.device = torch.device("cpu"),
) -> Case:
    """One AdamW step (forward with loss, backward, update) of their model, as a benchmark case.

    `knn_layer` counts from 0, as ours does; their model gets `knn_layer + 1`. Their memory is
    wiped whole once full, so it has no steady state: the case's `set_fill` refills it to a
    share of its capacity, and rounds at evenly spaced shares cover a whole fill-and-wipe cycle.
    Files and memories stay open in `resources` until the benchmark closes it.
    """
    from memorizing_transformers_pytorch import MemorizingTransformer

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    use_knn, use_xl = VARIANTS[variant]
    torch.manual_seed(0)
    directory = resources.enter_context(tempfile.TemporaryDirectory())
    model = MemorizingTransformer(
        num_tokens=vocab_size,
        dim=d_model,
        depth=n_layers,
        heads=n_heads,
        dim_head=head_dim,
        memorizing_layers=(knn_layer + 1,) if use_knn else (),
        max_knn_memories=memory_size,
        num_retrieved_memories=k,
        xl_max_memories=xl_length if use_xl else 0,
        knn_memories_directory=directory,
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(1, vocab_size, (batch, segment_length + 1), device=device)  # 0 is their ignored pad
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    knn_memories = resources.enter_context(model.knn_memories_context(batch_size=batch))
    xl_memories = None

    def step() -> None:
        nonlocal xl_memories
        out = model(inputs, knn_memories, xl_memories=xl_memories, labels=labels)
        loss, xl_memories = out if use_xl else (out, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def set_fill(share: float) -> None:
        fill = int(share * memory_size)
        for memory in knn_memories:
            memory.clear()
            if fill > 0:
                keys = F.normalize(torch.randn(batch, fill, head_dim), dim=-1)
                memory.add(torch.stack((keys, torch.randn(batch, fill, head_dim)), dim=-2))

    return Case("popular", label, step, batch * segment_length, set_fill if use_knn else None)
