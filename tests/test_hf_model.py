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
        model.model.blocks[2].attn.memory_gate.fill_(10.0)
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


def manual_beam_search(model: MemorizingTransformer, prompt: torch.Tensor, steps: int, beams: int, state=None):
    """Beam search by hand, no length penalty: every step keeps the `beams` best continuations by
    summed log-probability; each beam streams with a state of its own (a copy of `state`)."""

    def start():
        return None if state is None else state.select_rows([0])

    out = model(prompt, state=start())
    candidates = [(0.0, [], out.state, out.logits[0, -1].log_softmax(-1))]
    for step in range(steps):
        scored = [
            (score + float(logp[t]), tokens + [t], beam_state)
            for score, tokens, beam_state, logp in candidates
            for t in range(logp.numel())
        ]
        best = sorted(scored, key=lambda c: c[0], reverse=True)[:beams]
        candidates = []
        for score, tokens, beam_state in best:
            if step == steps - 1:
                candidates.append((score, tokens, None, None))
                continue
            out = model(torch.tensor([[tokens[-1]]]), state=beam_state.select_rows([0]))
            candidates.append((score, tokens, out.state, out.logits[0, -1].log_softmax(-1)))
    return torch.tensor([tokens for _, tokens, _, _ in candidates])


@pytest.mark.parametrize("filled", [False, True], ids=["fresh", "memory-filled-beforehand"])
def test_beam_search_follows_its_beams_with_their_caches_and_memories(filled):
    model = tiny()
    with torch.no_grad():  # sharp attention and a loud memory layer: a wrong cache or memory shows in the beams
        for block in model.model.blocks:
            block.attn.log_scale.add_(2.0)
            block.attn.out.weight.mul_(10.0)
        model.model.blocks[2].attn.memory_gate.fill_(3.0)
    torch.manual_seed(2)
    document, prompt = torch.randint(0, 512, (1, 80)), torch.randint(0, 512, (1, 21))
    settings = dict(
        max_new_tokens=6,
        num_beams=3,
        num_return_sequences=3,
        do_sample=False,
        length_penalty=0.0,
        early_stopping=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    with torch.no_grad():
        state = model(document).cache if filled else None
        before = None if state is None else state.memory_fill()
        generated = model.generate(prompt, cache=state, **settings)
        expected = manual_beam_search(model.model, prompt, 6, beams=3, state=state)
    assert torch.equal(generated[:, prompt.shape[1] :], expected)
    if filled:
        assert state.batch_size == 1 and state.memory_fill() == before  # the caller's state is left as it was
