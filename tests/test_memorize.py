"""Learning at inference time: memorize documents, save the memory, generate with it."""

import pytest
import torch
from tiny_models import tiny_llama

from memorizing_transformers import MemorizingConfig, MemorizingTransformer
from memorizing_transformers.cli import main

TEXT = (
    "The secret ingredient of the Fallowmere stew is cardamom. " + "Unrelated filler text about rivers and hills. " * 30
)


def tiny_model(seed: int = 0, **overrides) -> MemorizingTransformer:
    """A random tiny model (with the default GPT-2 tokenizer's vocabulary) whose memory layer
    reads only its memory, whenever that holds anything, loudly enough to change its output."""
    torch.manual_seed(seed)
    model = MemorizingTransformer(MemorizingConfig.preset("tiny", vocab_size=50257, **overrides)).eval()
    with torch.no_grad():
        attention = model.blocks[model.config.memory_layer_indices[0]].attn
        attention.memory_gate.fill_(10.0)
        attention.out.weight.mul_(100.0)
    return model


def test_memorized_document_changes_the_prediction_and_survives_save_and_load(tmp_path):
    model = tiny_model()
    state = model.memorize([TEXT])
    assert state.tokens_seen == len(model.tokenizer(TEXT)["input_ids"]) > 4 * model.config.segment_length
    model.save_memory(state, tmp_path / "kb.safetensors")
    prompt = torch.tensor([model.tokenizer("The secret ingredient of the Fallowmere stew is")["input_ids"]])
    with torch.no_grad():
        without = model(prompt).logits[0, -1]
        loaded = model.load_memory(tmp_path / "kb.safetensors")
        with_memory = model(prompt, state=loaded).logits[0, -1]
        again = model(prompt, state=model.load_memory(tmp_path / "kb.safetensors")).logits[0, -1]
    assert loaded.memory_fill() == state.memory_fill()
    torch.testing.assert_close(with_memory, again)
    assert (with_memory - without).abs().max() > 1e-3  # the document, far beyond the context, is read


def test_a_memory_file_is_refused_by_a_model_it_does_not_fit(tmp_path):
    model = tiny_model()
    model.save_memory(model.memorize(TEXT), tmp_path / "kb.safetensors")
    with pytest.raises(ValueError, match="same configuration, other weights"):
        tiny_model(seed=1).load_memory(tmp_path / "kb.safetensors")
    other = MemorizingTransformer.from_pretrained
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=r"configurations differ in \['memory_size'\]"):
        other(tmp_path / "model", memory_size=256).load_memory(tmp_path / "kb.safetensors")
    (tmp_path / "not-memory.safetensors").write_bytes((tmp_path / "model" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="is not a memory file"):
        model.load_memory(tmp_path / "not-memory.safetensors")


@pytest.mark.parametrize("saved_as", ["MemorizingTransformer", "MemorizingForCausalLM"])
def test_memorize_and_generate_commands(tmp_path, capsys, saved_as):
    from memorizing_transformers.hf.modeling import MemorizingForCausalLM

    model = tiny_model()
    (model if saved_as == "MemorizingTransformer" else MemorizingForCausalLM.from_memorizing(model)).save_pretrained(
        tmp_path / "model"
    )
    (tmp_path / "doc.txt").write_text(TEXT)
    main(["memorize", str(tmp_path / "model"), str(tmp_path / "doc.txt"), "--out", str(tmp_path / "kb.safetensors")])
    assert "memorized" in capsys.readouterr().out
    prompt = ["--prompt", "The secret ingredient of the Fallowmere stew is", "--max-new-tokens", "8"]
    main(["generate", str(tmp_path / "model"), "--memory", str(tmp_path / "kb.safetensors"), *prompt])
    with_memory = capsys.readouterr().out
    main(["generate", str(tmp_path / "model"), "--memory", str(tmp_path / "kb.safetensors"), *prompt])
    assert capsys.readouterr().out == with_memory  # greedy: deterministic
    main(["generate", str(tmp_path / "model"), *prompt])
    assert capsys.readouterr().out != with_memory


def tiny_llama_checkpoint(path) -> None:
    """A random tiny Llama with the GPT-2 tokenizer, saved as any Hugging Face model is."""
    from memorizing_transformers.data.tokenizer import load_tokenizer

    tiny_llama(vocab_size=50257, num_hidden_layers=2, max_position_embeddings=1024).save_pretrained(path)
    load_tokenizer().save_pretrained(path)


def test_memorize_and_generate_commands_with_a_hugging_face_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memorizing_transformers.hf.files import memory_file_settings
    from memorizing_transformers.hf.retrofit import add_memory

    tiny_llama_checkpoint(tmp_path / "llama")
    (tmp_path / "doc.txt").write_text(TEXT)
    kb = str(tmp_path / "kb.safetensors")
    main(
        [
            "memorize",
            str(tmp_path / "llama"),
            str(tmp_path / "doc.txt"),
            "--out",
            kb,
            "--knn-layers",
            "-1",
            "--knn-k",
            "8",
            "--window",
            "64",
        ]
    )
    assert "memorized" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llama")
    memorized = len(tokenizer(TEXT)["input_ids"])
    settings = memory_file_settings(kb)
    assert (settings["knn_layers"], settings["knn_k"], settings["memory_size"]) == ([1], 8, memorized)  # sized to it

    prompt = ["--prompt", "The secret ingredient of the Fallowmere stew is", "--max-new-tokens", "8"]
    main(["generate", str(tmp_path / "llama"), "--memory", kb, *prompt])
    with_memory = capsys.readouterr().out
    main(["generate", str(tmp_path / "llama"), "--memory", kb, *prompt])
    assert capsys.readouterr().out == with_memory  # greedy: deterministic
    main(["generate", str(tmp_path / "llama"), *prompt])
    assert capsys.readouterr().out != with_memory

    # The command did what the Python API does: load, then generate after the memorized text.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    handle = add_memory(model, **settings)
    handle.load(kb)
    assert handle.position == memorized and handle.fill() == {1: [memorized]}
    ids = tokenizer(prompt[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = handle.generate(ids, window=512, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) + "\n" == with_memory


def test_pretrained_options_are_refused_for_our_own_checkpoints(tmp_path, cli_error):
    tiny_model().save_pretrained(tmp_path / "model")
    (tmp_path / "doc.txt").write_text(TEXT)
    message = cli_error(
        [
            "memorize",
            tmp_path / "model",
            tmp_path / "doc.txt",
            "--out",
            tmp_path / "kb.safetensors",
            "--knn-layers",
            "0",
            "--knn-k",
            "4",
        ]
    )
    assert "--knn-layers --knn-k: only for Hugging Face models other than ours" in message


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--positions", "fixed", "--fixed-distance", "64"], {"positions": "fixed", "fixed_distance": 64}),
        (["--memory-backend", "faiss_flat", "--memory-dtype", "bfloat16"], {"memory_backend": "faiss_flat"}),
    ],
)
def test_memorize_options_go_into_the_memory_file_and_back(tmp_path, capsys, options, expected):
    from memorizing_transformers.hf.files import memory_file_settings

    tiny_llama_checkpoint(tmp_path / "llama")
    (tmp_path / "doc.txt").write_text(TEXT)
    kb = str(tmp_path / "kb.safetensors")
    main(["memorize", str(tmp_path / "llama"), str(tmp_path / "doc.txt"), "--out", kb, "--window", "16", *options])
    settings = memory_file_settings(kb)
    assert {name: settings[name] for name in expected} == expected
    capsys.readouterr()
    prompt = ["--prompt", "The secret", "--max-new-tokens", "4"]
    main(["generate", str(tmp_path / "llama"), "--memory", kb, *prompt])
    generated = capsys.readouterr().out
    assert generated.strip()
    if "--memory-dtype" in options:
        assert settings["memory_dtype"] == torch.bfloat16
        main(["generate", str(tmp_path / "llama"), "--memory", kb, "--memory-backend", "exact", *prompt])
        assert capsys.readouterr().out == generated  # the file searched another way: both searches exact


def test_search_and_storage_options_are_refused_for_our_own_checkpoints(tmp_path, cli_error):
    tiny_model().save_pretrained(tmp_path / "model")
    (tmp_path / "doc.txt").write_text(TEXT)
    message = cli_error(
        ["memorize", tmp_path / "model", tmp_path / "doc.txt", "--out", tmp_path / "kb", "--memory-dtype", "bfloat16"]
    )
    assert "--memory-dtype: only for Hugging Face models other than ours" in message
