"""Learning at inference time with a trained model: a fact memorized far outside the
window decides the answer.

A tiny Llama is trained (a few hundred steps, full attention) to answer `kI?` with the
value stated earlier in its document by the single token `kI=vJ`, among filler words.
With add_memory (zero training of the memory) the document is memorized through a
window that ends before the question, so the facts reach the question only through
the memory: the model answers correctly, and without the memory it guesses.
"""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from memorizing_transformers.cli import main
from memorizing_transformers.hf.retrofit import add_memory

KEYS, VALUES, FILLERS, BODY, QUESTIONS = 4, 8, 16, 24, 4
WORDS = (
    ["<unk>"]
    + [f"k{i}=v{j}" for i in range(KEYS) for j in range(VALUES)]
    + [f"k{i}?" for i in range(KEYS)]
    + [f"v{j}" for j in range(VALUES)]
    + [f"w{i}" for i in range(FILLERS)]
)


def fact_tokenizer() -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word of WORDS."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<unk>")


def document(generator: torch.Generator) -> tuple[list[str], list[int]]:
    """BODY words: each key's fact once, at a random place among fillers; and the values."""
    values = torch.randint(0, VALUES, (KEYS,), generator=generator).tolist()
    words = [f"k{i}=v{v}" for i, v in enumerate(values)]
    words += [f"w{int(w)}" for w in torch.randint(0, FILLERS, (BODY - KEYS,), generator=generator)]
    return [words[i] for i in torch.randperm(BODY, generator=generator)], values


def training_batch(tokenizer, generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents followed by QUESTIONS questions `kI? vJ`; only the answers are in the loss."""
    ids, labels = [], []
    for _ in range(size):
        words, values = document(generator)
        label = [-100] * BODY
        for key in torch.randperm(KEYS, generator=generator)[:QUESTIONS].tolist():
            words += [f"k{key}?", f"v{values[key]}"]
            label += [-100, tokenizer.convert_tokens_to_ids(f"v{values[key]}")]
        ids.append(tokenizer.convert_tokens_to_ids(words))
        labels.append(label)
    return torch.tensor(ids), torch.tensor(labels)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The trained model, saved as a Hugging Face folder with its tokenizer."""
    tokenizer = fact_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses time to threads (about 20 s in all)
    try:
        for _ in range(500):
            ids, labels = training_batch(tokenizer, generator, 32)
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    assert loss < 0.05, f"the tiny model did not learn the task (loss {float(loss):.3f})"
    path = tmp_path_factory.mktemp("fact-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def answer(model, tokenizer, ids: torch.Tensor, **kwargs) -> str:
    """The word the model predicts next (greedy, among all words)."""
    return tokenizer.convert_ids_to_tokens(int(model(input_ids=ids, **kwargs).logits[0, -1].argmax()))


@pytest.mark.slow
def test_a_memorized_fact_beyond_the_window_decides_the_answer(trained):
    tokenizer = fact_tokenizer()
    model = LlamaForCausalLM.from_pretrained(trained).eval()
    handle = add_memory(model, knn_layers=[0, 1], memory_size=64, knn_k=8)
    generator = torch.Generator().manual_seed(1)
    with_memory = without = asked = 0
    with torch.no_grad():
        for _ in range(12):
            words, values = document(generator)
            for key in range(KEYS):
                prompt = torch.tensor([tokenizer.convert_tokens_to_ids(["w1", "w2", "w3", f"k{key}?"])])
                handle.reset()
                handle.stream(torch.tensor([tokenizer.convert_tokens_to_ids(words)]), window=8)
                positions = torch.arange(handle.position, handle.position + prompt.shape[1])[None]
                with handle.read_only():  # the prompt follows the document, at positions 24-27, read-only
                    with_memory += answer(model, tokenizer, prompt, position_ids=positions) == f"v{values[key]}"
                with handle.disabled():
                    without += answer(model, tokenizer, prompt) == f"v{values[key]}"
                asked += 1
    assert with_memory / asked >= 0.9, (with_memory, asked)
    assert without / asked <= 0.35, (without, asked)  # chance: 1 in 8


def test_the_commands_memorize_a_fact_and_answer_with_it(trained, tmp_path, capsys):
    words, values = document(torch.Generator().manual_seed(2))
    (tmp_path / "doc.txt").write_text(" ".join(words))
    kb = str(tmp_path / "kb.safetensors")
    main(["memorize", str(trained), str(tmp_path / "doc.txt"), "--out", kb, "--window", "8", "--k", "8"])
    capsys.readouterr()
    answers, alone = [], []
    for key in range(KEYS):
        prompt = ["--prompt", f"w1 w2 w3 k{key}?", "--max-new-tokens", "1", "--window", "8"]
        main(["generate", str(trained), "--memory", kb, *prompt])
        answers.append(capsys.readouterr().out.strip())
        main(["generate", str(trained), *prompt])
        alone.append(capsys.readouterr().out.strip())
    assert answers == [f"v{v}" for v in values]
    assert sum(a == b for a, b in zip(alone, answers)) <= 1  # alone, it guesses
