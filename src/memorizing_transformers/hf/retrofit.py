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
  the retrieved entries, mixed per head by sigmoid(gate), a new parameter initialised
  to `gate_init`, for fine-tuning). While a memory is empty or disabled, the layer's
  output is the original model's.
- Writing: a call stores its own tokens after reading, except padding (attention mask
  0) and except when the caller keeps them in a KV cache (`generate` passes one): then
  they would be attended twice, once in the cache and once from memory, so such calls
  only read. Reads of more rows than the memory holds (beam search, several sequences
  per prompt) see each memory row repeated as generate repeats the prompts; a filled
  memory is never replaced by an empty one of another batch size.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from ..memory.files import fingerprint, load_memory_file, memory_file_metadata, save_memory_file
from ..memory.knn_memory import KNNMemory
from ..model.attention import memory_attention

ATTENTION_NAME = "memorizing"
MEMORY_FILE_FORMAT = "memorizing_transformers.RetrofitMemory"


@dataclass
class LayerMemory:
    """The memory of one attention layer, attached to the attention module as `knn_memory`."""

    layer: int
    capacity: int
    k: int
    num_kv_heads: int
    head_dim: int
    combine: Literal["joint", "gate"]
    dtype: torch.dtype
    backend: str
    memory: KNNMemory | None = None  # created at the first call, for its batch size
    enabled: bool = True
    # A list to make the layer record, per call, what it retrieved (see evaluation/inspect.py).
    trace: list[dict[str, torch.Tensor]] | None = None
    # Read-only calls with more rows than the memory (beam search, several return sequences
    # per prompt) read a copy whose rows repeat each memory row, as generate repeats the prompts.
    expanded: KNNMemory | None = None
    # With sink_tokens: the first tokens written since a reset, kept apart (never evicted) and
    # attended by every later query (a LayerMemory of their number, searched whole).
    sink: "LayerMemory | None" = None

    def shape(self, batch_size: int) -> dict[str, int | str]:
        shape = {
            "batch_size": batch_size,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "capacity": self.capacity,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        return shape | ({"sink_tokens": self.sink.capacity} if self.sink else {})

    def stores(self) -> list["LayerMemory"]:
        """This layer's memory and, with sink tokens, its sink store."""
        return [self] + ([self.sink] if self.sink else [])

    def for_call(self, batch_size: int, device: torch.device, writes: bool) -> KNNMemory:
        """The memory a call of `batch_size` rows reads (and, when `writes`, writes).

        An empty memory takes the call's batch size; a filled one is never silently replaced:
        a read-only call whose batch is a multiple of its rows reads each row repeated, any
        other mismatch is refused."""
        memory = self.memory
        if memory is None or (memory.batch_size != batch_size and not bool(memory.valid.any())):
            self.memory = KNNMemory(
                batch_size,
                self.num_kv_heads,
                self.head_dim,
                self.capacity,
                dtype=self.dtype,
                device=device,
                backend=self.backend,
            )
            self.expanded = None
            return self.memory
        if memory.batch_size == batch_size:
            return memory
        if writes or batch_size % memory.batch_size:
            raise ValueError(
                f"the memory of layer {self.layer} holds {memory.batch_size} filled row(s), but this input has "
                f"{batch_size} rows: give one input row per memory row, or reset() the memory first"
            )
        if self.expanded is None or self.expanded.batch_size != batch_size:
            repeats = batch_size // memory.batch_size
            self.expanded = memory.select_rows(torch.arange(memory.batch_size).repeat_interleave(repeats))
        return self.expanded


class MemoryHandle:
    """What `add_memory` returns: the memories of the chosen layers, and what to do with them."""

    def __init__(self, model: PreTrainedModel, layers: dict[int, LayerMemory], settings: dict) -> None:
        self.model = model
        self.layers = layers
        self.settings = settings  # the arguments of add_memory, kept in memory files
        self.position = 0  # absolute position of the next token `stream` reads
        self.write_mask: torch.Tensor | None = None  # (batch, seq) bool for the next call: False = not stored
        self.writing = True  # False: the memory layers read their memory but store nothing
        # What the current call of the model stores: None (every token), a (batch, seq) bool
        # mask, or False (nothing: the caller keeps these tokens in a KV cache). Set by
        # `_before_call`, a forward pre-hook on the model.
        self.call_writes: torch.Tensor | bool | None = None
        self._signature = inspect.signature(model.forward)

    def _before_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Decide what this call of the model writes to memory.

        A call given a KV cache (`cache`/`past_key_values`, as `generate` passes) keeps its
        tokens there, so storing them in memory too would count them twice: it writes
        nothing. Otherwise padding (attention_mask 0) is never written, nor what `stream`
        leaves for the next window (`write_mask`)."""
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs", {})
        cache = bound.get("cache", extra.get("cache", extra.get("past_key_values")))
        if not self.writing or cache is not None:
            self.call_writes = False
            return
        writes = self.write_mask
        mask = bound.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            ids = bound.get("input_ids")
            seq = ids.shape[1] if ids is not None else mask.shape[1]
            padding = mask[:, -seq:].bool()
            writes = padding if writes is None else writes & padding.to(writes.device)
        self.call_writes = writes

    def _after_call(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        self.call_writes = None

    def reset(self, rows: Sequence[int] | torch.Tensor | None = None) -> None:
        """Empty the memories of the chosen rows (all when None: streaming starts again at position 0)."""
        if rows is None:
            self.position = 0
        for store in (store for layer in self.layers.values() for store in layer.stores()):
            store.expanded = None
            if store.memory is not None:
                store.memory.reset(rows)

    def resize(self, memory_size: int) -> None:
        """Give every layer a memory of `memory_size` entries per head: the memories are emptied
        and streaming starts again at position 0 (memory files record the new size)."""
        if memory_size <= 0:
            raise ValueError(f"memory_size must be positive, got {memory_size}")
        for layer in self.layers.values():
            layer.capacity = memory_size
            for store in layer.stores():
                store.memory = store.expanded = None
        self.settings["memory_size"] = memory_size
        self.position = 0

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Within this block the memory layers neither read nor write: the original model."""
        before = {i: layer.enabled for i, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.enabled = False
        try:
            yield
        finally:
            for i, layer in self.layers.items():
                layer.enabled = before[i]

    def fill(self) -> dict[int, list[int]]:
        """Stored entries per layer and row."""
        return {i: ([] if layer.memory is None else layer.memory.fill.tolist()) for i, layer in self.layers.items()}

    def stream(
        self, input_ids: torch.Tensor, window: int, stride: int | None = None, losses: bool = False
    ) -> torch.Tensor:
        """Read a long input through a sliding window, the memory holding what has left it.

        input_ids: (batch, seq). Calls cover `window` tokens and advance by `stride`
        (default: `window`, no overlap); positions are absolute, going on from the tokens
        streamed since the last full `reset` (`position`). A call's first `stride`
        tokens, which leave the window at the next call, are written to memory by it (the
        last call writes all of its own), so no token is ever both in the window and in
        memory. Every token is scored in the first call that sees it as a prediction
        target with the most left context. Returns next-token logits (batch, seq, vocab), or
        with `losses` the next-token cross-entropies (batch, seq - 1), computed call by call
        so that a long input never holds all its logits at once. Gradients flow when enabled
        (fine-tuning: the memory itself is always detached); wrap in torch.no_grad() otherwise.
        """
        stride = window if stride is None else stride
        if window <= 0 or not 0 < stride <= window:
            raise ValueError(f"need window > 0 and 0 < stride <= window, got window={window}, stride={stride}")
        seq = input_ids.shape[1]
        self._check_positions(self.position + seq)
        logits, start = [], 0
        while True:
            end = min(start + window, seq)
            last = end == seq
            chunk = input_ids[:, start:end]
            positions = torch.arange(self.position + start, self.position + end, device=chunk.device).expand_as(chunk)
            write = torch.zeros_like(chunk, dtype=torch.bool)
            write[:, : (end - start) if last else stride] = True
            self.write_mask = write
            try:
                out = self.model(input_ids=chunk, position_ids=positions).logits  # (batch, end - start, vocab)
            finally:
                self.write_mask = None
            new = 0 if start == 0 else window - stride  # the earlier tokens were scored by the previous call
            if losses:  # targets of positions start + new .. end - 1 (none after the input's last token)
                targets = input_ids[:, start + new + 1 : end + 1]
                out = F.cross_entropy(
                    out[:, new : new + targets.shape[1]].transpose(1, 2).float(), targets, reduction="none"
                )
                logits.append(out)
            else:
                logits.append(out[:, new:])
            if last:
                self.position += seq
                return torch.cat(logits, dim=1)
            start += stride

    def _check_positions(self, length: int) -> None:
        """Positions are absolute: a model with learned position embeddings (GPT-2) cannot go past them."""
        limit = getattr(self.model.config, "n_positions", None)
        if limit is not None and length > limit:
            raise ValueError(
                f"{type(self.model).__name__} has learned positions up to {limit}, and streaming uses absolute "
                f"positions: an input of {length} tokens is too long for it (RoPE models have no such limit)"
            )

    def generate(self, input_ids: torch.Tensor, window: int, **generate_kwargs) -> torch.Tensor:
        """Generate after a long prompt, which follows whatever the memory already holds: all
        but its last `window` tokens are streamed into the memory (and stay there), then
        Hugging Face's `generate` continues from the last window, positions going on from
        there, reading the memory without writing to it. Returns the prompt and the new
        tokens (batch * num_return_sequences, seq + new), like `generate`; beam search and
        several sequences per prompt read copies of each prompt's memory row."""
        batch, seq = input_ids.shape
        self._check_positions(self.position + seq + generate_kwargs.get("max_new_tokens", 0))
        split = max(0, seq - window)
        if split:
            with torch.no_grad():
                self.stream(input_ids[:, :split], window)  # every token stored once
        last = input_ids[:, split:]
        positions = torch.arange(self.position, self.position + seq - split, device=input_ids.device).expand(batch, -1)
        self.writing = False
        try:
            out = self.model.generate(
                last, attention_mask=torch.ones_like(last), position_ids=positions, **generate_kwargs
            )
        finally:
            self.writing = True
        prefix = input_ids[:, :split].repeat_interleave(out.shape[0] // batch, dim=0)  # beams, return sequences
        return torch.cat([prefix, out], dim=1)

    def save(self, path: str | os.PathLike) -> None:
        """Write every layer's memory to one safetensors file (atomically), with the settings of
        `add_memory`, the streaming position, the shapes and the model's identity (its
        configuration's and weights' fingerprints), so that a model it does not fit refuses it."""
        tensors = {}
        metadata = {
            "format": MEMORY_FILE_FORMAT,
            "model": json.dumps(model_identity(self.model)),
            "settings": json.dumps(self.settings),
            "position": str(self.position),
        }
        for i, layer in self.layers.items():
            if layer.memory is None:
                raise ValueError(f"layer {i} has no memory yet: run the model on some input first")
            tensors.update({f"layer.{i}.{name}": t for name, t in layer.memory.state_dict().items()})
            if layer.sink and layer.sink.memory is not None:
                tensors.update({f"layer.{i}.sink.{name}": t for name, t in layer.sink.memory.state_dict().items()})
            metadata[f"layer.{i}"] = json.dumps(layer.shape(layer.memory.batch_size))
        save_memory_file(path, tensors, metadata)

    def load(self, path: str | os.PathLike) -> None:
        """Read memories written by `save`; refuses a file made for another model or other shapes."""
        metadata, tensors = load_memory_file(path, MEMORY_FILE_FORMAT, "a memory file of add_memory")
        saved, mine = json.loads(metadata["model"]), model_identity(self.model)
        made_for = (
            f"{path} was made for the model {saved['model']} (fingerprints {saved['config']}/{saved['weights']}), "
            f"not for this one, {mine['model']} ({mine['config']}/{mine['weights']})"
        )
        if saved["model"] != mine["model"]:
            raise ValueError(made_for)
        saved_layers = sorted(int(key.split(".")[1]) for key in metadata if key.startswith("layer."))
        if saved_layers != sorted(self.layers):
            raise ValueError(
                f"{path} holds memories of layers {saved_layers}, but this model has memory in {sorted(self.layers)}"
            )
        shapes = {i: json.loads(metadata[f"layer.{i}"]) for i in saved_layers}
        for i, shape in shapes.items():
            if shape != self.layers[i].shape(shape["batch_size"]):
                raise ValueError(
                    f"{path}: the memory of layer {i} is {shape}, but this model's is "
                    f"{self.layers[i].shape(shape['batch_size'])}"
                )
        if saved != mine:
            raise ValueError(
                made_for
                + (
                    ": same shapes, other configuration"
                    if saved["config"] != mine["config"]
                    else ": same configuration, other weights"
                )
            )
        device = next(self.model.parameters()).device
        for i, layer in self.layers.items():
            for store, prefix in ((layer, f"layer.{i}."), (layer.sink, f"layer.{i}.sink.")):
                if store is None:
                    continue
                store.memory = store.expanded = None
                saved_store = {
                    name[len(prefix) :]: t
                    for name, t in tensors.items()
                    if name.startswith(prefix) and "." not in name[len(prefix) :]
                }
                if saved_store:
                    store.for_call(shapes[i]["batch_size"], device, writes=True).load_state_dict(saved_store)
        self.position = int(metadata["position"])


def memory_file_settings(path: str | os.PathLike) -> dict:
    """The `add_memory` arguments a memory file was made with: `add_memory(model,
    **memory_file_settings(path)).load(path)` gives a model back its saved memory."""
    settings = json.loads(memory_file_metadata(path, MEMORY_FILE_FORMAT, "a memory file of add_memory")["settings"])
    return settings | {"memory_dtype": getattr(torch, settings["memory_dtype"])}


# Configuration fields that say how a model is run, not what it computes.
_RUNTIME_FIELDS = {
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
}


def model_identity(model: PreTrainedModel) -> dict[str, str]:
    """What tells models apart: architecture and shape, a fingerprint of the configuration
    and one of every weight (the memory's own parameters included)."""
    config = model.config
    fields = {k: v for k, v in config.to_dict().items() if k not in _RUNTIME_FIELDS and not k.startswith("_")}
    return {
        "model": f"{type(model).__name__}:layers={config.num_hidden_layers}:hidden={config.hidden_size}"
        f":vocab={config.vocab_size}",
        "config": fingerprint(fields, {}),
        "weights": fingerprint({}, model.state_dict()),
    }


def _attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in order (Llama and GPT-2 families)."""
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if not modules:
        raise ValueError(
            f"{type(model).__name__}: no attention layers with a layer_idx found (Llama- and GPT-2-family models are "
            "supported)"
        )
    return sorted(modules, key=lambda m: m.layer_idx)


def add_memory(
    model: PreTrainedModel,
    layers: Sequence[int] = (-4,),
    memory_size: int = 65536,
    k: int = 32,
    combine: Literal["joint", "gate"] = "joint",
    gate_init: float = -3.0,
    memory_dtype: torch.dtype = torch.float32,
    backend: str = "exact",
    sink_tokens: int = 0,
) -> MemoryHandle:
    """Give the chosen layers (negative indices count from the top) a kNN memory over their
    own keys and values. Returns the handle that resets, disables, streams, saves and loads.

    `sink_tokens`: the first tokens written since a full reset are kept apart, never evicted,
    and attended by every later query with their full-attention logits (StreamingLLM's
    attention sinks). Pretrained models park attention on a document's first tokens: once a
    memory smaller than the document has evicted them, reading it can do worse than no memory."""
    if combine not in ("joint", "gate"):
        raise ValueError(f"combine must be 'joint' or 'gate', got {combine!r}")
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
    if getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME:
        raise ValueError("this model already has memory: add_memory was called on it before")
    modules = _attention_modules(model)
    config = model.config
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    chosen = sorted({i % len(modules) for i in layers})
    for i in layers:
        if not -len(modules) <= i < len(modules):
            raise ValueError(f"layer {i} is out of range for a model of {len(modules)} layers")
    handle_layers = {}
    for i in chosen:
        module = modules[i]
        module.knn_memory = LayerMemory(i, memory_size, k, num_kv_heads, head_dim, combine, memory_dtype, backend)
        if sink_tokens:
            module.knn_memory.sink = LayerMemory(
                i, sink_tokens, sink_tokens, num_kv_heads, head_dim, combine, memory_dtype, "exact"
            )
        device = next(module.parameters()).device
        if combine == "gate":
            module.memory_gate = nn.Parameter(torch.full((num_heads,), float(gate_init), device=device))
        else:
            module.memory_bias = nn.Parameter(torch.zeros(num_heads, device=device))
        handle_layers[i] = module.knn_memory
    AttentionInterface.register(ATTENTION_NAME, memorizing_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, eager_mask)  # additive float masks
    model.set_attn_implementation(ATTENTION_NAME)
    settings = {
        "layers": chosen,
        "memory_size": memory_size,
        "k": k,
        "combine": combine,
        "gate_init": gate_init,
        "memory_dtype": str(memory_dtype).removeprefix("torch."),
        "backend": backend,
    }
    if sink_tokens:
        settings["sink_tokens"] = sink_tokens
    handle = MemoryHandle(model, handle_layers, settings)
    for module in modules:
        module.memory_handle = handle
    model.register_forward_pre_hook(handle._before_call, with_kwargs=True)
    model.register_forward_hook(handle._after_call, with_kwargs=True)
    return handle


def memorizing_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The "memorizing" attention function. query: (batch, heads, seq, head_dim); key, value:
    (batch, kv_heads, kv_len, head_dim), the cache included; attention_mask: additive
    (batch, 1, seq, kv_len). Returns (batch, seq, heads, head_dim), as HF's functions do."""
    layer: LayerMemory | None = getattr(module, "knn_memory", None)
    if layer is None or not layer.enabled:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, seq, dim = query.shape
    scaling = dim**-0.5 if scaling is None else scaling
    groups = heads // key.shape[1]
    handle = getattr(module, "memory_handle", None)
    writes = None if handle is None else handle.call_writes
    memory = layer.for_call(batch, query.device, writes=writes is not False)
    sinks = None if layer.sink is None else layer.sink.for_call(batch, query.device, writes=writes is not False)

    # Retrieve: the query heads of a group search their key/value head's memory together.
    grouped = rearrange(query, "b (h g) s d -> b h (g s) d", g=groups)
    found = memory.search(grouped, layer.k)
    found_keys, found_values, found_valid, found_slots = found.keys, found.values, found.valid, found.slots
    if sinks is not None:  # every sink token, for every query (slots past the memory's capacity)
        sunk = sinks.search(grouped, sinks.capacity)
        found_keys, found_values = (
            torch.cat([found_keys, sunk.keys], dim=3),
            torch.cat([found_values, sunk.values], dim=3),
        )
        found_valid = torch.cat([found_valid, sunk.valid], dim=3)
        found_slots = torch.cat([found_slots, sunk.slots + layer.capacity], dim=3)
    mem_keys, mem_values = (
        rearrange(t, "b h (g s) k d -> b (h g) s k d", g=groups) for t in (found_keys, found_values)
    )
    mem_valid = rearrange(found_valid, "b h (g s) k -> b (h g) s k", g=groups)
    mem_logits = torch.einsum("bhsd,bhskd->bhsk", query, mem_keys.to(query.dtype)) * scaling

    keys_all = key.repeat_interleave(groups, dim=1)  # (batch, heads, kv_len, head_dim)
    values_all = value.repeat_interleave(groups, dim=1)
    if attention_mask is None:  # causal: the queries are the last `seq` of the keys
        kv_len = key.shape[2]
        future = torch.ones(seq, kv_len, dtype=torch.bool, device=query.device).triu(kv_len - seq + 1)
        local_bias = torch.zeros(seq, kv_len, dtype=query.dtype, device=query.device).masked_fill(future, float("-inf"))
    else:
        local_bias = attention_mask[..., : key.shape[2]].to(query.dtype)
    biased = mem_logits  # the joint softmax adds each head's learned retrieved-logit bias
    if layer.combine == "joint":
        biased = mem_logits + module.memory_bias[None, :, None, None].to(mem_logits.dtype)
    out, share = memory_attention(
        query * scaling,
        keys_all,
        values_all,
        local_bias,
        biased,
        mem_values.to(query.dtype),
        mem_valid,
        getattr(module, "memory_gate", None),
    )
    if layer.trace is not None:
        slots = rearrange(found_slots, "b h (g s) k -> b (h g) s k", g=groups)
        layer.trace.append(
            {
                "slots": slots.cpu(),
                "logits": mem_logits.detach().float().cpu(),
                "valid": mem_valid.cpu(),
                "share": share.detach().float().cpu(),
            }
        )

    # Write this call's tokens (the last `seq` keys), unless the caller keeps them in a KV cache.
    if writes is not False:
        written = (
            torch.ones(batch, seq, dtype=torch.bool, device=key.device) if writes is None else writes.to(key.device)
        )
        if sinks is not None:  # a row's first written tokens fill its sink store, the rest go to memory
            rank = written.long().cumsum(dim=1) - 1
            to_sinks = written & (rank < (sinks.capacity - sinks.fill.to(key.device))[:, None])
            sinks.add(key[:, :, -seq:], value[:, :, -seq:], mask=to_sinks)
            layer.sink.expanded, written = None, written & ~to_sinks
        memory.add(key[:, :, -seq:], value[:, :, -seq:], mask=written)
        layer.expanded = None
    return out.transpose(1, 2).contiguous(), None
