"""The Memorizing Transformer's network: a decoder-only LM whose memory layers retrieve from a kNN memory.

This file is the whole model, with no files and no tokenizer (those are `MemorizingTransformer`'s,
in pretrained.py): embeddings, blocks, the position bias, the stream state carried across segments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MemorizingConfig
from .attention import Attention
from .inputs import prepare_inputs
from .positions import relative_position_bucket, segment_distances, segment_relative_positions
from .state import MemorizingState

# Parameters only some configurations have (the memory's gate and temperature, the XL cache's
# compression): weights moved between configurations may lack them or leave them behind.
OPTIONAL_PARAMETERS = ("memory_gate", "memory_log_scale", "compress_keys", "compress_values")


@dataclass
class MemorizingTransformerOutput:
    """What the forward pass returns, by name as in a Hugging Face ModelOutput.
    loss: mean next-token cross-entropy (when labels are given). logits: (batch, seq, vocab).
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
            state,
            layer,
            None if globals_view is None else (state.globals[layer], globals_view.buckets, globals_view.allowed),
        )
        if globals_view is not None:
            state.update_globals(layer, keys, values, globals_view.positions, token_mask)
        x = x + self.dropout(attended)
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class MemorizingLM(nn.Module):
    """Decoder-only transformer with Transformer-XL caches and kNN memory layers (Wu et al., 2022).

    Streaming a long document: pass the returned `state` back in; `start_of_document`
    (batch,) bool clears the XL cache and memory of the rows that begin a new document.
    `MemorizingTransformer` is this network with its tokenizer, files and memories.
    """

    def __init__(self, config: MemorizingConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or MemorizingConfig()
        memory_layers = set(config.memory_layer_indices)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, use_memory=i in memory_layers) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
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

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def take_weights(self, source: "MemorizingLM") -> None:
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

    def new_state(self, batch_size: int, memory_device: torch.device | str | None = None) -> MemorizingState:
        """An empty stream state (no cache, empty memories) for `batch_size` rows, on the model's device;
        its memories on `memory_device` when given (e.g. "cpu" beside a model on a GPU)."""
        return MemorizingState(self.config, batch_size, device=self.device, memory_device=memory_device)

    def memory_gates(self) -> dict[str, list[float]]:
        """Each memory layer's gate per head, sigmoid(memory_gate): the share of the head's output
        that comes from the memory once it holds entries ({} when the combination is a joint softmax)."""
        gates = {}
        for i in self.config.memory_layer_indices:
            gate = getattr(self.blocks[i].attn, "memory_gate", None)
            if gate is not None:
                # Sharded by FSDP (a DTensor): gathered whole, by every rank together.
                gate = gate.detach().full_tensor() if hasattr(gate, "full_tensor") else gate.detach()
                gates[str(i)] = torch.sigmoid(gate).tolist()
        return gates

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
        input_ids, attention_mask, labels = prepare_inputs(
            input_ids, attention_mask, labels, self.config.vocab_size, self.device
        )
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
