"""MemorizingTransformer through Hugging Face: Auto classes, save/load, generate()."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from memorizing_transformers import MemorizingConfig, MemorizingTransformer
from memorizing_transformers.hf.modeling import MemorizingForCausalLM, MemorizingHFConfig


def tiny(**overrides) -> MemorizingForCausalLM:
    torch.manual_seed(0)
    config = MemorizingConfig.preset("tiny", **overrides)
    return MemorizingForCausalLM.from_memorizing(MemorizingTransformer(config)).eval()


def test_auto_classes_round_trip(tmp_path):
    model = tiny(memory_size=64)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MemorizingHFConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MemorizingForCausalLM)
    assert loaded.config.memorizing_config() == model.config.memorizing_config()
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded.model.lm_head.weight is loaded.model.embed.weight  # still tied


def test_config_is_validated():
    with pytest.raises(ValueError, match="memory_backend must be one of"):
        MemorizingHFConfig(memory_backend="annoy")


def manual_greedy(model: MemorizingTransformer, prompt: torch.Tensor, steps: int, state=None) -> torch.Tensor:
    out = model(prompt, state=state)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(steps - 1):
        out = model(tokens[-1], state=out.state)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat([prompt] + tokens, dim=1)


def test_greedy_generate_streams_like_the_model_token_by_token():
    model = tiny()
    prompt = torch.randint(0, 512, (1, 37))  # longer than a segment: the prompt itself streams
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=12, do_sample=False)
        again = model.generate(prompt, max_new_tokens=12, do_sample=False)
        expected = manual_greedy(model.model, prompt, 12)
    assert torch.equal(generated, again)
    assert torch.equal(generated, expected)


def test_generation_reads_a_memory_filled_beforehand():
    model = tiny()
    with torch.no_grad():  # the memory layer reads memory only, whenever it holds anything, and speaks loudly
        model.model.blocks[2].attn.gate_bias.fill_(10.0)
        model.model.blocks[2].attn.out.weight.mul_(100.0)
    torch.manual_seed(1)
    document = torch.randint(0, 512, (1, 96))
    prompt = document[:, 40:48]  # a passage that lies far back in the memory, not in the XL cache
    with torch.no_grad():
        state = model(document).cache  # 96 tokens into a memory of 128
        with_memory = model.generate(prompt, max_new_tokens=10, do_sample=False, cache=state)
        without = model.generate(prompt, max_new_tokens=10, do_sample=False)
        expected = manual_greedy(model.model, prompt, 10, state=model(document).cache)
    assert torch.equal(with_memory, expected)
    assert not torch.equal(with_memory, without)
