"""Tiny random Hugging Face models the tests share (`from tiny_models import tiny_llama`)."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def tiny_llama(kv_heads: int = 2, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random Llama of 3 layers of width 32 and 4 heads (`kv_heads` key/value heads) with a
    wide initialisation, so attention is sharp and small logit errors show; `overrides` are
    LlamaConfig fields."""
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        initializer_range=0.3,
    )
    return LlamaForCausalLM(LlamaConfig(**(settings | overrides))).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    """A random GPT-2 of the same size."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=256, initializer_range=0.3)
    return GPT2LMHeadModel(config).eval()
