"""The long-context benchmark: its tasks, its readers, and `mt longbench --quick` on a tiny model."""

import json
import sys
from pathlib import Path

import pytest
import torch
from test_memorize import tiny_llama_checkpoint
from tiny_models import tiny_llama

from memorizing_transformers.cli import main
from memorizing_transformers.data.long_tasks import TASKS, make_task
from memorizing_transformers.data.tokenizer import load_tokenizer
from memorizing_transformers.evaluation.long_context import (
    LongBenchSettings,
    Readers,
    answer_score,
    position_buckets,
    value_start,
)
from memorizing_transformers.loading import load_huggingface

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))  # the experiment scripts


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_a_task_hides_its_answer_at_the_depth_asked_in_a_prompt_of_the_length_asked(tokenizer, task, depth):
    sample = make_task(task, tokenizer, 2000, depth, seed=3)
    assert sample == make_task(task, tokenizer, 2000, depth, seed=3)  # deterministic
    assert sample != make_task(task, tokenizer, 2000, depth, seed=4)
    assert abs(len(tokenizer(sample.prompt)["input_ids"]) - 2000) <= 25  # within a filler sentence
    # Where the asked fact is stated, as a share of the filler between the introduction and the question.
    needle = {
        "passkey": f"The pass key is {sample.answer}",
        "multikey": f"is: {sample.answer}",
        "vt": f"VAR {sample.answer.split()[0]} = ",
    }[task]
    body_start, question = sample.prompt.index("The grass") if depth else 0, sample.prompt.rindex(".") + 1
    at = sample.prompt.index(needle)
    if depth:
        assert abs((at - body_start) / (question - body_start) - depth) < 0.1
    if task == "vt":  # each variable is assigned from the one before, in the order of the answer
        names = sample.answer.split()
        positions = [sample.prompt.index(f"VAR {b} = VAR {a}.") for a, b in zip(names, names[1:])]
        assert positions == sorted(positions) and len(names) == 5


def test_unknown_tasks_and_depths_are_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown long-context task"):
        make_task("haystack", tokenizer, 100, 0.5, 0)
    with pytest.raises(ValueError, match="depth must be between 0 and 1"):
        make_task("passkey", tokenizer, 100, 1.5, 0)
    with pytest.raises(ValueError, match="unknown methods"):
        LongBenchSettings(methods=["window", "rag"])


def test_a_memory_of_every_earlier_token_reads_as_full_attention_does():
    # With true positions and k as large as the memory, window + memory is full attention:
    # the benchmark's memory reader must then score an answer exactly as full attention does.
    model = tiny_llama(vocab_size=97, max_position_embeddings=1024)
    settings = LongBenchSettings(methods=["memory-true", "memory-fixed", "full", "window"], window=16, knn_k=256)
    readers = Readers(model, settings, capacity=256)
    ids = torch.randint(0, 97, (1, 100))
    full = readers.logits("full", ids, 5)
    torch.testing.assert_close(readers.logits("memory-true", ids, 5), full, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(readers.logits("memory-fixed", ids, 5), full, atol=1e-3)
    assert not torch.allclose(readers.logits("window", ids, 5), full, atol=1e-3)
    torch.testing.assert_close(
        readers.token_losses("memory-true", ids), readers.token_losses("full", ids), rtol=1e-4, atol=1e-4
    )
    right, logprob = answer_score(full, full.argmax(dim=-1))
    assert right and logprob < 0


def test_write_only_readers_search_only_in_the_prompts_last_window(monkeypatch):
    from memorizing_transformers.memory.exact import ExactSearch

    searches = []
    search = ExactSearch.search
    monkeypatch.setattr(ExactSearch, "search", lambda self, *a, **k: searches.append(1) or search(self, *a, **k))
    model = tiny_llama(vocab_size=97, max_position_embeddings=1024)
    ids = torch.randint(0, 97, (1, 100))  # 7 windows of 16 tokens
    for write_only, calls in [(False, 7), (True, 1)]:
        searches.clear()
        settings = LongBenchSettings(
            methods=["memory-fixed"], window=16, knn_k=8, knn_layers=[0, 1], write_only=write_only
        )
        Readers(model, settings, capacity=128).logits("memory-fixed", ids, 5)
        assert len(searches) == 2 * calls  # two memory layers


def test_the_value_is_scored_apart_from_the_space_before_it(tokenizer):
    class DigitTokenizer:  # one token per digit and a space token of its own, as SmolLM2's tokenizer has
        pieces = [" ", ":", "1", "2", "3"]

        def decode(self, ids):
            return "".join(self.pieces[i] for i in ids)

    answer = torch.tensor([0, 2, 3, 4])  # " 123"
    logits = torch.nn.functional.one_hot(torch.tensor([1, 2, 3, 4]), 5).float()  # ":123", as the needle writes it
    start = value_start(DigitTokenizer(), answer.tolist())
    assert start == 1 and not answer_score(logits, answer)[0] and answer_score(logits[start:], answer[start:])[0]
    assert value_start(tokenizer, tokenizer(" 1926110")["input_ids"]) == 0  # GPT-2 writes " 1926" as one token
    assert value_start(DigitTokenizer(), [0]) == 0  # an answer of whitespace alone is scored whole


def test_position_buckets_double_from_2k():
    assert position_buckets(20000) == [(0, 2048), (2048, 4096), (4096, 8192), (8192, 16384), (16384, 32768)]


def test_longbench_quick_writes_its_results_and_names_its_command(tmp_path, capsys):
    tiny_llama_checkpoint(tmp_path / "llama")
    (tmp_path / "doc.txt").write_text("def f(x):\n    return x + 1\n" * 80)
    out = tmp_path / "bench"
    main(
        ["longbench", str(tmp_path / "llama"), "--out", str(out), "--quick", "--tasks", "passkey,vt"]
        + ["--documents", str(tmp_path / "doc.txt")]
    )
    report = json.loads((out / "longbench.json").read_text())
    assert set(report["summary"]) == {"passkey", "vt"}
    assert {r["method"] for r in report["samples"]} == {"window", "memory-true", "memory-fixed", "full"}
    assert len([r for r in report["samples"] if r["method"] == "window"]) == 2 * 2 * 3  # tasks x lengths x depths
    assert report["documents"][0]["loss_by_bucket"]["window"]["0-2048"] > 0
    text = (out / "longbench.md").read_text()
    assert f"Made by `mt longbench {tmp_path / 'llama'} --out {out} --quick" in text and "| passkey | window |" in text
    assert (out / "passkey.png").stat().st_size > 1000 and (out / "vt.png").is_file()
    assert report["summary"]["passkey"]["memory-true"]["256"]["time_over_plain"] > 0
    assert "over the model's own forward pass over the same tokens" in text
    assert not (out / "longbench.partial.json").exists()
    assert all(row["value_correct"] or not row["correct"] for row in report["samples"])
    assert "Accuracy of the value alone, the space before it given" in text


def test_longbench_refuses_what_is_not_a_hugging_face_model(tmp_path, cli_error):
    assert "is not a Hugging Face causal LM folder" in cli_error(
        ["longbench", str(tmp_path), "--out", str(tmp_path / "o")]
    )


def test_a_stopped_run_goes_on_after_what_it_had_measured(tmp_path, tokenizer, monkeypatch):
    from memorizing_transformers.evaluation import long_context

    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=1024)
    settings = LongBenchSettings(tasks=["passkey"], lengths=[128], depths=[0.0, 1.0], trials=1, window=32, knn_k=4)
    partial = tmp_path / "partial.json"
    calls = []
    original = long_context.Readers.logits
    monkeypatch.setattr(long_context.Readers, "logits", lambda self, *a: calls.append(a) or original(self, *a))
    first = long_context.run_longbench(model, tokenizer, settings, lambda line: None, partial)
    assert len(calls) == len(first["samples"]) == 2 * 4
    kept = json.loads(partial.read_text())
    kept["samples"] = kept["samples"][:3]  # as if stopped after three answers
    partial.write_text(json.dumps(kept))
    again = long_context.run_longbench(model, tokenizer, settings, lambda line: None, partial)
    assert len(calls) == 8 + 5 and again["samples"] == first["samples"][:3] + again["samples"][3:]
    assert [r["correct"] for r in again["samples"]] == [r["correct"] for r in first["samples"]]
    with pytest.raises(ValueError, match="holds a run with other settings, another model"):
        long_context.run_longbench(model, tokenizer, LongBenchSettings(tasks=["vt"]), lambda line: None, partial)
    other = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=1024, seed=1)
    with pytest.raises(ValueError, match="another model"):
        long_context.run_longbench(other, tokenizer, settings, lambda line: None, partial)


def test_longbench_lists_are_checked_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["longbench", str(tmp_path), "--out", str(tmp_path / "o"), "--lengths", "4k,8k"])
    assert "expected comma-separated int values, got '4k,8k'" in capsys.readouterr().err


def test_retrieval_layers_measures_each_heads_mass_on_the_needle(tmp_path):
    import retrieval_layers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_llama_checkpoint(tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llama")
    row = retrieval_layers.needle_mass(model, tokenizer, 600, 0.0, window=128, knn_k=8, positions="fixed")
    needle = tokenizer.decode(
        [tokenizer(make_task("passkey", tokenizer, 600, 0.0, 0).prompt)["input_ids"][i] for i in row["needle_tokens"]]
    )
    assert "The pass key is" in needle and len(row["mass"]) == 2 and len(row["mass"][0]) == 4  # layers x heads
    assert all(0.0 <= m <= 1.0 for head in row["mass"] for m in head) and any(m > 0 for h in row["mass"] for m in h)
    assert not row["in_window"] and 0.0 < min(row["memory_share"]) and max(row["memory_share"]) <= 1.0
    in_window = retrieval_layers.needle_mass(model, tokenizer, 600, 1.0, window=128, knn_k=8, positions="fixed")
    assert in_window["in_window"] and all(m == 0.0 for head in in_window["mass"] for m in head)  # nothing to find
    multikey = retrieval_layers.needle_mass(model, tokenizer, 600, 0.0, 128, 8, "fixed", task="multikey", seed=1)
    sample = make_task("multikey", tokenizer, 600, 0.0, 1000)
    assert multikey["answer"] == sample.answer and len(multikey["other_answers"]) == 3
    assert sample.answer not in multikey["other_answers"] and len(multikey["others_mass"]) == 2
    assert all(0.0 <= a + o <= 1.0 for x, y in zip(multikey["mass"], multikey["others_mass"]) for a, o in zip(x, y))
    assert len(row["retrieved_without_context"]) == 2 and row["answer_logprob"] < 0
    shares = [
        retrieval_layers.needle_mass(model, tokenizer, 600, 0.0, 128, 8, "fixed", search=False, overlap=overlap)[
            "retrieved_without_context"
        ]
        for overlap in (0, 16)
    ]
    assert all(0.0 <= x <= 1.0 for share in shares for x in share)


def test_retrieval_layers_names_the_needles_a_wrong_first_digit_came_from():
    import retrieval_layers

    row = {"depth": 0.5, "in_window": False, "answer": "3492592", "answer_logprob": -0.3, "seconds": 1.0}
    row |= {"other_answers": ["8451075", "8024423", "6171940"], "others_in_memory": 3}
    (wrong,) = retrieval_layers.answers([row | {"predicted": ":8492592"}])
    assert "(the first digit predicted, 8, begins 8451075, 8024423)" in wrong
    (right,) = retrieval_layers.answers([row | {"predicted": ":3492592"}])
    assert "first digit predicted" not in right


def test_long_memorize_times_the_commands_and_checks_the_answer(tmp_path):
    import long_memorize

    tiny_llama_checkpoint(tmp_path / "llama")
    out = tmp_path / "out"
    result = long_memorize.main(
        ["--checkpoint", str(tmp_path / "llama"), "--tokens", "600", "--window", "64", "--out", str(out)]
        + ["--write-only"]
    )
    assert result["tokens"] > 500 and result["memorize_seconds"] > 0 and result["plain_seconds"] > 0
    assert "--write-only" in result["commands"][0] and result["memorize_peak_bytes"] > 2**20
    assert result["found"] == (result["key"] in result["answer"]) and "memorized" in result["memorized"]
    generation = result["generation"]
    assert set(generation) == {f"{m}_{p}_seconds" for m in ("memory", "window") for p in ("first_token", "token")}
    assert all(seconds > 0 for seconds in generation.values())
    text = (out / "long_memorize.md").read_text()
    assert "Made by `python experiments/long_memorize.py --checkpoint" in text and "mt memorize" in text
    assert "| the window alone (memory disabled) |" in text
    assert not (out / "kb.safetensors").exists() and (out / "document.txt").is_file()


def test_a_fine_tune_of_the_memory_bias_resumes_as_if_never_stopped_and_the_benchmark_loads_it(
    tmp_path, monkeypatch, cli_error
):
    import longbench_finetune

    tiny_llama_checkpoint(tmp_path / "llama")
    options = ["--checkpoint", str(tmp_path / "llama"), "--length", "256", "--window", "64", "--steps", "3"]
    options += ["--write-only", "--lr", "0.1"]
    longbench_finetune.main([*options, "--out", str(tmp_path / "whole")])
    whole = json.loads((tmp_path / "whole" / "memory_parameters.json").read_text())
    assert len(whole["steps"]) == 3 and not (tmp_path / "whole" / "finetune.partial.pt").exists()
    assert len(whole["parameters"]) == 2 and all(any(v != 0 for v in vs) for vs in whole["parameters"].values())

    # Stopped before its third step, then run again: the same steps and the same numbers.
    sample = longbench_finetune.training_sample

    def stop_at_the_third(task, tokenizer, length, step):
        if step == 2:
            raise KeyboardInterrupt
        return sample(task, tokenizer, length, step)

    monkeypatch.setattr(longbench_finetune, "training_sample", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        longbench_finetune.main([*options, "--out", str(tmp_path / "stopped")])
    monkeypatch.setattr(longbench_finetune, "training_sample", sample)
    longbench_finetune.main([*options, "--out", str(tmp_path / "stopped")])
    resumed = json.loads((tmp_path / "stopped" / "memory_parameters.json").read_text())
    assert [s["loss"] for s in resumed["steps"]] == pytest.approx([s["loss"] for s in whole["steps"]], rel=1e-5)
    for name, values in whole["parameters"].items():
        assert resumed["parameters"][name] == pytest.approx(values, rel=1e-5, abs=1e-7)
    assert "| layer | mean memory_bias over its heads |" in (tmp_path / "stopped" / "finetune.md").read_text()

    # The benchmark reads its memory with them; a file for another memory is refused by name.
    settings = LongBenchSettings(
        methods=["memory-fixed"], window=64, memory_parameters=str(tmp_path / "whole" / "memory_parameters.json")
    )
    model, _ = load_huggingface(str(tmp_path / "llama"), torch.device("cpu"))
    handle = Readers(model, settings, capacity=256).handles["memory-fixed"]
    for name, p in handle.memory_parameters().items():
        assert p.tolist() == pytest.approx(whole["parameters"][name])
    with pytest.raises(ValueError, match="memory parameters for another memory: 1 unknown"):
        handle.load_memory_parameters({**whole["parameters"], "model.layers.7.self_attn.memory_bias": [0.0]})
    with pytest.raises(ValueError, match=r"holds \(3,\) numbers, this memory \(4,\)"):
        handle.load_memory_parameters({name: [0.0] * 3 for name in whole["parameters"]})
    error = cli_error(
        ["longbench", tmp_path / "llama", "--out", tmp_path / "o", "--quick", "--memory-parameters", tmp_path / "none"]
    )
    assert "none holds no memory parameters" in error
