"""The other long-range approaches in the same code base: sliding-window attention
(Longformer-style, causal) and a causal Linformer (a learned length projection of the past
segments only), and the test that shows why Linformer's own projection cannot be used in a
causal language model."""

import dataclasses

import pytest
import torch

from memorizing_transformers import MemorizingConfig, MemorizingTransformer


def model_of(**overrides) -> MemorizingTransformer:
    torch.manual_seed(0)
    model = MemorizingTransformer(MemorizingConfig.preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.position_bias.embedding.weight.normal_(0, 1)
    return model


def leaks(run, ids: torch.Tensor) -> list[int]:
    """Positions t at which changing tokens t.. changes an output before t (a causal model: none)."""
    base = run(ids)
    leaked = []
    for t in range(1, ids.shape[1]):
        changed = ids.clone()
        changed[:, t:] = (changed[:, t:] + 1) % 512
        if not torch.allclose(run(changed)[:, :t], base[:, :t], atol=1e-5):
            leaked.append(t)
    return leaked


@pytest.mark.parametrize(
    "variant",
    [
        dict(attention_window=8, xl_length=16),
        dict(xl_compression=4, xl_length=16),
        dict(attention_window=8, xl_compression=4, xl_length=16),
        dict(attention_window=8, xl_length=16, global_tokens=3),
    ],
    ids=["sliding-window", "causal-linformer", "both", "window-and-global-tokens"],
)
def test_the_baselines_are_causal_within_and_across_segments(variant):
    model = model_of(**variant)
    with torch.no_grad():
        assert leaks(lambda ids: model(ids).logits, torch.randint(0, 512, (2, 48))) == []


def test_linformer_as_published_sees_the_future():
    # Linformer projects keys and values along the whole sequence, E (slots, n) @ K (n, d):
    # every slot mixes every position, later ones included, so an early query's output
    # depends on later tokens. The same check finds no leak in the causal variant above.
    torch.manual_seed(0)
    n, d, slots = 16, 8, 4
    embed, wq, wk, wv = torch.randn(512, d), torch.randn(d, d), torch.randn(d, d), torch.randn(d, d)
    project_k, project_v = torch.randn(slots, n), torch.randn(slots, n)

    def linformer(ids):
        x = embed[ids]  # (batch, n, d)
        q, k, v = x @ wq, x @ wk, x @ wv
        scores = q @ (project_k @ k).transpose(1, 2) / d**0.5  # (batch, n, slots): no mask can make it causal
        return scores.softmax(-1) @ (project_v @ v)

    assert leaks(linformer, torch.randint(0, 512, (2, n))) == list(range(1, n))


def test_a_window_covering_everything_is_full_attention_and_a_short_one_forgets():
    config = dict(knn_layers=(), n_layers=1, segment_length=16, xl_length=16)
    full, windowed = model_of(**config), model_of(**config, attention_window=33)
    short = model_of(**config, attention_window=5)
    ids = torch.randint(0, 512, (1, 48))
    with torch.no_grad():
        torch.testing.assert_close(windowed(ids).logits, full(ids).logits)
        base = short(ids).logits
        changed = ids.clone()
        changed[0, 30] = (changed[0, 30] + 1) % 512
        after = short(changed).logits
    assert torch.allclose(after[0, 35:], base[0, 35:], atol=1e-6)  # 5 or more tokens back: out of the window
    assert not torch.allclose(after[0, 30:35], base[0, 30:35], atol=1e-4)


def test_the_compressed_cache_is_learned_and_absent_on_a_first_segment():
    config = MemorizingConfig.preset("tiny", knn_layers=(), segment_length=16, xl_length=16)
    plain, compressed = (
        model_of(**dataclasses.asdict(config)),
        model_of(**{**dataclasses.asdict(config), "xl_compression": 4}),
    )
    missing, unexpected = compressed.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all("compress_" in name for name in missing) and len(missing) == 2 * 4
    ids = torch.randint(0, 512, (2, 32))
    first = compressed(ids[:, :16])  # no cache yet: exactly the plain model
    torch.testing.assert_close(first.logits, plain(ids[:, :16]).logits)
    second = compressed(ids[:, 16:], state=first.state, labels=ids[:, 16:])
    second.loss.backward()
    attn = compressed.blocks[0].attn
    assert attn.compress_keys.shape == (4, 16) and attn.compress_keys.grad.abs().sum() > 0
    assert attn.compress_values.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs xl_length > 0"):
        MemorizingConfig.preset("tiny", xl_compression=4, xl_length=0)


def test_forward_flops_per_token_count_what_each_variant_attends_to():
    from memorizing_transformers.evaluation.report import forward_flops_per_token

    base = MemorizingConfig.preset("tiny", knn_layers=(), xl_length=16, segment_length=16)
    flops = forward_flops_per_token(base)
    inner, d = base.n_heads * base.head_dim, base.d_model
    per_layer = 2 * d * 3 * inner + 2 * inner * d + 4 * d * base.d_ff + 4 * inner * (16 + 8.5)
    assert flops["total"] == base.n_layers * per_layer + 2 * d * base.vocab_size
    window = forward_flops_per_token(dataclasses.replace(base, attention_window=4))
    compressed = forward_flops_per_token(dataclasses.replace(base, xl_compression=2))
    assert window["layers"] < compressed["layers"] < flops["layers"]
    memory = forward_flops_per_token(dataclasses.replace(base, knn_layers=(2,), memory_size=1024))
    assert memory["memory_search"] == 2 * inner * 1024 and memory["total"] > flops["total"]


def test_global_tokens_streamed_equal_one_pass_and_start_again_with_each_document(tmp_path):
    # A sliding window of 8 and 4 global tokens, streamed in segments of 16 with an XL cache of
    # 16: the first 4 tokens of the document leave the cache and are attended from their stored
    # slots, at their true distance: the same logits as one pass over the whole document, where
    # they are simply in view.
    config = dict(knn_layers=(), segment_length=16, xl_length=16, attention_window=8, global_tokens=4, max_distance=64)
    streamed = model_of(**config)
    one_pass = model_of(**{**config, "segment_length": 64, "xl_length": 0})
    one_pass.load_state_dict(streamed.state_dict())
    ids = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        reference = one_pass(ids).logits
        state, parts = None, []
        for start in range(0, 64, 16):
            out = streamed(ids[:, start : start + 16], state=state)
            state, parts = out.state, parts + [out.logits]
        torch.testing.assert_close(torch.cat(parts, dim=1), reference, rtol=1e-4, atol=1e-4)
        without = model_of(**{**config, "global_tokens": 0})
        without.load_state_dict(streamed.state_dict())
        assert not torch.allclose(without(ids).logits[:, 40:], reference[:, 40:], atol=1e-3)
        # the state (globals included) survives save/load, and a new document starts without them
        path = tmp_path / "state.safetensors"
        streamed.save_memory(state, path)
        loaded = streamed.load_memory(path)
        assert torch.equal(loaded.doc_tokens, torch.tensor([64, 64])) and loaded.globals[0].mask.all()
        fresh = streamed(ids[:, :16], state=loaded, start_of_document=torch.tensor([True, False]))
        torch.testing.assert_close(fresh.logits[0], streamed(ids[:1, :16]).logits[0])
