"""add_memory on tiny random Llama and GPT-2 models from transformers."""

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_gpt2, tiny_llama

from memorizing_transformers.hf.files import memory_file_settings
from memorizing_transformers.hf.retrofit import add_memory

MODELS = {"llama-gqa": lambda: tiny_llama(2), "llama-mha": lambda: tiny_llama(4), "gpt2": tiny_gpt2}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("combine", ["joint", "gate"])
def test_empty_or_disabled_memory_leaves_the_logits_unchanged(name, combine):
    model = MODELS[name]()
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        reference = model(ids).logits
        handle = add_memory(
            model, knn_layers=[-1, 0], memory_size=64, knn_k=4, memory_combine=combine, memory_gate_init=0.0
        )
        first = model(ids).logits  # memory empty: nothing to retrieve, then this call is written
        assert handle.fill() == {0: [24, 24], 2: [24, 24]}
        with handle.disabled():
            disabled = model(ids).logits
        second = model(ids).logits  # now the memory holds this very input: the output changes
    torch.testing.assert_close(first, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(disabled, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(second, reference, atol=1e-3)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("stride", [8, 4, 3])  # no overlap, half-window overlap, a ragged end
def test_streaming_with_a_memory_of_the_whole_prefix_equals_full_attention(name, stride):
    # Every layer retrieves every earlier token (k >= all of them) into its own softmax:
    # window-by-window streaming must then equal one causal pass over the whole input.
    # Under RoPE this holds only because keys are stored rotated at their true positions.
    model = MODELS[name]()
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        full = model(ids).logits
        handle = add_memory(model, knn_layers=[0, 1, 2], memory_size=64, knn_k=40, memory_combine="joint")
        streamed = handle.stream(ids, window=8, stride=stride)
    assert handle.fill() == {0: [40], 1: [40], 2: [40]}  # every token written exactly once
    torch.testing.assert_close(streamed, full, rtol=1e-4, atol=1e-4)
    handle.reset()
    with torch.no_grad():
        losses = handle.stream(ids, window=8, stride=stride, losses=True)
    expected = torch.nn.functional.cross_entropy(full[0, :-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(losses[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("combine, name, init", [("gate", "memory_gate", -3.0), ("joint", "memory_bias", 0.0)])
def test_the_memory_parameter_is_trainable_and_only_acts_with_memory(combine, name, init):
    model = tiny_llama()
    handle = add_memory(model, knn_layers=[1], memory_size=64, knn_k=4, memory_combine=combine, memory_gate_init=-3.0)
    param = getattr(model.model.layers[1].self_attn, name)
    assert param.shape == (4,) and torch.equal(param.detach(), torch.full((4,), init))
    assert f"model.layers.1.self_attn.{name}" in dict(model.named_parameters())
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        model(ids)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert param.grad is not None and param.grad.abs().sum() > 0
    handle.reset()
    assert handle.fill() == {1: [0]}


def test_the_joint_bias_weighs_the_retrieved_entries():
    # A very negative bias shuts the memory out (the original model); a positive one
    # moves the output further from it than the zero-training joint softmax does.
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        reference = model(ids).logits
        handle = add_memory(model, knn_layers=[1], memory_size=64, knn_k=4, memory_combine="joint")
        bias = model.model.layers[1].self_attn.memory_bias
        model(ids)
        distances = {}
        with handle.read_only():
            for value in (-1e4, 0.0, 3.0):
                bias.fill_(value)
                distances[value] = float((model(ids).logits - reference).abs().max())
    assert distances[-1e4] < 1e-5
    assert distances[3.0] > distances[0.0] > 1e-3


def test_memory_file_round_trip_and_refusals(tmp_path):
    model = tiny_llama()
    handle = add_memory(model, knn_layers=[1], memory_size=32, knn_k=4)
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        model(ids)
        handle.save(tmp_path / "kb.safetensors")
        after_save = model(ids).logits
    fresh = tiny_llama()
    fresh_handle = add_memory(fresh, knn_layers=[1], memory_size=32, knn_k=4)
    fresh_handle.load(tmp_path / "kb.safetensors")
    assert fresh_handle.fill() == {1: [20]}
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, after_save)
    other_layers = add_memory(tiny_llama(), knn_layers=[2], memory_size=32, knn_k=4)
    with pytest.raises(ValueError, match=r"holds memories of layers \[1\]"):
        other_layers.load(tmp_path / "kb.safetensors")
    other_size = add_memory(tiny_llama(), knn_layers=[1], memory_size=64, knn_k=4)
    with pytest.raises(ValueError, match="the memory of layer 1 is"):
        other_size.load(tmp_path / "kb.safetensors")
    other_model = add_memory(tiny_gpt2(), knn_layers=[1], memory_size=32, knn_k=4)
    with pytest.raises(ValueError, match="was made for the model LlamaForCausalLM"):
        other_model.load(tmp_path / "kb.safetensors")
    other_weights = add_memory(tiny_llama(seed=1), knn_layers=[1], memory_size=32, knn_k=4)
    with pytest.raises(ValueError, match="same configuration, other weights"):
        other_weights.load(tmp_path / "kb.safetensors")
    other_config = add_memory(tiny_llama(rms_norm_eps=1e-5), knn_layers=[1], memory_size=32, knn_k=4)
    with pytest.raises(ValueError, match="same shapes, other configuration"):
        other_config.load(tmp_path / "kb.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="is not a memory file of add_memory"):
        memory_file_settings(tmp_path / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match="no memory file at"):
        handle.load(tmp_path / "missing.safetensors")


def test_clear_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="layer 5 is out of range for a model of 3 layers"):
        add_memory(model, knn_layers=[5])
    with pytest.raises(ValueError, match="combine must be 'joint' or 'gate'"):
        add_memory(model, memory_combine="sum")
    add_memory(model, knn_layers=[0])
    with pytest.raises(ValueError, match="already has memory"):
        add_memory(model, knn_layers=[1])


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_generate_after_a_long_prompt_equals_full_attention_greedy(name):
    # The prompt's older tokens live in memory (retrieved whole, k >= their number); the
    # last window and the new tokens attend locally, at their true positions.
    model = MODELS[name]()
    prompt = torch.randint(0, 97, (1, 30))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)
        handle = add_memory(model, knn_layers=[0, 1, 2], memory_size=64, knn_k=40, memory_combine="joint")
        generated = handle.generate(prompt, window=8, **settings)
    assert handle.fill() == {0: [22], 1: [22], 2: [22]}  # the prompt but its last window; generation writes nothing
    assert torch.equal(generated, expected)


def test_gpt2_refuses_inputs_beyond_its_learned_positions():
    handle = add_memory(tiny_gpt2(), knn_layers=[0], memory_size=64, knn_k=4)
    with pytest.raises(ValueError, match="learned positions up to 256"):
        handle.stream(torch.zeros(1, 300, dtype=torch.long), window=64)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_streams_go_on_where_the_last_one_ended_also_after_save_and_load(name, tmp_path):
    # Two streams, the memory saved and loaded into a fresh copy (add_memory's settings read
    # back from the file), a third stream: together one causal pass over the whole input,
    # as every earlier token is retrieved, only because positions go on from call to call.
    model = MODELS[name]()
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        full = model(ids).logits
        handle = add_memory(model, knn_layers=[0, 1, 2], memory_size=64, knn_k=40)
        first = handle.stream(ids[:, :16], window=8)
        second = handle.stream(ids[:, 16:28], window=8)
        handle.save(tmp_path / "kb.safetensors")
        fresh = add_memory(MODELS[name](), **memory_file_settings(tmp_path / "kb.safetensors"))
        fresh.load(tmp_path / "kb.safetensors")
        third = fresh.stream(ids[:, 28:], window=8)
    assert (handle.position, fresh.position) == (28, 40)
    torch.testing.assert_close(torch.cat([first, second, third], dim=1), full, rtol=1e-4, atol=1e-4)
    handle.reset()
    assert handle.position == 0


def test_the_ivf_settings_reach_the_memories_and_their_file(tmp_path):
    model = tiny_llama()
    handle = add_memory(model, knn_layers=[1], memory_size=64, knn_k=4, memory_backend="ivf", ivf_list_size=8,
                        ivf_nprobe=3)  # fmt: skip
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 20)))
    backend = model.model.layers[1].self_attn.knn_memory.memory.backend
    assert (backend.list_size, backend.nprobe) == (8, 3)
    handle.save(tmp_path / "kb.safetensors")
    settings = memory_file_settings(tmp_path / "kb.safetensors")
    assert (settings["memory_backend"], settings["ivf_list_size"], settings["ivf_nprobe"]) == ("ivf", 8, 3)
    with pytest.raises(ValueError, match="ivf list_size and nprobe must be positive"):
        add_memory(tiny_llama(), memory_backend="ivf", ivf_nprobe=0)
    with pytest.raises(ValueError, match="unknown memory backend 'annoy'"):
        add_memory(tiny_llama(), memory_backend="annoy")


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
@pytest.mark.parametrize(
    "settings",
    [dict(num_beams=2, num_return_sequences=2, do_sample=False), dict(do_sample=True, num_return_sequences=3, top_k=5)],
    ids=["beams", "samples"],
)
def test_generate_expands_the_memory_to_beams_and_return_sequences(name, settings):
    # The memory holds the prompt's older tokens (retrieved whole): beam search and several
    # sequences per prompt read each row's memory, equal to full attention over the prompt,
    # and the memory itself keeps its one filled row.
    model = MODELS[name]()
    prompt = torch.randint(0, 97, (1, 30))
    settings = dict(max_new_tokens=5, pad_token_id=0, **settings)
    with torch.no_grad():
        torch.manual_seed(3)
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)
        handle = add_memory(model, knn_layers=[0, 1, 2], memory_size=64, knn_k=40, memory_combine="joint")
        torch.manual_seed(3)
        generated = handle.generate(prompt, window=8, **settings)
    assert generated.shape[0] == settings["num_return_sequences"]
    assert torch.equal(generated, expected)
    assert handle.fill() == {0: [22], 1: [22], 2: [22]}


def test_a_filled_memory_is_never_silently_replaced_by_another_batch_size(tmp_path):
    model = tiny_llama()
    handle = add_memory(model, knn_layers=[0], memory_size=64, knn_k=4)
    with torch.no_grad():
        handle.stream(torch.randint(0, 97, (1, 16)), window=8)
        handle.save(tmp_path / "kb.safetensors")
        with pytest.raises(ValueError, match="holds 1 filled row.*this input has 2 rows"):
            model(torch.randint(0, 97, (2, 8)))
        assert handle.fill() == {0: [16]}
        fresh = add_memory(tiny_llama(), knn_layers=[0], memory_size=64, knn_k=4)
        fresh.load(tmp_path / "kb.safetensors")
        with pytest.raises(ValueError, match="holds 1 filled row"):
            fresh.stream(torch.randint(0, 97, (2, 8)), window=8)
        handle.reset()  # emptied: the next input's batch size is taken
        model(torch.randint(0, 97, (2, 8)))
    assert handle.fill() == {0: [8, 8]}


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_padding_is_never_written(name):
    model = MODELS[name]()
    handle = add_memory(model, knn_layers=[0, 2], memory_size=64, knn_k=4)
    ids = torch.randint(0, 97, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding in the second row
    with torch.no_grad():
        model(ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask)
    assert handle.fill() == {0: [20, 12], 2: [20, 12]}


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_plain_generate_after_add_memory_never_counts_a_token_twice(name):
    # generate keeps every token in its KV cache: the memory is read, never written, so with
    # an empty memory the scores are the original model's at every step.
    model = MODELS[name]()
    prompt = torch.randint(0, 97, (1, 12))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)
        handle = add_memory(model, knn_layers=[0, 1, 2], memory_size=64, knn_k=8)
        got = model.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)
    assert handle.fill() == {0: [0], 1: [0], 2: [0]}
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.scores, expected.scores)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")


def test_resize_gives_every_layer_a_memory_of_the_new_size():
    model = tiny_llama()
    handle = add_memory(model, knn_layers=[0, 2], memory_size=64, knn_k=4)
    with torch.no_grad():
        handle.stream(torch.randint(0, 97, (1, 40)), window=8)
        handle.resize(16)
        assert handle.fill() == {0: [], 2: []} and handle.position == 0 and handle.settings["memory_size"] == 16
        handle.stream(torch.randint(0, 97, (1, 40)), window=8)
    assert handle.fill() == {0: [16], 2: [16]}
    with pytest.raises(ValueError, match="memory_size must be positive"):
        handle.resize(0)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_sink_tokens_stay_when_a_small_memory_evicts_them(name, tmp_path):
    model = MODELS[name]()
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        full = model(ids).logits
        # A memory holding everything, 4 tokens of it as sinks: still exactly full attention.
        handle = add_memory(model, knn_layers=[0, 1, 2], memory_size=64, knn_k=40, sink_tokens=4)
        torch.testing.assert_close(handle.stream(ids, window=8), full, rtol=1e-4, atol=1e-4)
        assert handle.fill() == {0: [36], 1: [36], 2: [36]}  # every token written once: 4 to the sinks, 36 to memory
        # A small memory evicts the first tokens; with sinks they stay, and the stream is nearer full attention.
        handle.resize(8)
        small = handle.stream(ids, window=8)
        assert handle.layers[0].sink.memory.fill.tolist() == [4] and handle.fill()[0] == [8]
        handle.save(tmp_path / "kb.safetensors")
        fresh = add_memory(MODELS[name](), **memory_file_settings(tmp_path / "kb.safetensors"))
        fresh.load(tmp_path / "kb.safetensors")
        assert fresh.layers[0].sink.memory.fill.tolist() == [4] and torch.equal(
            fresh.layers[0].sink.memory.keys, handle.layers[0].sink.memory.keys
        )
    no_sinks = add_memory(MODELS[name](), knn_layers=[0, 1, 2], memory_size=8, knn_k=40)
    with torch.no_grad():
        evicted = no_sinks.stream(ids, window=8)
    error = lambda x: (x.log_softmax(-1) - full.log_softmax(-1))[0, 24:].abs().mean()  # noqa: E731
    assert error(small) < error(evicted)


def test_a_memory_file_with_the_earlier_argument_names_loads(tmp_path):
    # Earlier versions named add_memory's arguments layers, k, combine, gate_init and backend.
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        handle = add_memory(model, knn_layers=[1], memory_size=32, knn_k=4, memory_combine="gate")
        handle.stream(ids, window=8)
    path = tmp_path / "kb.safetensors"
    handle.save(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    earlier = {"knn_layers": "layers", "knn_k": "k", "memory_combine": "combine", "memory_gate_init": "gate_init"}
    settings = {
        earlier.get(k, k).replace("memory_backend", "backend"): v for k, v in json.loads(metadata["settings"]).items()
    }
    save_file(load_file(path), path, metadata={**metadata, "settings": json.dumps(settings)})
    assert memory_file_settings(path) == {**handle.settings, "memory_dtype": torch.float32}
    fresh = add_memory(tiny_llama(), **memory_file_settings(path))
    fresh.load(path)
    assert fresh.fill() == handle.fill() and fresh.position == 16


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_fixed_positions_score_every_retrieved_key_as_if_it_stood_at_the_fixed_distance(kv_heads):
    # The reference rotates every retrieved key explicitly: the model's key for position j
    # (rotated there by its RoPE) turned to position i - D for the query at position i.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, layer, distance, window = tiny_llama(kv_heads), 1, 100, 8
    attention = model.model.layers[layer].self_attn
    captured = {}
    attention.q_proj.register_forward_hook(lambda m, a, out: captured.setdefault("q", []).append(out))
    attention.k_proj.register_forward_hook(lambda m, a, out: captured.setdefault("k", []).append(out))
    handle = add_memory(model, knn_layers=[layer], memory_size=64, knn_k=64, positions="fixed", fixed_distance=distance)
    ids = torch.randint(0, 97, (1, 24))
    with torch.no_grad(), handle.layers[layer].retrieved.record() as records:
        handle.stream(ids, window=window)
    assert handle.settings["positions"] == "fixed" and handle.settings["fixed_distance"] == distance
    heads, dim, groups = 4, 8, 4 // kv_heads
    q = torch.cat(captured["q"], dim=1).view(1, 24, heads, dim).transpose(1, 2)  # (1, heads, 24, dim)
    k = torch.cat(captured["k"], dim=1).view(1, 24, kv_heads, dim).transpose(1, 2)
    rope = lambda x, p: apply_rotary_pos_emb(x, x, *model.model.rotary_emb(x, torch.tensor([p])))[0]  # noqa: E731
    for call, record in enumerate(records):
        for t in range(window):
            i = call * window + t  # the query's position
            for h in range(heads):
                q_i = rope(q[:, h : h + 1, i : i + 1], [i])[0, 0, 0]
                for slot, logit, valid in zip(
                    record["slots"][0, h, t], record["logits"][0, h, t], record["valid"][0, h, t]
                ):
                    if not valid:
                        continue
                    j = int(slot)  # slots fill in order: slot j holds position j
                    assert j < call * window  # only earlier calls' tokens are in memory
                    k_j = rope(k[:, h // groups : h // groups + 1, j : j + 1], [i - distance])[0, 0, 0]
                    torch.testing.assert_close(logit, q_i @ k_j * dim**-0.5, rtol=1e-4, atol=1e-4)
    assert sum(int(r["valid"].sum()) for r in records) == heads * window * (8 + 16)


def test_fixed_positions_need_rope():
    with pytest.raises(ValueError, match="needs rotary position embeddings"):
        add_memory(tiny_gpt2(), knn_layers=[0], positions="fixed")
    with pytest.raises(ValueError, match="positions must be one of"):
        add_memory(tiny_llama(), knn_layers=[0], positions="clamped-somehow")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_memorize_stores_what_stream_stores_without_computing_every_logit(name):
    ids = torch.randint(0, 97, (1, 30))
    stored = []
    for read in ("stream", "memorize"):
        model = MODELS[name]()
        handle = add_memory(model, knn_layers=[0, 2], memory_size=64, knn_k=4)
        with torch.no_grad():
            handle.stream(ids, window=8) if read == "stream" else handle.memorize([ids], window=8)
        stored.append({i: layer.memory.state_dict() for i, layer in handle.layers.items()})
        assert handle.position == 30
    for i in stored[0]:
        for name_, tensor in stored[0][i].items():
            torch.testing.assert_close(stored[1][i][name_], tensor)


def test_a_memory_file_is_read_only_in_the_position_mode_its_keys_were_stored_for(tmp_path):
    ids = torch.randint(0, 97, (1, 16))
    handle = add_memory(tiny_llama(), knn_layers=[0], memory_size=32, knn_k=4, positions="fixed")
    with torch.no_grad():
        handle.stream(ids, window=8)
    handle.save(tmp_path / "kb.safetensors")
    with pytest.raises(ValueError, match="stored for positions='fixed'.*reads them with positions='true'"):
        add_memory(tiny_llama(), knn_layers=[0], memory_size=32, knn_k=4).load(tmp_path / "kb.safetensors")
    add_memory(tiny_llama(), **memory_file_settings(tmp_path / "kb.safetensors")).load(tmp_path / "kb.safetensors")


def test_fixed_positions_follow_the_model_when_it_is_cast():
    # The frequencies are read from the model's rotary module at each call, so a cast after
    # add_memory changes the rotation the memory undoes exactly as it changes the model's.
    model = tiny_llama()
    handle = add_memory(model, knn_layers=[0], memory_size=64, knn_k=64, positions="fixed", fixed_distance=0)
    model.to(torch.float64)
    assert handle.layers[0].rotary.inv_freq.dtype == torch.float64


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("settings", [{}, {"sink_tokens": 3}, {"memory_combine": "gate"}])
def test_logits_from_the_search_scores_equal_those_from_the_gathered_keys(name, settings):
    # Without a gradient to carry, a memory layer takes the retrieved logits from the search's own
    # scores and gathers no keys; with one, it recomputes them from the keys: the same outputs.
    model = MODELS[name]()
    handle = add_memory(model, knn_layers=[0, 2], memory_size=32, knn_k=5, **settings)
    with torch.no_grad():
        handle.stream(torch.randint(0, 97, (1, 24)), window=8)
    ids = torch.randint(0, 97, (1, 8))
    with handle.read_only():
        with torch.no_grad():
            scored = model(ids).logits
        recomputed = model(ids).logits
    assert recomputed.requires_grad and not scored.requires_grad
    torch.testing.assert_close(scored, recomputed.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_write_only_reads_as_the_model_alone_and_stores_every_token(name):
    ids = torch.randint(0, 97, (1, 30))
    handle = add_memory(MODELS[name](), knn_layers=[0, 2], memory_size=64, knn_k=4)
    with torch.no_grad(), handle.disabled():
        alone = handle.stream(ids, window=8)
    handle.reset()
    with torch.no_grad(), handle.write_only():
        written = handle.stream(ids, window=8)
    torch.testing.assert_close(written, alone)  # no retrieval: each window as the model reads it
    assert handle.fill() == {0: [30], 2: [30]} and all(layer.searching for layer in handle.layers.values())
    stored = {key: tensor.clone() for key, tensor in handle.layers[0].memory.state_dict().items()}
    handle.reset()
    with torch.no_grad():
        handle.memorize([ids], window=8)  # searching: layer 0's keys do not depend on what is retrieved
    for key, tensor in handle.layers[0].memory.state_dict().items():
        torch.testing.assert_close(stored[key], tensor)
    with torch.no_grad():  # and what was written is read afterwards
        assert not torch.allclose(handle.stream(ids[:, :8], window=8), alone[:, :8])


def test_write_only_memorize_stores_each_layers_own_keys_and_values_read_with_context():
    # Fixed positions store keys unrotated: exactly k_proj's and v_proj's outputs as the model
    # alone computes them, in every layer. Each call reads again the `overlap` tokens before
    # those it stores (the first call stores all it reads): windows of 8 advancing by 5.
    model, window, overlap = tiny_llama(2), 8, 3
    captured = {}
    for i, layer in enumerate(model.model.layers):
        for name in ("k", "v"):
            getattr(layer.self_attn, f"{name}_proj").register_forward_hook(
                lambda m, a, out, key=(i, name): captured.setdefault(key, []).append(out)
            )
    handle = add_memory(model, knn_layers=[0, 1], memory_size=64, knn_k=4, positions="fixed")
    ids = torch.randint(0, 97, (1, 24))
    calls = [(0, 8, 0), (5, 13, 3), (10, 18, 3), (15, 23, 3), (20, 24, 3)]  # (first, end, tokens not stored)
    with torch.no_grad(), handle.disabled():
        for first, end, _ in calls:
            model(input_ids=ids[:, first:end], position_ids=torch.arange(first, end)[None])
    expected = {
        key: torch.cat([out[:, skip:] for out, (_, _, skip) in zip(outs, calls)], dim=1)
        .view(1, 24, 2, 8)
        .transpose(1, 2)
        for key, outs in captured.items()
    }
    captured.clear()
    with torch.no_grad():
        assert handle.memorize([ids], window=window, search=False, overlap=overlap) == 24
    assert len(captured[(0, "k")]) == len(calls) and handle.fill() == {0: [24], 1: [24]}
    for i, layer in handle.layers.items():
        torch.testing.assert_close(layer.memory.keys[:, :, :24], expected[(i, "k")])
        torch.testing.assert_close(layer.memory.values[:, :, :24], expected[(i, "v")])
    with pytest.raises(ValueError, match="overlap"):
        handle.memorize([ids], window=window, search=False, overlap=window)


def test_generate_can_memorize_a_long_prompt_without_searching():
    handle = add_memory(tiny_llama(2), knn_layers=[0, 2], memory_size=64, knn_k=4, positions="fixed")
    prompt = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        out = handle.generate(prompt, window=16, search=False, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 43) and torch.equal(out[:, :40], prompt)
    assert handle.fill() == {0: [24], 2: [24]} and all(layer.searching for layer in handle.layers.values())
