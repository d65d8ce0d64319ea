"""The Memorizing Transformer: a decoder-only LM whose memory layers retrieve from a kNN memory."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from transformers.utils import ModelOutput

from ..atomic import write_atomically
from ..config import MemorizingConfig
from ..data.tokenizer import load_tokenizer
from ..memory.files import fingerprint
from .attention import Attention
from .positions import relative_position_bucket, segment_distances, segment_relative_positions
from .state import MemorizingState

# Parameters only some configurations have (the memory's gate and temperature, the XL cache's
# compression): weights moved between configurations may lack them or leave them behind.
OPTIONAL_PARAMETERS = ("gate_bias", "memory_log_scale", "compress_keys", "compress_values")


@dataclass
class MemorizingTransformerOutput(ModelOutput):
    """loss: mean next-token cross-entropy (when labels are given). logits: (batch, seq, vocab).
    state: the stream state after this input, to pass to the next call."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: MemorizingState | None = None


@dataclass
class GlobalView:
    """The document's global tokens as one segment sees them (see `_globals_view`)."""

    positions: torch.Tensor  # (batch, seq) document position of each token of the segment
    buckets: torch.Tensor  # (batch, seq, global_tokens) T5 buckets of the distance to each global token
    allowed: torch.Tensor  # (batch, 1, 1, global_tokens) bool: attended from its stored slot


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: MemorizingConfig, use_memory: bool) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config, use_memory=use_memory)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.d_ff, bias=False),
            nn.GELU(),
            nn.Linear(config.d_ff, config.d_model, bias=False),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        layer: int,
        state: MemorizingState,
        buckets,
        allowed,
        token_mask,
        globals_view: "GlobalView | None" = None,
    ) -> torch.Tensor:
        attended, keys, values = self.attn(
            self.attn_norm(x),
            buckets,
            allowed,
            token_mask,
            state.xl[layer],
            state.memories.get(layer),
            None if globals_view is None else (state.globals[layer], globals_view.buckets, globals_view.allowed),
        )
        state.update_xl(layer, keys, values, token_mask)
        if globals_view is not None:
            state.update_globals(layer, keys, values, globals_view.positions, token_mask)
        x = x + self.dropout(attended)
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class MemorizingTransformer(nn.Module):
    """Decoder-only transformer with Transformer-XL caches and kNN memory layers (Wu et al., 2022).

    Example:
        model = MemorizingTransformer()
        tokenized = model.tokenizer("The quick brown fox jumps over the lazy dog")
        output = model(tokenized)                 # output.logits: (1, seq, vocab)

    Streaming a long document: pass the returned `state` back in; `start_of_document`
    (batch,) bool clears the XL cache and memory of the rows that begin a new document.
    """

    def __init__(self, config: MemorizingConfig | None = None, tokenizer: Any = None) -> None:
        super().__init__()
        self.config = config = config or MemorizingConfig()
        memory_layers = set(config.memory_layer_indices)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, use_memory=i in memory_layers) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._tokenizer_source = tokenizer
        self._tokenizer = None
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02), residual projections scaled down by depth.
        for name, p in self.named_parameters():
            if p.dim() == 2 and "position_bias" not in name and "compress_" not in name:  # projections keep their own
                std = (
                    0.02 / math.sqrt(2 * self.config.n_layers)
                    if name.endswith(("out.weight", "mlp.2.weight"))
                    else 0.02
                )
                nn.init.normal_(p, mean=0.0, std=std)
        with torch.no_grad():  # causal T5 bucket 1 is exactly distance 1
            self.blocks[0].attn.position_bias.embedding.weight[1] += self.config.previous_token_bias_init

    # ------------------------------------------------------------------ conveniences
    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

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

    def take_weights(self, source: "MemorizingTransformer") -> None:
        """Copy `source`'s weights into this model. Only the parameters of a mechanism one of the
        two lacks (OPTIONAL_PARAMETERS) may be missing from `source` (they keep their initial
        values) or from this model (they are dropped); any other difference is refused."""
        try:
            missing, unexpected = self.load_state_dict(source.state_dict(), strict=False)
        except RuntimeError as err:  # shapes that differ
            raise ValueError(f"those weights do not fit this model: {err}") from None
        differ = [name for name in missing + unexpected if not name.endswith(OPTIONAL_PARAMETERS)]
        if differ:
            raise ValueError(f"those weights do not fit this model: they differ in {differ}")

    def without_memory(self) -> "MemorizingTransformer":
        """The same weights with the kNN memory switched off: its layers attend to the segment and
        the XL cache only (the memory's gates and temperatures are dropped)."""
        twin = MemorizingTransformer(dataclasses.replace(self.config, knn_layers=()), tokenizer=self._tokenizer_source)
        twin._tokenizer = self._tokenizer
        twin.to(self.device).train(self.training)
        twin.take_weights(self)
        return twin

    def new_state(self, batch_size: int) -> MemorizingState:
        """An empty stream state (no cache, empty memories) for `batch_size` rows, on the model's device."""
        return MemorizingState(self.config, batch_size, device=self.device)

    def memory_gates(self) -> dict[str, list[float]]:
        """Each memory layer's gate per head, sigmoid(gate_bias): the share of the head's output
        that comes from the memory once it holds entries ({} when the combination is a joint softmax)."""
        return {
            str(i): torch.sigmoid(self.blocks[i].attn.gate_bias.detach()).tolist()
            for i in self.config.memory_layer_indices
            if hasattr(self.blocks[i].attn, "gate_bias")
        }

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
        """Write a state (XL caches and memories) with this model's fingerprint, atomically."""
        state.save(path, self.fingerprint())

    def load_memory(self, path: str | Path) -> MemorizingState:
        """Read a state written by `save_memory` of this very model; other models' files are refused."""
        return MemorizingState.load(path, self.config, self.fingerprint(), device=self.device)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | Mapping | list,
        attention_mask: torch.Tensor | list | None = None,
        labels: torch.Tensor | list | None = None,
        state: MemorizingState | None = None,
        start_of_document: torch.Tensor | list | None = None,
    ) -> MemorizingTransformerOutput:
        """Run tokens through the model, segment by segment, carrying the stream state.

        input_ids: (batch, seq) or (seq,) token ids, or the tokenizer's output (a mapping
            with `input_ids` and optionally `attention_mask`). Inputs longer than
            `config.segment_length` are cut into segments processed in order, each one
            reading the memory written by the ones before.
        attention_mask: (batch, seq), 1 for tokens and 0 for padding; padding is masked
            from attention, from the loss and from the memory.
        labels: (batch, seq) token ids, shifted inside the model (labels[t+1] is the
            target at t); -100 is ignored.
        state: the `state` returned by the previous call of the same streams; None
            starts from an empty state.
        start_of_document: (batch,) bool; rows that are True forget their XL cache and
            memory before this input.
        """
        input_ids, attention_mask, labels = self._prepare_inputs(input_ids, attention_mask, labels)
        batch, seq = input_ids.shape
        if state is None:
            state = self.new_state(batch)
        elif not isinstance(state, MemorizingState):
            raise TypeError(f"state must be a MemorizingState returned by this model, got {type(state).__name__}")
        elif state.batch_size != batch:
            raise ValueError(f"state holds {state.batch_size} rows but input_ids has batch size {batch}")
        elif state.config != self.config:
            raise ValueError("state was made for a model with a different configuration")
        if start_of_document is not None:
            start = torch.as_tensor(start_of_document, device=self.device)
            if start.shape != (batch,):
                raise ValueError(f"start_of_document must have shape (batch,) = ({batch},), got {tuple(start.shape)}")
            state.reset(start.bool())

        state.tokens_seen += seq
        L = self.config.segment_length
        hidden = torch.cat(
            [
                self._forward_segment(input_ids[:, s : s + L], attention_mask[:, s : s + L], state)
                for s in range(0, seq, L)
            ],
            dim=1,
        )
        logits = self.lm_head(self.norm(hidden))  # (batch, seq, vocab)
        loss = None
        if labels is not None:
            targets = labels.masked_fill(~attention_mask, -100)[:, 1:]
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return MemorizingTransformerOutput(loss=loss, logits=logits, state=state)

    def _forward_segment(
        self, input_ids: torch.Tensor, token_mask: torch.Tensor, state: MemorizingState
    ) -> torch.Tensor:
        """One segment (batch, seq <= segment_length) -> final hidden states (batch, seq, d_model)."""
        seq = input_ids.shape[1]
        cache_len = state.cache_length
        relative = segment_relative_positions(seq, cache_len, device=self.device)  # (seq, cache_len + seq)
        distances = segment_distances(seq, cache_len, device=self.device)  # (cache_len + 2 seq - 1,)
        buckets = relative_position_bucket(distances, True, self.config.num_buckets, self.config.max_distance)
        key_mask = token_mask if state.xl[0] is None else torch.cat([state.xl[0].mask, token_mask], dim=1)
        # A query sees earlier valid keys and always itself (so no row is fully masked).
        allowed = ((relative <= 0) & key_mask[:, None, None, :]) | (relative == 0)  # (batch, 1, seq, cache_len + seq)
        if self.config.attention_window:  # sliding window: only keys fewer than attention_window tokens back
            allowed = allowed & (relative > -self.config.attention_window)
        globals_view = None
        if self.config.global_tokens:
            globals_view, key_is_global = self._globals_view(state, token_mask, relative.shape[1] - seq)
            allowed = allowed | ((relative <= 0) & key_mask[:, None, None, :] & key_is_global[:, None, None, :])
        if bool((allowed == allowed[:1]).all()):  # the usual case (no padding, no reset row): one mask for the batch
            allowed = allowed[:1]
        x = self.embed(input_ids)
        for layer, block in enumerate(self.blocks):
            x = block(x, layer, state, buckets, allowed, token_mask, globals_view)
        state.doc_tokens += token_mask.sum(dim=1)
        return x

    def _globals_view(self, state: MemorizingState, token_mask: torch.Tensor, cache_len: int):
        """What the document's global tokens (its first `global_tokens`) look like from this segment.

        A global token among the keys [XL cache ; segment] is attended there, window or not
        (`key_is_global`, (batch, cache_len + seq)); one that has left them is attended from its
        stored slot (`GlobalView.allowed`), with the position bias of its true distance."""
        count = self.config.global_tokens
        positions = state.doc_tokens[:, None] + token_mask.long().cumsum(dim=1) - 1  # (batch, seq) document positions
        cache_mask = state.xl[0].mask if state.xl[0] is not None else token_mask[:, :0]
        cache_positions = state.doc_tokens[:, None] - cache_mask.long().flip(1).cumsum(dim=1).flip(
            1
        )  # valid entries only
        key_positions = torch.cat([cache_positions, positions], dim=1)  # (batch, cache_len + seq)
        key_is_global = (key_positions >= 0) & (key_positions < count)
        first_in_view = state.doc_tokens - cache_mask.sum(dim=1)  # (batch,) the oldest key position still in view
        slots = torch.arange(count, device=self.device)
        stored = state.globals[0].mask if state.globals[0] is not None else torch.zeros_like(key_is_global[:, :count])
        allowed = (stored & (slots[None, :] < first_in_view[:, None]))[:, None, None, :]  # (batch, 1, 1, count)
        buckets = relative_position_bucket(
            slots[None, None, :] - positions[:, :, None], True, self.config.num_buckets, self.config.max_distance
        )  # (batch, seq, count)
        return GlobalView(positions, buckets, allowed), key_is_global

    def _prepare_inputs(
        self, input_ids, attention_mask, labels
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Validate and convert inputs to (batch, seq) tensors on the model's device."""
        if isinstance(input_ids, Mapping):
            if "input_ids" not in input_ids:
                raise ValueError(f"the input mapping has no 'input_ids' (keys: {sorted(input_ids)})")
            if attention_mask is None:
                attention_mask = input_ids.get("attention_mask")
            input_ids = input_ids["input_ids"]
        input_ids = _as_2d("input_ids", input_ids, self.device)
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty: there are no tokens to run the model on (was the text empty?)")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        input_ids = input_ids.long()
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is out of range for vocab_size {self.config.vocab_size}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = _as_2d("attention_mask", attention_mask, self.device).bool()
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
            )
        if labels is not None:
            labels = _as_2d("labels", labels, self.device).long()
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids has {tuple(input_ids.shape)}")
        return input_ids, attention_mask, labels


def _as_2d(name: str, value: Any, device: torch.device) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value, device=device)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{name} must be a tensor or a (nested) list of equal-length rows: {err}") from None
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, seq) or (seq,), got shape {tuple(tensor.shape)}")
    return tensor
