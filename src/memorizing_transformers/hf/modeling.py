"""MemorizingTransformer as a Hugging Face model: AutoConfig, AutoModelForCausalLM, generate().

Thin wrappers: `MemorizingHFConfig` is a `PretrainedConfig` carrying every field of
`MemorizingConfig` (validated by it), and `MemorizingForCausalLM` is a
`PreTrainedModel` + `GenerationMixin` around a `MemorizingTransformer`. Importing this
module registers both with the Auto classes.

Generation streams: the prompt runs segment by segment (each segment reading the memory
written by the ones before), then every generated token is a segment of its own, so the
context the model slides past keeps going into the XL cache and the memory. The stream
state (`MemorizingState`) is what `generate` carries as its cache; pass one in
(`generate(..., cache=state)`) to generate with a memory filled beforehand.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from ..config import MemorizingConfig
from ..model.state import MemorizingState
from ..pretrained import MemorizingTransformer

MODEL_TYPE = "memorizing_transformer"
FIELDS = tuple(f.name for f in dataclasses.fields(MemorizingConfig))


class MemorizingHFConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, **kwargs: Any) -> None:
        ours = {name: kwargs.pop(name) for name in FIELDS if name in kwargs}
        config = MemorizingConfig(**ours)  # validates, fills defaults
        for name, value in config.to_dict().items():
            setattr(self, name, list(value) if isinstance(value, tuple) else value)
        kwargs.setdefault("tie_word_embeddings", config.tie_embeddings)
        super().__init__(**kwargs)

    def memorizing_config(self) -> MemorizingConfig:
        return MemorizingConfig.from_dict({name: getattr(self, name) for name in FIELDS})

    @classmethod
    def from_memorizing(cls, config: MemorizingConfig, **kwargs: Any) -> "MemorizingHFConfig":
        return cls(**config.to_dict(), **kwargs)


class GenerationState(MemorizingState):
    """The stream state as Hugging Face's `generate` carries it: a cache that is recurrent (as a
    linear-attention one is), so generate leaves the slicing of inputs to the model, and whose
    rows follow beam search's reordering in place."""

    is_compileable = False
    is_croppable = False
    is_linear = (True,)

    @classmethod
    def adopt(cls, state: MemorizingState) -> "GenerationState":
        """`state` itself, given the methods generate asks of a cache (its class becomes this one:
        the caller's object keeps being the one generation updates)."""
        state.__class__ = cls
        return state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tokens_seen

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Row i becomes row beam_idx[i], in place."""
        if torch.equal(beam_idx.cpu(), torch.arange(self.batch_size)):
            return
        selected = self.select_rows(beam_idx)
        self.batch_size, self.xl, self.memories = selected.batch_size, selected.xl, selected.memories
        self.globals, self.doc_tokens = selected.globals, selected.doc_tokens


@dataclass
class MemorizingCausalLMOutput(ModelOutput):
    """loss: mean next-token cross-entropy (with labels). logits: (batch, seq, vocab).
    cache: the stream state after this input (XL caches and kNN memories)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: MemorizingState | None = None


class MemorizingForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MemorizingHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: MemorizingHFConfig, model: MemorizingTransformer | None = None) -> None:
        super().__init__(config)
        self.model = model if model is not None else MemorizingTransformer(config.memorizing_config())
        if config.tie_embeddings:
            self._tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
        self.post_init()

    @classmethod
    def from_memorizing(cls, model: MemorizingTransformer) -> "MemorizingForCausalLM":
        """Wrap an existing MemorizingTransformer (sharing its weights)."""
        return cls(MemorizingHFConfig.from_memorizing(model.config), model=model)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the model's own stream state

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # MemorizingTransformer initialises its own weights

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: MemorizingState | None = None,
        labels: torch.Tensor | None = None,
        start_of_document: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MemorizingCausalLMOutput:
        """See MemorizingTransformer.forward; `cache` is its `state`."""
        out = self.model(
            input_ids, attention_mask=attention_mask, labels=labels, state=cache, start_of_document=start_of_document
        )
        return MemorizingCausalLMOutput(loss=out.loss, logits=out.logits, cache=GenerationState.adopt(out.state))

    def generate(self, *args: Any, cache: MemorizingState | None = None, **kwargs: Any) -> Any:
        """Hugging Face's generate; a `cache` passed in (a state with a memory filled beforehand) is
        read and updated in place."""
        return super().generate(*args, cache=None if cache is None else GenerationState.adopt(cache), **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        cache: MemorizingState | None = None,
        attention_mask: torch.Tensor | None = None,
        is_first_iteration: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The tokens the stream has not read yet, with their part of the attention mask. On the
        first step the whole prompt is new, even to a cache passed in with a memory already filled."""
        if is_first_iteration and cache is not None:
            cache.tokens_seen = 0
            rows = input_ids.shape[0]
            if cache.batch_size != rows:  # beam search, several sequences per prompt: each row's copies
                if rows % cache.batch_size:
                    raise ValueError(f"the cache holds {cache.batch_size} rows, but generation runs {rows}")
                cache = cache.select_rows(torch.arange(cache.batch_size).repeat_interleave(rows // cache.batch_size))
        seen = 0 if cache is None else cache.tokens_seen
        if seen >= input_ids.shape[1]:
            raise ValueError(f"the cache has read {seen} tokens, but the input holds only {input_ids.shape[1]}")
        new = input_ids[:, seen:]
        mask = None if attention_mask is None else attention_mask[:, seen:]
        return {"input_ids": new, "attention_mask": mask, "cache": cache}


def generate_text(
    model: MemorizingTransformer, prompt: str, state: MemorizingState | None = None, **kwargs: Any
) -> str:
    """The text `generate` continues `prompt` with (greedy unless `kwargs` say otherwise), reading
    the memory of `state` (e.g. `model.load_memory(path)`) when one is given."""
    ids = torch.tensor([model.tokenizer(prompt)["input_ids"]], device=model.device)
    if ids.numel() == 0:
        raise ValueError("the prompt is empty")
    with torch.no_grad():
        output = MemorizingForCausalLM.from_memorizing(model).generate(ids, cache=state, **kwargs)
    return model.tokenizer.decode(output[0, ids.shape[1] :])


AutoConfig.register(MODEL_TYPE, MemorizingHFConfig)
AutoModelForCausalLM.register(MemorizingHFConfig, MemorizingForCausalLM)
