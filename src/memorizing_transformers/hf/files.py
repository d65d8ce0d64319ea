"""Memory files of the retrofit: every layer's memory in one safetensors file, with the settings
of `add_memory`, the streaming position, the shapes and the identity of the model (fingerprints
of its configuration and weights), so that a model the file does not fit refuses it."""

from __future__ import annotations

import json
import os

import torch
from transformers import PreTrainedModel

from ..memory.files import fingerprint, load_memory_file, memory_file_metadata, save_memory_file
from .attention import LayerMemory

MEMORY_FILE_FORMAT = "memorizing_transformers.RetrofitMemory"


def save_memories(
    path: str | os.PathLike, model: PreTrainedModel, layers: dict[int, LayerMemory], settings: dict, position: int
) -> None:
    """Write the memories of `layers` (atomically), with `settings` and the streaming `position`."""
    tensors = {}
    metadata = {
        "format": MEMORY_FILE_FORMAT,
        "model": json.dumps(model_identity(model)),
        "settings": json.dumps(settings),
        "position": str(position),
    }
    for i, layer in layers.items():
        if layer.memory is None:
            raise ValueError(f"layer {i} has no memory yet: run the model on some input first")
        tensors.update({f"layer.{i}.{name}": t for name, t in layer.memory.state_dict().items()})
        if layer.sink and layer.sink.memory is not None:
            tensors.update({f"layer.{i}.sink.{name}": t for name, t in layer.sink.memory.state_dict().items()})
        metadata[f"layer.{i}"] = json.dumps(layer.shape(layer.memory.batch_size))
    save_memory_file(path, tensors, metadata)


def load_memories(path: str | os.PathLike, model: PreTrainedModel, layers: dict[int, LayerMemory]) -> int:
    """Read memories written by `save_memories` into `layers`; returns the streaming position.
    Refuses a file made for another model or other shapes."""
    metadata, tensors = load_memory_file(path, MEMORY_FILE_FORMAT, "a memory file of add_memory")
    saved, mine = json.loads(metadata["model"]), model_identity(model)
    made_for = (
        f"{path} was made for the model {saved['model']} (fingerprints {saved['config']}/{saved['weights']}), "
        f"not for this one, {mine['model']} ({mine['config']}/{mine['weights']})"
    )
    if saved["model"] != mine["model"]:
        raise ValueError(made_for)
    stored_as = json.loads(metadata["settings"]).get("positions", "true")
    reading_as = {layer.positions for layer in layers.values()}
    if reading_as != {stored_as}:  # "fixed" keys are stored unrotated, "true" ones rotated
        raise ValueError(
            f"{path} holds keys stored for positions={stored_as!r}, but this model's memory reads them with "
            f"positions={sorted(reading_as)[0]!r}: give add_memory the file's settings (memory_file_settings)"
        )
    saved_layers = sorted(int(key.split(".")[1]) for key in metadata if key.startswith("layer."))
    if saved_layers != sorted(layers):
        raise ValueError(
            f"{path} holds memories of layers {saved_layers}, but this model has memory in {sorted(layers)}"
        )
    shapes = {i: json.loads(metadata[f"layer.{i}"]) for i in saved_layers}
    for i, shape in shapes.items():
        if shape != layers[i].shape(shape["batch_size"]):
            raise ValueError(
                f"{path}: the memory of layer {i} is {shape}, but this model's is "
                f"{layers[i].shape(shape['batch_size'])}"
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
    device = next(model.parameters()).device
    for i, layer in layers.items():
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
    return int(metadata["position"])


# The names earlier versions gave add_memory's arguments, in the files they wrote.
_EARLIER_NAMES = {
    "layers": "knn_layers",
    "k": "knn_k",
    "combine": "memory_combine",
    "gate_init": "memory_gate_init",
    "backend": "memory_backend",
}


def memory_file_settings(path: str | os.PathLike) -> dict:
    """The `add_memory` arguments a memory file was made with: `add_memory(model,
    **memory_file_settings(path)).load(path)` gives a model back its saved memory."""
    settings = json.loads(memory_file_metadata(path, MEMORY_FILE_FORMAT, "a memory file of add_memory")["settings"])
    settings = {_EARLIER_NAMES.get(name, name): value for name, value in settings.items()}
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
