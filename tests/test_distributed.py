"""Training on two processes (torchrun, gloo on the CPU) against one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.faults import write_texts
from memorizing_transformers.cli import main
from memorizing_transformers.training import distributed

pytestmark = pytest.mark.slow

TRAIN = ["--corpus", "files", "--preset", "tiny", "--vocab-size", "300", "--batch-size", "4", "--eval-tokens", "64"]
TRAIN += ["--eval-every", "0", "--log-every", "1", "--checkpoint-every", "2", "--device", "cpu"]


def torchrun(*args: str) -> None:
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "memorizing_transformers.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text()
    return load_file(run / "checkpoints" / latest / "model.safetensors")


@pytest.fixture
def corpus(tmp_path):
    main(["data", "prepare", "files", "--source", str(write_texts(tmp_path / "texts"))])


def test_two_processes_train_as_one_with_the_same_global_batch_and_resume_at_any_world_size(tmp_path, corpus):
    one, two, resumed, reshared = (tmp_path / name for name in ("one", "two", "resumed", "reshared"))
    main(["train", "--out", str(one), "--steps", "4", *TRAIN])
    torchrun("--out", str(two), "--steps", "4", *TRAIN)
    assert len(losses(two)) == 4  # rank 0 alone logs
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-4, atol=1e-5)
    for name, tensor in weights(one).items():
        torch.testing.assert_close(weights(two)[name], tensor, rtol=1e-4, atol=1e-5)

    # Stopped after 2 steps and resumed by two processes, or by one: the same run either way.
    torchrun("--out", str(resumed), "--steps", "2", *TRAIN)
    torchrun("--out", str(resumed), "--steps", "4", "--resume", *TRAIN)
    torch.testing.assert_close(losses(resumed), losses(one), rtol=1e-4, atol=1e-5)
    torchrun("--out", str(reshared), "--steps", "2", *TRAIN)
    main(["train", "--out", str(reshared), "--steps", "4", "--resume", *TRAIN])
    torch.testing.assert_close(losses(reshared), losses(one), rtol=1e-4, atol=1e-5)


def test_two_sharded_processes_train_as_one_and_their_checkpoints_load_anywhere(tmp_path, corpus):
    # FSDP: each process holds its shards of the weights and optimizer state; checkpoints are whole.
    one, sharded, resumed = (tmp_path / name for name in ("one", "sharded", "resumed"))
    evaluated = ["--eval-every", "2"]  # validation under FSDP runs on every rank, in step
    main(["train", "--out", str(one), "--steps", "4", *TRAIN, *evaluated])
    torchrun("--out", str(sharded), "--steps", "2", "--fsdp", *TRAIN, *evaluated)
    shutil.copytree(sharded, resumed)  # the same stopped run, to go on in one process below
    torchrun("--out", str(sharded), "--steps", "4", "--fsdp", "--resume", *TRAIN, *evaluated)
    torch.testing.assert_close(losses(sharded), losses(one), rtol=1e-4, atol=1e-5)
    assert set(weights(sharded)) == set(weights(one))
    for name, tensor in weights(one).items():
        torch.testing.assert_close(weights(sharded)[name], tensor, rtol=1e-4, atol=1e-5)
    records = [json.loads(line) for line in (sharded / "metrics.jsonl").read_text().splitlines()]
    assert "valid_loss" in records[1] and len(records[1]["memory_gates"]["2"]) == 4  # gathered whole
    latest = (sharded / "checkpoints" / "latest").read_text()
    state = torch.load(sharded / "checkpoints" / latest / "training_state.pt", weights_only=False)
    assert state["optimizer_by_name"] and "embed.weight" in state["optimizer"]["state"]  # gathered, by name
    # A sharded run's checkpoint goes on in one process, without FSDP.
    main(["train", "--out", str(resumed), "--steps", "4", "--resume", *TRAIN, *evaluated])
    torch.testing.assert_close(losses(resumed), losses(one), rtol=1e-4, atol=1e-5)


def test_a_two_process_run_killed_mid_run_resumes_as_if_never_stopped(tmp_path, corpus):
    import signal
    import time

    one, killed = tmp_path / "one", tmp_path / "killed"
    steps = ["--steps", "30"]
    main(["train", "--out", str(one), *steps, *TRAIN])
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "memorizing_transformers.cli", "train", "--out", str(killed), *steps, *TRAIN]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.is_file() and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)  # every process of the run, at once
    run.wait()
    stopped_at = int(latest.read_text().removeprefix("step-"))
    assert stopped_at < 30, "the run ended before it could be killed"
    torchrun("--out", str(killed), *steps, "--resume", *TRAIN)
    torch.testing.assert_close(losses(killed), losses(one), rtol=1e-4, atol=1e-5)


def test_a_parameter_without_a_gradient_on_some_steps_trains_too(tmp_path, corpus):
    # The XL compression's projections get no gradient on the first step (no cache yet).
    one, two = tmp_path / "one", tmp_path / "two"
    compressed = ["--steps", "3", "--set", "xl_compression=4", *TRAIN]
    main(["train", "--out", str(one), *compressed])
    torchrun("--out", str(two), *compressed)
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-4, atol=1e-5)


def test_a_batch_the_processes_cannot_share_is_refused(tmp_path, corpus):
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "memorizing_transformers.cli", "train", "--out", str(tmp_path / "r"), "--steps", "1"]
    command += [*TRAIN[:6], "--batch-size", "3", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "a batch of 3 rows cannot be shared equally by 2 processes" in result.stderr


def test_stop_leaves_the_process_group(tmp_path):
    # Left joined, gloo's threads can abort a process that succeeded, at the interpreter's exit.
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    distributed.stop()
    assert not torch.distributed.is_initialized()
    distributed.stop()  # and again: nothing to leave
