"""add_memory: a kNN memory in chosen attention layers of a pretrained Hugging Face causal LM.

The retrofit goes through Hugging Face's own extension point for attention, the
`AttentionInterface`: `add_memory` registers an attention function named "memorizing"
and switches the model to it. Layers without memory run PyTorch's SDPA exactly as
before; a memory layer receives the queries, keys and values the model has already
projected (and, under RoPE, rotated), searches its memory, combines, and then writes
the keys and values of the tokens of this call. Nothing of the model's code is
patched, and its weights are untouched (the gate, when used, is a new parameter).

Choices, each tested:
- RoPE (Llama family): keys are stored rotated at their true positions, exactly as a
  KV cache holds them, and queries search rotated at theirs; a retrieved score is then
  the very logit full attention would give that pair. Feed absolute `position_ids`
  when streaming (`MemoryHandle.stream` does); within the model's trained range
  (`max_position_embeddings`), retrieval approximates full attention over the prefix.
- GPT-2 family (learned absolute positions): keys are stored as the layer makes them.
- Grouped-query attention: one memory head per key/value head; the query heads of a
  group search their key/value head's memory together.
- Combining: "joint" (retrieved entries join the layer's own softmax, scaled like any
  other key: works with zero training, as in Unlimiformer; a new per-head parameter
  `memory_bias`, initialised to 0, is added to the retrieved logits, so fine-tuning can
  re-weigh the memory, e.g. for the tail of the prefix that top-k leaves out, starting
  from exactly the zero-training model) or "gate" (the paper: a separate softmax over
  the retrieved entries, mixed per head by sigmoid(memory_gate), a new parameter
  initialised to `memory_gate_init`, for fine-tuning). While a memory is empty or disabled, the layer's
  output is the original model's.
- Writing: a call stores its own tokens after reading, except padding (attention mask
  0) and except when the caller keeps them in a KV cache (`generate` passes one): then
  they would be attended twice, once in the cache and once from memory, so such calls
  only read. Reads of more rows than the memory holds (beam search, several sequences
  per prompt) see each memory row repeated as generate repeats the prompts; a filled
  memory is never replaced by an empty one of another batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from ..memory.knn_memory import make_backend
from .attention import ATTENTION_NAME, POSITIONS, LayerMemory, memorizing_attention
from .handle import MemoryHandle


def _attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in order (Llama and GPT-2 families)."""
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if not modules:
        raise ValueError(
            f"{type(model).__name__}: no attention layers with a layer_idx found (Llama- and GPT-2-family models are "
            "supported)"
        )
    return sorted(modules, key=lambda m: m.layer_idx)


def _rotary_module(model: PreTrainedModel, head_dim: int) -> nn.Module:
    """The model's rotary embedding module (its `inv_freq`: head_dim / 2 frequencies); refuses a
    model without RoPE over the whole head."""
    rotary = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if not rotary:
        raise ValueError(
            f"positions='fixed' needs rotary position embeddings (RoPE), and {type(model).__name__} has none"
        )
    rotated = 2 * rotary[0].inv_freq.numel()
    if rotated != head_dim:
        raise ValueError(
            f"positions='fixed': {type(model).__name__} rotates {rotated} of its {head_dim} head "
            "dimensions; only models that rotate the whole head are supported"
        )
    return rotary[0]


def add_memory(
    model: PreTrainedModel,
    knn_layers: Sequence[int] = (-4,),
    memory_size: int = 65536,
    knn_k: int = 32,
    memory_combine: Literal["joint", "gate"] = "joint",
    memory_gate_init: float = -3.0,
    memory_dtype: torch.dtype = torch.float32,
    memory_backend: str = "exact",
    ivf_list_size: int = 256,
    ivf_nprobe: int = 16,
    sink_tokens: int = 0,
    positions: str = "true",
    fixed_distance: int = 512,
    memory_device: torch.device | str | None = None,
) -> MemoryHandle:
    """Give the chosen layers (`knn_layers`, negative indices count from the top) a kNN memory
    over their own keys and values. Returns the handle that resets, disables, streams, saves and
    loads. The arguments are named as `MemorizingConfig`'s fields: `knn_k` entries retrieved per
    query, combined by `memory_combine` ("joint": one softmax with the layer's own keys, the
    zero-training default; "gate": the paper's gate, a new parameter `memory_gate` per head
    starting at `memory_gate_init`, -3 so that the model starts as it was). `memory_backend`
    searches the memory ("exact", "ivf", "faiss_flat" or "faiss_ivf"); the IVF backends keep
    memory_size / `ivf_list_size` lists per row and head and scan `ivf_nprobe` of them a query.

    `positions`: where a retrieved entry stands for the query that reads it. "true" (the
    default): at its own position, so under RoPE its score is exactly the logit full attention
    would give (right within the model's trained range, `max_position_embeddings`). "fixed":
    every retrieved entry as if it stood `fixed_distance` tokens before the query (InfLLM's
    choice; RoPE models only), so that a memory holding more tokens than the model was trained
    on never hands it a distance it has not seen.

    `sink_tokens`: the first tokens written since a full reset are kept apart, never evicted,
    and attended by every later query with their full-attention logits (StreamingLLM's
    attention sinks). Pretrained models park attention on a document's first tokens: once a
    memory smaller than the document has evicted them, reading it can do worse than no memory.

    `memory_device`: where the memories live (default: the model's device); "cpu" beside a model
    on a GPU keeps them in pinned host memory and searches them there, for memories larger than
    the GPU holds. A runtime choice: memory files do not record it."""
    if memory_combine not in ("joint", "gate"):
        raise ValueError(f"memory_combine must be 'joint' or 'gate', got {memory_combine!r}")
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {list(POSITIONS)}, got {positions!r}")
    if fixed_distance < 0:
        raise ValueError(f"fixed_distance must be >= 0, got {fixed_distance}")
    make_backend(memory_backend, ivf_list_size, ivf_nprobe)  # refuses an unknown name or bad settings now
    if getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME:
        raise ValueError("this model already has memory: add_memory was called on it before")
    modules = _attention_modules(model)
    config = model.config
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    rotary = _rotary_module(model, head_dim) if positions == "fixed" else None
    chosen = sorted({i % len(modules) for i in knn_layers})
    for i in knn_layers:
        if not -len(modules) <= i < len(modules):
            raise ValueError(f"layer {i} is out of range for a model of {len(modules)} layers")
    handle_layers = {}
    for i in chosen:
        module = modules[i]
        module.knn_memory = LayerMemory(
            i,
            memory_size,
            knn_k,
            num_kv_heads,
            head_dim,
            memory_combine,
            memory_dtype,
            memory_backend,
            ivf_list_size,
            ivf_nprobe,
            positions=positions,
            distance=fixed_distance,
            rotary=rotary,
            memory_device=memory_device,
        )
        if sink_tokens:
            module.knn_memory.sink = LayerMemory(
                i, sink_tokens, sink_tokens, num_kv_heads, head_dim, memory_combine, memory_dtype, "exact",
                memory_device=memory_device,
            )  # fmt: skip
        device = next(module.parameters()).device
        if memory_combine == "gate":
            module.memory_gate = nn.Parameter(torch.full((num_heads,), float(memory_gate_init), device=device))
        else:
            module.memory_bias = nn.Parameter(torch.zeros(num_heads, device=device))
        handle_layers[i] = module.knn_memory
    AttentionInterface.register(ATTENTION_NAME, memorizing_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, eager_mask)  # additive float masks
    model.set_attn_implementation(ATTENTION_NAME)
    settings = {
        "knn_layers": chosen,
        "memory_size": memory_size,
        "knn_k": knn_k,
        "memory_combine": memory_combine,
        "memory_gate_init": memory_gate_init,
        "memory_dtype": str(memory_dtype).removeprefix("torch."),
        "memory_backend": memory_backend,
    }
    if memory_backend in ("ivf", "faiss_ivf"):
        settings.update(ivf_list_size=ivf_list_size, ivf_nprobe=ivf_nprobe)
    if sink_tokens:
        settings["sink_tokens"] = sink_tokens
    if positions != "true":
        settings.update(positions=positions, fixed_distance=fixed_distance)
    handle = MemoryHandle(model, handle_layers, settings)
    model.register_forward_pre_hook(handle._before_call, with_kwargs=True)
    model.register_forward_hook(handle._after_call, with_kwargs=True)
    return handle
