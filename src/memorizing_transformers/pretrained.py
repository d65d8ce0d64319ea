"""MemorizingTransformer: the network of model/transformer.py as users hold it, with its
tokenizer, its files (save_pretrained / from_pretrained) and its memories (memorize,
save_memory / load_memory, each file tied to the model that wrote it by a fingerprint)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from .atomic import write_atomically
from .config import MemorizingConfig
from .data.tokenizer import load_tokenizer
from .memory.files import fingerprint, load_memory_file, save_memory_file
from .model.state import MemorizingState
from .model.transformer import OPTIONAL_PARAMETERS, MemorizingLM

STATE_FILE_FORMAT = "memorizing_transformers.MemorizingState"


class MemorizingTransformer(MemorizingLM):
    """Decoder-only transformer with Transformer-XL caches and kNN memory layers (Wu et al., 2022).

    Example:
        model = MemorizingTransformer()
        tokenized = model.tokenizer("The quick brown fox jumps over the lazy dog")
        output = model(tokenized)                 # output.logits: (1, seq, vocab)

    Streaming a long document: pass the returned `state` back in; `start_of_document`
    (batch,) bool clears the XL cache and memory of the rows that begin a new document.
    """

    def __init__(self, config: MemorizingConfig | None = None, tokenizer: Any = None) -> None:
        super().__init__(config)
        self._tokenizer_source = tokenizer
        self._tokenizer = None

    @property
    def tokenizer(self):
        """A Hugging Face tokenizer (the offline GPT-2 BPE unless another was given), loaded on first use."""
        if self._tokenizer is None:
            tokenizer = load_tokenizer(self._tokenizer_source)
            if len(tokenizer) > self.config.vocab_size:
                raise ValueError(
                    f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {self.config.vocab_size}"
                )
            self._tokenizer = tokenizer
        return self._tokenizer

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json, model.safetensors and (when loaded) the tokenizer into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(
            directory / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(self.config.to_dict(), indent=2))
        )
        # save_model (not save_file) because the embedding and output weights may be tied.
        write_atomically(directory / "model.safetensors", lambda tmp: save_model(self, tmp))
        if self._tokenizer is not None or self._tokenizer_source is not None:
            self.tokenizer.save_pretrained(directory / "tokenizer")

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any) -> "MemorizingTransformer":
        """Load a model written by `save_pretrained`. `overrides` change configuration fields that
        have no weights (memory_size, knn_k, xl_length, segment_length, memory_dtype, ...)."""
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory} holds no config.json: not a saved MemorizingTransformer")
        try:
            values = json.loads((directory / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{directory / 'config.json'} is truncated or corrupt: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{directory / 'config.json'} does not hold a configuration (a JSON object)")
        config = MemorizingConfig.from_dict({**values, **overrides})
        tokenizer = directory / "tokenizer"
        model = cls(config, tokenizer=str(tokenizer) if tokenizer.is_dir() else None)
        # Not strict: with `knn_layers` overridden to fewer layers, their gates are left unused.
        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: the model folder is incomplete")
        try:
            missing, unexpected = load_model(model, weights, strict=False, device=str(model.device))
        except SafetensorError as err:
            raise ValueError(f"{weights} is truncated or corrupt ({err})") from None
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"{directory} does not fit this configuration: {err}") from None
        unexpected = [name for name in unexpected if not name.endswith(OPTIONAL_PARAMETERS)]
        if missing or unexpected:
            raise ValueError(f"{directory} does not fit this configuration: missing {missing}, unexpected {unexpected}")
        return model

    def without_memory(self) -> "MemorizingTransformer":
        """The same weights and tokenizer with the kNN memory switched off: its layers attend to the
        segment and the XL cache only (the memory's gates and temperatures are dropped)."""
        twin = MemorizingTransformer(dataclasses.replace(self.config, knn_layers=()), tokenizer=self._tokenizer_source)
        twin._tokenizer = self._tokenizer
        twin.to(self.device).train(self.training)
        twin.take_weights(self)
        return twin

    def fingerprint(self) -> str:
        """A short hash of the configuration and the weights: memory files carry it, so that a
        memory is only ever read by the model whose keys it holds."""
        return fingerprint(self.config.to_dict(), self.state_dict())

    @torch.no_grad()
    def memorize(self, texts: str | Iterable[str], state: MemorizingState | None = None) -> MemorizingState:
        """Stream texts (one after another, as one document) into a batch-1 state: learning at
        inference time, with no weight update. Returns the state; `save_memory` keeps it."""
        state = state or self.new_state(1)
        for text in [texts] if isinstance(texts, str) else texts:
            ids = self.tokenizer(text)["input_ids"]
            if ids:
                state = self(torch.tensor([ids]), state=state).state
        return state

    def save_memory(self, state: MemorizingState, path: str | Path) -> None:
        """Write a state (XL caches and memories) to a safetensors file, atomically, with this
        model's fingerprint."""
        metadata = {
            "format": STATE_FILE_FORMAT,
            "model": self.fingerprint(),
            "batch_size": str(state.batch_size),
            "tokens_seen": str(state.tokens_seen),
            "config": json.dumps(state.config.to_dict()),
        }
        save_memory_file(path, state.state_dict(), metadata)

    def load_memory(self, path: str | Path) -> MemorizingState:
        """Read a state written by `save_memory` of this very model; other models' files are refused
        (the message says whether the configuration or only the weights differ)."""
        metadata, tensors = load_memory_file(path, STATE_FILE_FORMAT, "a memory file of a MemorizingTransformer")
        mine = self.fingerprint()
        if metadata["model"] != mine:
            saved = MemorizingConfig.from_dict(json.loads(metadata["config"])).to_dict()
            differences = sorted(k for k, v in saved.items() if self.config.to_dict().get(k) != v)
            reason = f"configurations differ in {differences}" if differences else "same configuration, other weights"
            raise ValueError(f"{path} was made by model {metadata['model']}, not by this one ({mine}): {reason}")
        state = self.new_state(int(metadata["batch_size"]))
        state.load_state_dict(tensors)
        state.tokens_seen = int(metadata["tokens_seen"])
        return state
