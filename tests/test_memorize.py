"""Learning at inference time: memorize documents, save the memory, generate with it."""

import pytest
import torch

from memorizing_transformers import MemorizingConfig, MemorizingTransformer
from memorizing_transformers.cli import main

TEXT = "The secret ingredient of the Fallowmere stew is cardamom. " + "Unrelated filler text about rivers and hills. " * 30


def tiny_model(seed: int = 0, **overrides) -> MemorizingTransformer:
    """A random tiny model (with the default GPT-2 tokenizer's vocabulary) whose memory layer
    reads only its memory, whenever that holds anything, loudly enough to change its output."""
    torch.manual_seed(seed)
    model = MemorizingTransformer(MemorizingConfig.preset("tiny", vocab_size=50257, **overrides)).eval()
    with torch.no_grad():
        attention = model.blocks[model.config.memory_layer_indices[0]].attn
        attention.gate_bias.fill_(10.0)
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


def test_memorize_and_generate_commands(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path / "model")
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
