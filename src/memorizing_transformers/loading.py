"""Loading a model from a folder, one loader per kind: ours (a run directory, a saved model
folder, or a MemorizingForCausalLM folder) and any other Hugging Face causal LM, which gets a
memory through `add_memory`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .hf.modeling import MODEL_TYPE, MemorizingForCausalLM
from .pretrained import MemorizingTransformer
from .runs import resolve_model_dir


def transformers_model_type(checkpoint: str | os.PathLike) -> str | None:
    """The `model_type` of a Hugging Face model folder; None for our own folders and runs."""
    config = Path(checkpoint) / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None


def is_other_huggingface_model(checkpoint: str | os.PathLike) -> bool:
    """Whether `checkpoint` is another library's causal LM (not one of ours)."""
    model_type = transformers_model_type(checkpoint)
    return model_type is not None and model_type != MODEL_TYPE


def load_memorizing(
    checkpoint: str | os.PathLike, memory_size: int | None = None, device: torch.device | str = "cpu"
) -> MemorizingTransformer:
    """One of our models, in eval mode on `device`, with its memory resized when `memory_size` is given."""
    overrides = {} if memory_size is None else {"memory_size": memory_size}
    if transformers_model_type(checkpoint) == MODEL_TYPE:
        model = MemorizingForCausalLM.from_pretrained(checkpoint, **overrides).model
    else:
        model = MemorizingTransformer.from_pretrained(resolve_model_dir(checkpoint), **overrides)
    return model.to(device).eval()


def load_huggingface(
    checkpoint: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[PreTrainedModel, object]:
    """Another library's causal LM in float32 and eval mode on `device`, and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint)
