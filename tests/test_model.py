import dataclasses

import pytest
import torch

from memorizing_transformers import MemorizingConfig, MemorizingTransformer
from memorizing_transformers.model.attention import Attention, local_attention
from memorizing_transformers.model.state import MemorizingState


def tiny(**overrides) -> MemorizingConfig:
    return MemorizingConfig.preset("tiny", **overrides)


def make_model(**overrides) -> MemorizingTransformer:
    model = MemorizingTransformer(tiny(**overrides)).eval()
    # Give the gate and position bias non-trivial values so tests exercise them.
    with torch.no_grad():
        for block in model.blocks:
            block.attn.position_bias.embedding.weight.normal_(0, 1)
            if hasattr(block.attn, "memory_gate"):
                block.attn.memory_gate.normal_(0, 1)
    return model


def test_seed_example():
    model = MemorizingTransformer()
    tokenized = model.tokenizer("The quick brown fox jumps over the lazy dog")
    output = model(tokenized)
    assert output.logits.shape == (1, 9, 50257)
    assert torch.isfinite(output.logits).all()
    assert output.state.memory_fill() == {2: [9]}


def test_default_tokenizer_is_gpt2_and_a_local_folder_can_be_given(tmp_path):
    model = MemorizingTransformer(tiny(vocab_size=50257))
    assert model.tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert len(model.tokenizer) == 50257
    model.tokenizer.save_pretrained(tmp_path / "tok")
    other = MemorizingTransformer(tiny(vocab_size=50257), tokenizer=str(tmp_path / "tok"))
    assert other.tokenizer("Hello world")["input_ids"] == [15496, 995]
    too_small = MemorizingTransformer(tiny(vocab_size=1000), tokenizer=str(tmp_path / "tok"))
    with pytest.raises(ValueError, match="tokenizer has 50257 tokens but the model's vocab_size is 1000"):
        too_small.tokenizer
    with pytest.raises(ValueError, match="neither 'gpt2' nor a local tokenizer folder"):
        MemorizingTransformer(tiny(), tokenizer="no/such/dir").tokenizer


def test_loss_matches_manual_cross_entropy_and_ignores_padding():
    model = make_model()
    ids = torch.randint(0, 512, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    out = model(ids, attention_mask=mask, labels=ids)
    logits = out.logits[:, :-1]
    targets = ids[:, 1:].clone()
    targets[~mask[:, 1:]] = -100
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), targets.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected)
    # A right-padded row gives the same logits on its real tokens as that row alone.
    alone = model(ids[1:, :30])
    assert torch.allclose(out.logits[1, :30], alone.logits[0], atol=1e-5)
    assert out.state.memory_fill() == {2: [40, 30]}  # padding never written


@pytest.mark.parametrize("combine", ["gate", "joint"])
def test_causal_within_and_across_segments(combine):
    model = make_model(memory_combine=combine)
    ids = torch.randint(0, 512, (2, 64))  # four segments of 16
    base = model(ids).logits
    for t in (5, 16, 33, 63):
        changed = ids.clone()
        changed[:, t:] = torch.randint(0, 512, (2, 64 - t))
        logits = model(changed).logits
        assert torch.allclose(logits[:, :t], base[:, :t], atol=1e-5), f"position {t} leaked backwards"
        assert not torch.allclose(logits[:, t:], base[:, t:], atol=1e-5)


def test_one_call_equals_streaming_segment_by_segment():
    model = make_model()
    ids = torch.randint(0, 512, (2, 48))
    whole = model(ids)
    state, parts = None, []
    for s in range(0, 48, 16):
        out = model(ids[:, s : s + 16], state=state)
        state = out.state
        parts.append(out.logits)
    assert torch.allclose(torch.cat(parts, dim=1), whole.logits, atol=1e-5)
    assert state.memory_fill() == whole.state.memory_fill() == {2: [48, 48]}


def test_xl_cache_equals_one_pass_over_both_segments():
    # Without memory layers, segment 2 with a one-segment XL cache attends to exactly
    # what one causal pass over both segments attends to, at the same relative distances.
    config = tiny(knn_layers=(), segment_length=16, xl_length=16, max_distance=64)
    model = MemorizingTransformer(config).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.position_bias.embedding.weight.normal_(0, 1)
    one_pass = MemorizingTransformer(dataclasses.replace(config, segment_length=32))
    one_pass.load_state_dict(model.state_dict())
    ids = torch.randint(0, 512, (2, 32))
    first = model(ids[:, :16])
    second = model(ids[:, 16:], state=first.state)
    reference = one_pass.eval()(ids).logits
    assert first.state.cache_length == 16
    assert torch.allclose(first.logits, reference[:, :16], atol=1e-5)
    assert torch.allclose(second.logits, reference[:, 16:], atol=1e-5)
    # Without the cache, segment 2 sees less and its logits differ.
    no_cache = MemorizingTransformer(dataclasses.replace(config, xl_length=0))
    no_cache.load_state_dict(model.state_dict())
    alone = no_cache.eval()(ids[:, 16:], state=no_cache(ids[:, :16]).state).logits
    assert not torch.allclose(alone, reference[:, 16:], atol=1e-3)


def test_start_of_document_resets_only_its_row():
    model = make_model()
    a, b = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 16))
    state = model(a).state
    out = model(b, state=state, start_of_document=torch.tensor([True, False]))
    fresh = model(b[:1])  # row 0 as if the stream began here
    continued = model(b[1:], state=model(a[1:]).state)  # row 1 continuing its document
    assert torch.allclose(out.logits[0], fresh.logits[0], atol=1e-5)
    assert torch.allclose(out.logits[1], continued.logits[0], atol=1e-5)
    assert out.state.memory_fill() == {2: [16, 48]}
    assert not torch.allclose(out.logits[0], model(b, state=model(a).state).logits[0], atol=1e-4)


def test_memory_changes_later_segments_and_empty_memory_contributes_nothing():
    model = make_model()
    ids = torch.randint(0, 512, (1, 32))
    with_memory = model(ids).logits
    reference = MemorizingTransformer(tiny(knn_layers=()))
    missing, unexpected = reference.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and unexpected == ["blocks.2.attn.memory_gate"]
    without = reference.eval()(ids).logits
    # Segment 1: memory still empty, so the memory layer equals a plain layer.
    assert torch.allclose(with_memory[:, :16], without[:, :16], atol=1e-6)
    assert not torch.allclose(with_memory[:, 16:], without[:, 16:], atol=1e-4)


def test_empty_memory_rows_contribute_nothing_in_a_batch():
    model = make_model()
    ids = torch.randint(0, 512, (2, 16))
    state = model.new_state(2)
    state.memories[2].add(
        torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16), mask=torch.tensor([[False] * 8, [True] * 8])
    )
    out = model(ids, state=state)
    plain = model(ids)  # empty state
    assert torch.allclose(out.logits[0], plain.logits[0], atol=1e-6)
    assert not torch.allclose(out.logits[1], plain.logits[1], atol=1e-4)


def identity_attention(combine: str) -> Attention:
    """One head of width 16 whose q, k, v and output are the input itself."""
    config = tiny(d_model=16, n_heads=1, head_dim=16, memory_combine=combine, knn_k=4, qk_scale_init=50.0)
    layer = Attention(config, use_memory=True)
    with torch.no_grad():
        layer.qkv.weight.copy_(torch.cat([torch.eye(16)] * 3))
        layer.out.weight.copy_(torch.eye(16))
        if combine == "gate":
            layer.memory_gate.fill_(10.0)
    return layer


def layer_state(config: MemorizingConfig, memory) -> MemorizingState:
    """A stream state that gives layer 0 `memory` and no XL cache."""
    state = MemorizingState(dataclasses.replace(config, xl_length=0), 1)
    state.memories = {0: memory}
    return state


@pytest.mark.parametrize("combine", ["gate", "joint"])
def test_attention_layer_retrieves_a_distinctive_earlier_key(combine):
    from memorizing_transformers import KNNMemory
    from memorizing_transformers.model.positions import (
        relative_position_bucket,
        segment_distances,
        segment_relative_positions,
    )

    layer = identity_attention(combine)
    memory = KNNMemory(1, 1, 16, capacity=256)
    state = layer_state(tiny(d_model=16, n_heads=1, head_dim=16), memory)
    relative = segment_relative_positions(8, 0)
    buckets, allowed = relative_position_bucket(segment_distances(8, 0)), (relative <= 0)[None, None]
    mask = torch.ones(1, 8, dtype=torch.bool)
    first = torch.nn.functional.normalize(torch.randn(1, 8, 16), dim=-1) * 3
    layer(first, buckets, allowed, mask, state, 0)
    for _ in range(5):
        layer(torch.randn(1, 8, 16), buckets, allowed, mask, state, 0)
    probe = torch.randn(1, 8, 16)
    probe[0, 6] = first[0, 3] / 3  # a later query equal (in direction) to an early key
    found = memory.search(torch.nn.functional.normalize(probe, dim=-1)[:, None], 4)
    assert found.slots[0, 0, 6, 0] == 3 and found.scores[0, 0, 6, 0] > 0.999
    out, _, _ = layer(probe, buckets, allowed, mask, state, 0)
    # The output at that query is (almost) the value stored with the distinctive key.
    assert torch.nn.functional.cosine_similarity(out[0, 6], first[0, 3], dim=0) > 0.99


def test_a_memory_temperature_of_its_own_makes_retrieval_sharp_where_local_attention_is_diffuse():
    from memorizing_transformers import KNNMemory
    from memorizing_transformers.model.positions import (
        relative_position_bucket,
        segment_distances,
        segment_relative_positions,
    )

    relative = segment_relative_positions(8, 0)
    buckets, allowed = relative_position_bucket(segment_distances(8, 0)), (relative <= 0)[None, None]
    mask = torch.ones(1, 8, dtype=torch.bool)
    torch.manual_seed(0)
    past, probe = torch.randn(5, 1, 8, 16), torch.randn(1, 8, 16)
    probe[0, 6] = past[2, 0, 3]
    readout = {}
    for memory_scale in (None, 50.0):
        config = tiny(
            d_model=16, n_heads=1, head_dim=16, knn_k=32, qk_scale_init=1.0, memory_qk_scale_init=memory_scale
        )
        layer = Attention(config, use_memory=True)
        with torch.no_grad():
            layer.qkv.weight.copy_(torch.cat([torch.eye(16)] * 3))
            layer.out.weight.copy_(torch.eye(16))
            layer.memory_gate.fill_(10.0)  # the output is the memory's readout
        state = layer_state(config, KNNMemory(1, 1, 16, capacity=64))
        for segment in past:
            layer(segment, buckets, allowed, mask, state, 0)
        readout[memory_scale] = layer(probe, buckets, allowed, mask, state, 0)[0][0, 6]
    similarity = {s: torch.nn.functional.cosine_similarity(r, past[2, 0, 3], dim=0) for s, r in readout.items()}
    assert similarity[50.0] > 0.99 > 0.8 > similarity[None]  # at the shared scale of 1, a blur of 32 values


def test_exhaustive_joint_memory_of_evicted_entries_is_full_attention():
    # A one-layer model whose memory holds what left its XL cache, searched exhaustively
    # (k >= everything stored), with the joint softmax and the XL cache at least max_distance
    # long: [memory ; XL cache ; segment] is the whole past, at the bias full attention gives.
    config = tiny(
        n_layers=1,
        knn_layers=(0,),
        segment_length=16,
        xl_length=32,
        max_distance=32,
        memory_size=256,
        knn_k=64,
        memory_combine="joint",
        memory_writes="evicted",
        qk_scale_init=8.0,
    )
    model = MemorizingTransformer(config).eval()
    with torch.no_grad():
        model.blocks[0].attn.position_bias.embedding.weight.normal_(0, 1)
    full = MemorizingTransformer(dataclasses.replace(config, knn_layers=(), segment_length=96, xl_length=0)).eval()
    full.load_state_dict(model.state_dict())
    ids = torch.randint(0, 512, (2, 96))
    streamed = model(ids)  # six segments: the memory fills from the fourth on
    assert streamed.state.memory_fill() == {0: [96 - 32] * 2}  # all but what the cache holds at the end
    torch.testing.assert_close(streamed.logits, full(ids).logits, atol=1e-4, rtol=1e-4)
    # Writing each segment instead (the paper's rule) puts the cache's tokens in twice: no longer equal.
    paper = MemorizingTransformer(dataclasses.replace(config, memory_writes="segment")).eval()
    paper.load_state_dict(model.state_dict())
    assert not torch.allclose(paper(ids).logits[:, 48:], streamed.logits[:, 48:], atol=1e-3)


def test_retrieved_entries_get_the_farthest_buckets_bias_in_the_joint_softmax():
    # Full attention gives every key max_distance or more back the last bucket's bias; the
    # joint softmax gives it to retrieved entries: a very negative one silences the memory.
    from memorizing_transformers import KNNMemory
    from memorizing_transformers.model.positions import (
        relative_position_bucket,
        segment_distances,
        segment_relative_positions,
    )

    layer = identity_attention("joint")
    relative = segment_relative_positions(8, 0)
    buckets, allowed = relative_position_bucket(segment_distances(8, 0)), (relative <= 0)[None, None]
    mask = torch.ones(1, 8, dtype=torch.bool)
    past, probe = torch.randn(1, 8, 16), torch.randn(1, 8, 16)
    probe[0, 6] = 3 * past[0, 3]  # a query that finds an earlier key (whose value is a third of its own)
    outputs = {}
    for far_bias in (0.0, -1e4):
        with torch.no_grad():
            layer.position_bias.embedding.weight[-1].fill_(far_bias)
        state = layer_state(tiny(d_model=16, n_heads=1, head_dim=16), KNNMemory(1, 1, 16, capacity=64))
        layer(past, buckets, allowed, mask, state, 0)
        outputs[far_bias] = layer(probe, buckets, allowed, mask, state, 0)[0]
    empty = layer_state(tiny(d_model=16, n_heads=1, head_dim=16), KNNMemory(1, 1, 16, capacity=64))
    alone = layer(probe, buckets, allowed, mask, empty, 0)[0]
    assert torch.allclose(outputs[-1e4], alone, atol=1e-5)
    assert not torch.allclose(outputs[0.0][0, 6], alone[0, 6], atol=1e-3)


def test_gradient_reaches_local_attention_and_gate_but_never_the_memory():
    model = make_model().train()
    ids = torch.randint(0, 512, (2, 16))
    captured = []
    handle = model.embed.register_forward_hook(lambda mod, args, out: captured.append(out))
    first = model(ids, labels=ids)
    second = model(torch.randint(0, 512, (2, 16)), labels=ids, state=first.state)
    handle.remove()
    attn = model.blocks[2].attn
    grads = torch.autograd.grad(
        second.loss,
        [attn.qkv.weight, attn.memory_gate, attn.log_scale, attn.position_bias.embedding.weight, captured[0]],
        allow_unused=True,
    )
    for g in grads[:4]:
        assert g is not None and g.abs().sum() > 0
    assert grads[4] is None  # nothing of segment 1's graph is reachable from segment 2's loss
    memory = second.state.memories[2]
    assert not memory.keys.requires_grad and not memory.values.requires_grad
    assert all(not c.keys.requires_grad and not c.values.requires_grad for c in second.state.xl)


def test_local_attention_written_out_equals_the_fused_kernel_with_its_gradients():
    """On a CPU a bias that needs a gradient takes the written-out product: the same outputs and
    gradients (q, keys, values and the bias, broadcast over the batch) as scaled_dot_product_attention."""
    torch.manual_seed(0)
    q, keys, values, bias = (*(torch.randn(2, 3, 5, 8) for _ in range(3)), torch.randn(1, 3, 5, 9))
    keys, values = torch.cat([torch.randn(2, 3, 4, 8), keys], 2), torch.cat([torch.randn(2, 3, 4, 8), values], 2)
    allowed = torch.ones(5, 9, dtype=torch.bool).tril(4)  # an XL cache of 4, then causal
    grads = []
    for attend in (
        local_attention,
        lambda *a: torch.nn.functional.scaled_dot_product_attention(*a[:3], attn_mask=a[3], scale=1.0),
    ):
        leaves = [t.clone().requires_grad_() for t in (q, keys, values, bias)]
        out = attend(*leaves[:3], leaves[3].masked_fill(~allowed, float("-inf")))
        (out * torch.linspace(-1, 1, 8)).sum().backward()
        grads.append([out, *(t.grad for t in leaves)])
    for ours, fused in zip(*grads):
        torch.testing.assert_close(ours, fused)


def test_memory_dtype_is_honoured():
    model = make_model(memory_dtype="bfloat16")
    out = model(torch.randint(0, 512, (1, 40)))
    assert out.state.memories[2].keys.dtype == torch.bfloat16
    assert torch.isfinite(out.logits).all()


def test_presets():
    paper = MemorizingConfig.preset("paper")
    assert (paper.n_layers, paper.d_model, paper.n_heads, paper.head_dim, paper.d_ff) == (12, 1024, 8, 128, 4096)
    assert (paper.segment_length, paper.knn_k, paper.memory_size, paper.memory_layer_indices) == (512, 32, 65536, (8,))
    assert MemorizingConfig().memory_layer_indices == (2,)
    assert MemorizingConfig.preset("small", memory_size=65536).memory_size == 65536
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        MemorizingConfig.preset("huge")


def test_bad_input_gets_clear_errors():
    model = make_model()
    with pytest.raises(
        ValueError, match=r"input_ids must have shape \(batch, seq\) or \(seq,\), got shape \(1, 2, 3\)"
    ):
        model(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="token id 512 is out of range for vocab_size 512"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        model(torch.tensor([[-1, 5]]))
    with pytest.raises(ValueError, match="input_ids is empty"):
        model(MemorizingTransformer(tiny(vocab_size=50257)).tokenizer(""))
    with pytest.raises(ValueError, match="input_ids must hold integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="equal-length rows"):
        model([[1, 2], [3]])
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\) but input_ids has \(1, 4\)"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))
    state = model(torch.ones(2, 4, dtype=torch.long)).state
    with pytest.raises(ValueError, match="state holds 2 rows but input_ids has batch size 3"):
        model(torch.ones(3, 4, dtype=torch.long), state=state)
    with pytest.raises(ValueError, match=r"start_of_document must have shape \(batch,\) = \(2,\)"):
        model(torch.ones(2, 4, dtype=torch.long), state=state, start_of_document=[True])
    with pytest.raises(ValueError, match="different configuration"):
        model(torch.ones(2, 4, dtype=torch.long), state=MemorizingState(tiny(memory_size=64), 2))
    with pytest.raises(ValueError, match="kNN layer index 4 is out of range for a model of 4 layers"):
        tiny(knn_layers=(4,))
    with pytest.raises(ValueError, match="memory_dtype must be one of"):
        tiny(memory_dtype="int8")
    with pytest.raises(ValueError, match=r"n_kv_heads must be a positive divisor of n_heads \(4\), got 3"):
        tiny(n_kv_heads=3)


def test_initialisation_options():
    model = MemorizingTransformer(tiny(memory_gate_init=-3.0, previous_token_bias_init=5.0))
    assert torch.allclose(torch.sigmoid(model.blocks[2].attn.memory_gate), torch.full((4,), 0.0474), atol=1e-4)
    bias = model.blocks[0].attn.position_bias.embedding.weight  # (buckets, heads)
    assert bias[1].eq(5.0).all() and bias[0].eq(0).all() and bias[2:].eq(0).all()
    assert model.blocks[1].attn.position_bias.embedding.weight.eq(0).all()
    default = MemorizingTransformer(tiny())
    assert default.blocks[2].attn.memory_gate.eq(0).all()
    assert default.blocks[0].attn.position_bias.embedding.weight.eq(0).all()


def test_without_memory_is_the_same_weights_with_the_memory_off():
    model = make_model()
    ids = torch.randint(0, 512, (2, 16))  # one segment: the memory is still empty, its gate shut
    twin = model.without_memory()
    assert twin.config.knn_layers == () and not twin.training
    torch.testing.assert_close(twin(ids).logits, model(ids).logits)
    longer = torch.randint(0, 512, (2, 64))  # later segments read the memory: the twin differs
    assert not torch.allclose(twin(longer).logits, model(longer).logits, atol=1e-4)
    with pytest.raises(ValueError, match="do not fit this model"):
        MemorizingTransformer(tiny(d_ff=64)).take_weights(model)


def test_a_model_saved_with_the_earlier_names_loads(tmp_path):
    # Earlier versions called the joint mode "joint_softmax" and the gate parameter `gate_bias`.
    from safetensors.torch import load_file, save_file

    assert MemorizingConfig(memory_combine="joint_softmax").memory_combine == "joint"
    model = make_model()
    with torch.no_grad():
        model.blocks[2].attn.memory_gate.fill_(1.5)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["blocks.2.attn.gate_bias"] = weights.pop("blocks.2.attn.memory_gate")
    save_file(weights, tmp_path / "model.safetensors")
    loaded = MemorizingTransformer.from_pretrained(tmp_path)
    assert loaded.blocks[2].attn.memory_gate.eq(1.5).all()
    ids = torch.randint(0, 512, (1, 32))
    torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits)


@pytest.mark.parametrize("other", [dict(xl_compression=4), dict(global_tokens=4)])
def test_evicted_writes_store_what_leaves_the_cache_whatever_else_the_layer_attends(other):
    # The memory layer is layer 0: its keys depend on the embedding alone, so compressing the
    # XL cache or attending global tokens must leave what it writes to memory unchanged.
    base = dict(knn_layers=(0,), memory_writes="evicted", xl_length=16, segment_length=16, memory_size=128)
    plain = MemorizingTransformer(tiny(**base)).eval()
    varied = MemorizingTransformer(tiny(**base, **other)).eval()
    varied.take_weights(plain)
    ids = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        written = [model(ids).state.memories[0] for model in (plain, varied)]
    assert torch.equal(written[0].next_slot, written[1].next_slot) and written[0].fill.tolist() == [48, 48]
    torch.testing.assert_close(written[1].keys, written[0].keys)
    torch.testing.assert_close(written[1].values, written[0].values)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(memory_combine="joint"),
        dict(xl_compression=4, knn_layers=()),
        dict(global_tokens=3, attention_window=12),
        dict(n_kv_heads=1),
    ],
)
def test_grouped_query_attention_is_attention_with_each_key_value_head_repeated(overrides):
    """A model with 2 key/value heads for 4 query heads (cache, memory, compression and global tokens
    included) computes what the same model with 4 key/value heads, head h a copy of head h // 2, does."""
    grouped = make_model(**{"n_kv_heads": 2, **overrides})
    kv_heads, d = grouped.config.kv_heads, grouped.config.head_dim
    full = MemorizingTransformer(dataclasses.replace(grouped.config, n_kv_heads=None)).eval()
    weights = grouped.state_dict()
    for name, weight in weights.items():
        if name.endswith("qkv.weight"):  # (queries + keys + values, d_model): repeat each key/value head
            q, k, v = weight.split([grouped.config.n_heads * d, kv_heads * d, kv_heads * d])
            k, v = (t.view(kv_heads, d, -1).repeat_interleave(4 // kv_heads, dim=0).flatten(0, 1) for t in (k, v))
            weights[name] = torch.cat([q, k, v])
    full.load_state_dict(weights)
    ids = torch.randint(0, 512, (2, 80))
    out, expected = grouped(ids, labels=ids), full(ids, labels=ids)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    memory = out.state.memories.get(2)
    assert memory is None or memory.num_heads == kv_heads
    assert out.state.xl[0].keys.shape[1] == kv_heads  # the cache keeps only the key/value heads
    out.loss.backward()  # and it trains
    assert all(p.grad is not None for p in grouped.parameters() if p.requires_grad)
