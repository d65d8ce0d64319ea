"""Training on several processes with torch.distributed (launched by torchrun): which rows of the
global batch a rank owns, and the few collectives the trainer needs besides DDP's own.

The global batch of `batch_size` streams is cut into equal blocks of rows, one per rank, rank r
owning rows [r * b, (r + 1) * b) with b = batch_size / world_size. Every rank draws the same
global batches from the same streaming batcher (same seed, same documents) and keeps its own
rows, so a row's documents, XL cache and memory belong to one rank only, and the run reads the
same tokens in the same rows as one process with the whole batch would. A checkpoint gathers
every rank's rows of the stream state into one, as one process would have it: a run resumed at
another world size (one that divides the batch) gives each rank its rows of that state, so every
row goes on with its own memory.

With `shard` (FSDP2's `fully_shard`, on every block and then the whole model) the ranks hold
their shards of every weight, gradient and AdamW state instead of DDP's whole copy each; the
weights are gathered for a block's forward and backward. A checkpoint is written whole (the
weights and the optimizer state gathered to rank 0, `full_state`), so that it loads anywhere:
under FSDP at any world size, or in one process without it.
"""

from __future__ import annotations

import gc
import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn import Module


def start_from_environment(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, ...) when there
    is one of more than one process: NCCL on CUDA, gloo on the CPU. Returns this rank's device
    (cuda:LOCAL_RANK on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    global _HOST_GROUP
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # Objects gathered for a checkpoint travel over gloo, in host memory: under NCCL they would
    # be staged on rank 0's GPU, world-size copies of every row's memory at once.
    _HOST_GROUP = dist.new_group(backend="gloo") if device.type == "cuda" else None
    return device


_HOST_GROUP = None  # a gloo group beside NCCL's, for what goes through host memory


def stop() -> None:
    """Leave the process group `start_from_environment` joined, once the work is done on every rank.
    Without it gloo's worker threads outlive the interpreter's teardown and can abort the process
    (SIGABRT, "terminate called without an active exception") after a run that succeeded. Call it on
    success only: after an error on one rank, the others may be waiting in a collective.

    That abort still came, rarely, after this had run: on rank 1 of 2-process FSDP runs, once the
    interpreter had left the program's code (2 of about 85 runs on a busy machine). FSDP's modules,
    and what they hold of the process group, sit in reference cycles that only the garbage collector
    frees, and it can run during teardown: so the garbage is collected here, while the interpreter is
    whole, and the ranks wait for each other before leaving, so that none tears down its connections
    while another still works.
    """
    global _HOST_GROUP
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        _HOST_GROUP = None


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def own_rows(batch_size: int) -> slice:
    """The rows of the global batch this rank owns; refuses a batch the ranks cannot share equally."""
    rank, world = rank_and_world()
    if batch_size % world:
        raise ValueError(f"a batch of {batch_size} rows cannot be shared equally by {world} processes")
    size = batch_size // world
    return slice(rank * size, (rank + 1) * size)


def total(value: float | torch.Tensor) -> torch.Tensor:
    """The sum of `value` over the ranks, as a float64 tensor on the CPU (gloo) or the value's device."""
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if rank_and_world()[1] > 1:
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
    return tensor.cpu()


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def main_decides(*flags: bool) -> tuple[bool, ...]:
    """Rank 0's flags on every rank (decisions of wall time, which ranks must take together)."""
    if rank_and_world()[1] == 1:
        return flags
    shared = [list(flags)]
    dist.broadcast_object_list(shared, src=0)
    return tuple(shared[0])


def gather(value: Any) -> list[Any] | None:
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere), through host memory."""
    rank, world = rank_and_world()
    if world == 1:
        return [value]
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(value, gathered, dst=0, group=_HOST_GROUP)
    return gathered


def gather_rows(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Every rank's tensors (batch first), on the CPU, concatenated in rank order along the batch,
    on rank 0 (None elsewhere)."""
    gathered = gather({k: v.cpu() for k, v in tensors.items()})
    if gathered is None:
        return None
    return {name: torch.cat([part[name] for part in gathered]) for name in gathered[0]}


def main_only(context: AbstractContextManager) -> AbstractContextManager:
    """`context` on rank 0, nothing on the others (e.g. the run lock, which one process holds)."""
    return context if is_main() else nullcontext()


def shard(model: Module) -> None:
    """FSDP: every block of `model` sharded across the ranks, then the rest (embeddings, norm, head)."""
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor sharded by FSDP gathered whole on every rank (a collective: every rank calls it); any
    other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite, on every rank's shard of it (one answer for all)."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return bool(total(float(not all(bool(torch.isfinite(t).all()) for t in local))) == 0)


_WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """A sharded model's weights and optimizer state, whole and on the CPU, on rank 0 (empty on the
    others; a collective). The optimizer's state is keyed by parameter name."""
    return get_model_state_dict(model, options=_WHOLE), get_optimizer_state_dict(model, optimizer, options=_WHOLE)


def load_whole(
    model: Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor] | None,
    optimizer_by_name: dict[str, Any] | None,
) -> None:
    """Whole weights and a whole optimizer state keyed by parameter name (what `full_state` gives;
    None: left as they are) into a model, sharded or not: each rank keeps its shards."""
    whole_options = StateDictOptions(full_state_dict=True)
    if weights is not None:
        set_model_state_dict(model, weights, options=whole_options)
    if optimizer_by_name is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_by_name, options=whole_options)
