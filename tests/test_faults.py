"""Faults and bad input, as a user meets them: every row of docs/RELIABILITY.md that is not
tested beside the code it concerns is tested here."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks.faults import train_args, write_texts
from memorizing_transformers import MemorizingConfig, MemorizingTransformer
from memorizing_transformers.atomic import write_atomically
from memorizing_transformers.cli import main
from memorizing_transformers.data.streaming import TokenizedDocument
from memorizing_transformers.model.state import MemorizingState
from memorizing_transformers.runs import checkpoints
from memorizing_transformers.training.checkpoint import RunLocked, run_lock
from memorizing_transformers.training.trainer import TrainConfig, Trainer, TrainingDiverged


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The `files` corpus of eight small pseudo-code documents, prepared once for this module."""
    base = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mt-cache"))
        main(["data", "prepare", "files", "--source", str(write_texts(base / "texts"))])
    return base


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    """A run of 4 steps with checkpoints at steps 2 and 4 (copied by tests that change it)."""
    run = corpus / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mt-cache"))
        main(train_args(run, 4, "--checkpoint-every", "2"))
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- memory files
def test_a_short_text_is_memorized_and_saved(tmp_path, cli_error):
    # Shorter than a segment: every layer's XL-cache mask is a view of one tensor, which
    # safetensors refuses to write unless the views are copied.
    model = MemorizingTransformer(MemorizingConfig.preset("tiny", vocab_size=50257))
    path = tmp_path / "kb.safetensors"
    model.save_memory(model.memorize("The access code is 4721."), path)
    assert model.load_memory(path).tokens_seen == len(model.tokenizer("The access code is 4721.")["input_ids"])
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "short.txt").write_text("The vault code is 4721.\n")
    main(["memorize", str(tmp_path / "model"), str(tmp_path / "short.txt"), "--out", str(tmp_path / "cli.safetensors")])
    assert (tmp_path / "cli.safetensors").is_file()


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "folder"])
def test_damaged_memory_files_are_refused_by_name(tmp_path, damage):
    model = MemorizingTransformer(MemorizingConfig.preset("tiny", vocab_size=50257))
    path = tmp_path / "kb.safetensors"
    model.save_memory(model.memorize("def f(x):\n    return x + 1\n" * 20), path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[-100] ^= 0x01  # one bit of one stored key
        path.write_bytes(data)
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:
        path.unlink()
        path.mkdir()
    expected = {
        "truncate": "truncated, corrupt",
        "flip": "do not match the checksum",
        "garbage": "truncated, corrupt",
        "folder": "is a folder",
    }[damage]
    with pytest.raises((ValueError, OSError), match=expected) as info:
        model.load_memory(path)
    assert str(path) in str(info.value)


def test_memory_files_of_every_kind_share_one_versioned_format(tmp_path):
    # A KNNMemory, a model's state and the retrofit's memories: each file records the layout's
    # version, and one from a later version is refused by name, whatever its kind.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from tiny_models import tiny_llama

    from memorizing_transformers import KNNMemory
    from memorizing_transformers.hf.retrofit import add_memory
    from memorizing_transformers.memory.files import FORMAT_VERSION

    model = MemorizingTransformer(MemorizingConfig.preset("tiny", vocab_size=50257))
    memory = KNNMemory(1, 2, 8, capacity=16)
    memory.add(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    llama = tiny_llama()
    handle = add_memory(llama, knn_layers=[0], memory_size=16, knn_k=2)
    with torch.no_grad():
        handle.stream(torch.randint(0, 97, (1, 8)), window=4)
    files = {
        "knn": (lambda path: memory.save(path), lambda path: KNNMemory.load(path)),
        "state": (lambda path: model.save_memory(model.memorize("a few words"), path), model.load_memory),
        "retrofit": (handle.save, handle.load),
    }
    for kind, (save, load) in files.items():
        path = tmp_path / f"{kind}.safetensors"
        save(path)
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        assert metadata["format_version"] == FORMAT_VERSION
        load(path)
        save_file(load_file(path), path, metadata={**metadata, "format_version": "99"})
        with pytest.raises(ValueError, match="has memory format version 99") as info:
            load(path)
        assert str(path) in str(info.value)


# ---------------------------------------------------------------------- checkpoints
def test_resume_without_a_latest_pointer_continues_from_the_newest_checkpoint(run_copy):
    (run_copy / "checkpoints" / "latest").unlink()
    main(train_args(run_copy, 6, "--checkpoint-every", "7", "--resume"))
    assert [r["step"] for r in metrics(run_copy)] == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in checkpoints(run_copy)] == ["step-0000006", "step-0000004"]


def test_a_broken_latest_pointer_falls_back_and_keeps_the_valid_checkpoints(run_copy):
    (run_copy / "checkpoints" / "latest").write_text("step-0000999")
    main(train_args(run_copy, 5, "--checkpoint-every", "7", "--resume"))
    assert (run_copy / "checkpoints" / "latest").read_text() == "step-0000005"
    assert [p.name for p in checkpoints(run_copy)] == ["step-0000005", "step-0000004"]


def test_new_checkpoints_survive_among_higher_numbered_ones(run_copy, tmp_path):
    # An abandoned timeline left a higher-numbered checkpoint; a run restarted from step 0
    # into the same folder must keep its own new checkpoints (folder names sort step-0000020
    # below step-0000196) and prune the abandoned one.
    root = run_copy / "checkpoints"
    shutil.copytree(root / "step-0000004", root / "step-0000196")
    (root / "latest").unlink()
    shutil.rmtree(root / "step-0000004")
    shutil.rmtree(root / "step-0000002")
    (run_copy / "run_config.json").unlink()
    main(train_args(run_copy, 3, "--checkpoint-every", "2"))
    assert (root / "latest").read_text() == "step-0000003"
    assert [p.name for p in checkpoints(run_copy)] == ["step-0000003", "step-0000002"]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(run_copy, capsys):
    weights = run_copy / "checkpoints" / "step-0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    main(train_args(run_copy, 5, "--checkpoint-every", "7", "--resume"))
    err = capsys.readouterr().err
    assert f"cannot resume from {weights.parent}" in err and "truncated or corrupt" in err
    assert [r["step"] for r in metrics(run_copy)] == [1, 2, 3, 4, 5]  # 3 and 4 done again, not repeated


@pytest.mark.parametrize("part", ["model.safetensors", "training_state.pt", "config.json"])
def test_damaged_checkpoint_files_are_named(run_copy, part, cli_error):
    for checkpoint in checkpoints(run_copy):
        target = checkpoint / part
        target.write_bytes(target.read_bytes()[:50])
    named = f"{run_copy / 'checkpoints' / 'step-0000004' / part} is truncated or corrupt"
    if part != "config.json":  # resuming reads the weights and the training state
        message = cli_error(train_args(run_copy, 6, "--resume"))
        assert message.startswith(f"no checkpoint of {run_copy} loads") and named in message
        assert "step-0000002" in message
    if part != "training_state.pt":  # loading a model reads its configuration and weights
        assert named in cli_error(["generate", run_copy, "--prompt", "def"])


def test_metrics_after_a_resume_hold_each_step_once(run_copy):
    root = run_copy / "checkpoints"
    shutil.rmtree(root / "step-0000004")  # killed after step 4 was logged, before its checkpoint
    (root / "latest").write_text("step-0000002")
    main(train_args(run_copy, 5, "--checkpoint-every", "7", "--resume"))
    assert [r["step"] for r in metrics(run_copy)] == [1, 2, 3, 4, 5]


def test_checkpoint_folders_get_normal_permissions_and_leftovers_are_cleaned(run_copy):
    root = run_copy / "checkpoints"
    (root / ".latest.abc123.tmp").write_text("step-0000001")
    (root / ".step-0000009.xyz.tmp").mkdir()
    main(train_args(run_copy, 5, "--checkpoint-every", "7", "--resume"))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000004", "step-0000005"]
    umask = os.umask(0)
    os.umask(umask)
    assert (root / "step-0000005").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_write_is_flushed_to_disk_before_it_is_published(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b, real=os.replace: (synced.append(("rename", str(b))), real(a, b)))
    write_atomically(tmp_path / "f.txt", lambda tmp: Path(tmp).write_text("x"))
    rename = synced.index(("rename", str(tmp_path / "f.txt")))
    assert any(str(p).startswith(str(tmp_path / ".f.txt.")) for p in synced[:rename])  # the data, first
    assert synced[rename + 1 :] == [str(tmp_path)]  # then the folder that names it


# ---------------------------------------------------------------------- non-finite training
def tiny_trainer(run: Path, **train) -> Trainer:
    torch.manual_seed(0)
    model = MemorizingTransformer(MemorizingConfig.preset("tiny"))
    docs = [TokenizedDocument(f"d{i}", torch.randint(0, 512, (200,))) for i in range(4)]
    config = TrainConfig(**{"steps": 12, "batch_size": 2, "warmup_steps": 1, "eval_every": 0, "log_every": 1, **train})
    return Trainer(model, config, docs, None, run)


def test_nan_stops_training_without_writing_a_checkpoint(tmp_path):
    trainer = tiny_trainer(tmp_path / "run", lr=1e6, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match="stopped without writing a checkpoint") as info:
        trainer.train(progress=False)
    assert "Lower the learning rate" in str(info.value)
    for checkpoint in checkpoints(tmp_path / "run"):  # only the steps before the divergence
        model = MemorizingTransformer.from_pretrained(checkpoint)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_nan_from_the_command_line_is_one_line(corpus, tmp_path, cli_error):
    message = cli_error(train_args(tmp_path / "n", 40, "--lr", "1e6", "--warmup-steps", "1"))
    assert "stopped without writing a checkpoint" in message


def test_skip_nonfinite_skips_and_counts_steps(tmp_path, monkeypatch):
    from memorizing_transformers.training import trainer as trainer_module

    real = trainer_module.segment_loss
    calls = []

    def sometimes_nan(logits, targets):
        calls.append(1)
        loss, mean = real(logits, targets)
        return (loss * float("nan"), float("nan")) if len(calls) in (3, 5) else (loss, mean)

    monkeypatch.setattr(trainer_module, "segment_loss", sometimes_nan)
    trainer = tiny_trainer(tmp_path / "run", skip_nonfinite=2, checkpoint_every=0)
    trainer.train(progress=False)
    records = metrics(tmp_path / "run")
    assert [r["skipped_steps"] for r in records][-1] == 2 and trainer.step == 12
    assert records[2]["loss"] is None  # a window of only a skipped step has no loss
    calls.clear()
    with pytest.raises(TrainingDiverged, match=r"already 2 skipped"):
        monkeypatch.setattr(trainer_module, "segment_loss", lambda lo, t: (real(lo, t)[0] * float("nan"), float("nan")))
        tiny_trainer(tmp_path / "run2", skip_nonfinite=2, checkpoint_every=0).train(progress=False)


# ---------------------------------------------------------------------- the run lock
HOLD = textwrap.dedent("""
    import sys, time
    from memorizing_transformers.training.checkpoint import run_lock
    with run_lock(sys.argv[1]):
        print("holding", flush=True)
        time.sleep(60)
""")


def test_a_second_process_on_one_run_is_refused_naming_the_holder(tmp_path, cli_error):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RunLocked, match=f"in use by process {holder.pid}"):
            with run_lock(run):
                pass
        message = cli_error(["train", "--out", run, "--preset", "tiny", "--steps", "1"])
        assert f"process {holder.pid}" in message and "choose another --out" in message
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: the OS drops its lock
        holder.wait()
    with run_lock(run):  # and the next process gets it
        with run_lock(run):  # re-entrant within one process
            pass


# ---------------------------------------------------------------------- devices
def test_a_state_without_memory_layers_keeps_its_device():
    config = MemorizingConfig.preset("tiny", knn_layers=())
    cpu = MemorizingState(config, 1)
    cpu.update(0, torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16), torch.ones(1, 3, dtype=torch.bool))
    meta = MemorizingState(config, 1, device="meta")  # stands in for an accelerator
    meta.load_state_dict(cpu.state_dict())
    assert meta.xl[0].keys.device.type == "meta"


# ---------------------------------------------------------------------- full disks and read-only folders
@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs (needs root, as on CI); the test is skipped where mounting is refused."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_says_so_and_leaves_the_previous_checkpoint(small_disk, trained_run, cli_error):
    run = small_disk / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("step-0000002"))
    (run / "checkpoints" / "latest").write_text("step-0000004")
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    filler.write_bytes(b"\0" * max(0, free - 64 * 1024))
    message = cli_error(train_args(run, 6, "--checkpoint-every", "1", "--resume"))
    assert "no space left on device" in message
    assert [p.name for p in checkpoints(run)] == ["step-0000004"]
    assert (run / "checkpoints" / "latest").read_text() == "step-0000004"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no half checkpoint
    filler.unlink()
    main(train_args(run, 5, "--checkpoint-every", "1", "--resume"))
    assert (run / "checkpoints" / "latest").read_text() == "step-0000005"


def test_a_full_disk_while_saving_a_memory_says_so(small_disk):
    model = MemorizingTransformer(MemorizingConfig.preset("tiny", vocab_size=50257, memory_size=20_000))
    state = model.memorize("x = 1\n" * 50)
    with pytest.raises(OSError, match="no space left on device while writing") as info:
        model.save_memory(state, small_disk / "kb.safetensors")
    assert info.value.errno == errno.ENOSPC
    assert list(small_disk.iterdir()) == []


def test_evaluate_refuses_a_read_only_output_folder_before_evaluating(trained_run, tmp_path, cli_error, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(out)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        from memorizing_transformers.evaluation import report

        monkeypatch.setattr(report, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking the folder"))
        message = cli_error(["evaluate", trained_run, "--corpus", "files", "--out", out / "eval"])
        assert f"cannot write into {out / 'eval'}" in message
    finally:
        subprocess.run(["umount", "-l", str(out)], check=True)


# ---------------------------------------------------------------------- bad input on the command line
def test_set_values_take_their_field_types(corpus, tmp_path, cli_error):
    main(train_args(tmp_path / "r", 1, "--set", "memory_gate_init=-3"))  # an integer where a float is expected
    assert (
        json.loads((tmp_path / "r" / "checkpoints" / "step-0000001" / "config.json").read_text())["memory_gate_init"]
        == -3.0
    )
    assert "memory_size must be an integer, got 2.5" in cli_error(
        train_args(tmp_path / "a", 1, "--set", "memory_size=2.5")
    )
    assert "knn_layers must be a list of layer indices" in cli_error(
        train_args(tmp_path / "b", 1, "--set", "knn_layers=2")
    )
    assert "out of range for a model of 4 layers" in cli_error(train_args(tmp_path / "c", 1, "--set", "knn_layers=[7]"))
    assert "memory_size must be positive" in cli_error(train_args(tmp_path / "d", 1, "--set", "memory_size=0"))
    assert "unknown MemorizingConfig fields: ['memory_sise']" in cli_error(
        train_args(tmp_path / "e", 1, "--set", "memory_sise=8")
    )
    assert "steps must be positive" in cli_error(train_args(tmp_path / "f", 0))


def test_unknown_corpus_and_missing_runs_are_named(tmp_path, cli_error, monkeypatch):
    assert "unknown corpus 'nosuchcorpus'; known corpora: " in cli_error(["data", "prepare", "nosuchcorpus"])
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    assert "apt-get and dpkg-deb cannot be found" in cli_error(["data", "prepare", "books"])
    assert f"no such model folder or run directory: {tmp_path / 'nope'}" in cli_error(
        ["generate", tmp_path / "nope", "--prompt", "x"]
    )
    assert "neither a saved model" in cli_error(["evaluate", tmp_path, "--corpus", "files"])


def test_generation_and_memorize_options_are_checked(trained_run, tmp_path, cli_error):
    assert "--max-new-tokens must be positive, got 0" in cli_error(
        ["generate", trained_run, "--prompt", "x", "--max-new-tokens", "0"]
    )
    assert "--temperature must be 0 (greedy) or positive" in cli_error(
        ["generate", trained_run, "--prompt", "x", "--temperature", "-1"]
    )
    assert "the prompt is empty" in cli_error(["generate", trained_run, "--prompt", ""])
    (tmp_path / "empty.txt").write_text("")
    assert "hold no tokens" in cli_error(
        ["memorize", trained_run, tmp_path / "empty.txt", "--out", tmp_path / "kb.safetensors"]
    )
    assert f"{tmp_path} is a folder" in cli_error(
        ["memorize", trained_run, tmp_path, "--out", tmp_path / "kb.safetensors"]
    )
    assert "no such file" in cli_error(
        ["memorize", trained_run, tmp_path / "missing.txt", "--out", tmp_path / "kb.safetensors"]
    )
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 = 1\n".encode("latin-1"))  # not UTF-8: read with replacement
    main(["memorize", str(trained_run), str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "kb.safetensors")])
    other = tmp_path / "other-kb.safetensors"
    model = MemorizingTransformer(MemorizingConfig.preset("tiny", vocab_size=50257))
    model.save_memory(model.memorize("x = 1"), other)
    assert "configurations differ" in cli_error(["generate", trained_run, "--prompt", "x", "--memory", other])


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "generate", str(tmp_path / "nope"), "--prompt", "x"])


# ---------------------------------------------------------------------- figures
def test_bits_per_byte_divides_by_the_bytes_of_the_scored_tokens():
    from memorizing_transformers.data.corpora import Document
    from memorizing_transformers.data.pipeline import tokenize_documents
    from memorizing_transformers.evaluation.perplexity import evaluate

    model = MemorizingTransformer(MemorizingConfig.preset("tiny", vocab_size=50257))
    text = "Ünïcode café: naïve résumé\n" * 3  # 99 bytes; GPT-2's first token is the first of Ü's two bytes
    [doc] = tokenize_documents([Document("d", text)], model.tokenizer)
    assert doc.num_bytes == 98
    result = evaluate(model, [doc])
    assert result.tokens == doc.ids.numel() - 1
    assert result.bits_per_byte == pytest.approx(
        result.loss * result.tokens / torch.log(torch.tensor(2.0)).item() / doc.num_bytes
    )


def test_checkpoints_every_few_minutes(tmp_path, monkeypatch):
    from memorizing_transformers.training import trainer as trainer_module

    clock = iter(range(0, 10**6, 10))  # every call of the clock: 10 s later
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: next(clock))
    trainer = tiny_trainer(tmp_path / "run", steps=6, checkpoint_every=0, checkpoint_minutes=2.0, keep_checkpoints=10)
    trainer.train(progress=False)
    steps = sorted(int(p.name.split("-")[1]) for p in checkpoints(tmp_path / "run"))
    assert 6 in steps and 1 < len(steps) < 6  # some in between, by the clock, and the last
    assert trainer.train_seconds > 0
