import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch

from memorizing_transformers import MemorizingConfig, MemorizingTransformer
from memorizing_transformers.data.streaming import TokenizedDocument
from memorizing_transformers.evaluation.perplexity import evaluate
from memorizing_transformers.runs import latest_checkpoint, resolve_model_dir
from memorizing_transformers.training import checkpoint
from memorizing_transformers.training.trainer import TrainConfig, Trainer


def docs(n=6, length=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        TokenizedDocument(f"d{i}", torch.randint(0, 512, (length + 7 * i,), generator=g), num_bytes=300)
        for i in range(n)
    ]


def new_trainer(run_dir, steps=4, **overrides):
    torch.manual_seed(0)
    model = MemorizingTransformer(MemorizingConfig.preset("tiny"))
    config = TrainConfig(
        steps=steps,
        batch_size=2,
        warmup_steps=2,
        lr=3e-3,
        eval_every=0,
        checkpoint_every=2,
        log_every=1,
        eval_tokens=50,
        **overrides,
    )
    return Trainer(model, config, docs(), docs(2, seed=1), run_dir)


def logged_losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_gives_bit_identical_losses(tmp_path):
    uninterrupted = new_trainer(tmp_path / "a")
    uninterrupted.train(progress=False)
    reference = logged_losses(tmp_path / "a")
    assert len(reference) == 4

    first = new_trainer(tmp_path / "b")
    early = [first.train_step()["loss"] for _ in range(2)]
    first.save()
    resumed = new_trainer(tmp_path / "b")
    resumed.model.embed.weight.data.zero_()  # weights must come from the checkpoint
    assert resumed.resume() and resumed.step == 2
    resumed.train(progress=False)
    assert early + logged_losses(tmp_path / "b") == reference  # bit-identical, not approximately equal
    assert resumed.state.memory_fill() == uninterrupted.state.memory_fill()


def test_interrupted_checkpoint_leaves_previous_intact(tmp_path, monkeypatch):
    trainer = new_trainer(tmp_path)
    trainer.train_step()
    saved = trainer.save()
    weights = (saved / "model.safetensors").read_bytes()
    trainer.train_step()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert latest_checkpoint(tmp_path) == saved
    assert (saved / "model.safetensors").read_bytes() == weights
    monkeypatch.undo()
    resumed = new_trainer(tmp_path)
    assert resumed.resume() and resumed.step == 1
    assert resumed.save().name == "step-0000001"  # stale temporary folders are cleaned up
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-0000001"]


def test_validation_is_logged_and_checkpoints_rotate(tmp_path):
    trainer = new_trainer(tmp_path, steps=6)
    trainer.config.eval_every = 3
    trainer.train(progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "valid_loss" in r] == [3, 6]
    assert all(math.isfinite(r["valid_loss"]) for r in records if "valid_loss" in r)
    # the memory gates per layer and head are logged over training (tiny: one memory layer, 4 heads)
    gates = records[-1]["memory_gates"]
    assert list(gates) == [str(i) for i in trainer.model.config.memory_layer_indices]
    assert len(gates[list(gates)[0]]) == 4
    assert gates == trainer.model.memory_gates() and all(0 < g < 1 for g in gates[list(gates)[0]])
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-0000004", "step-0000006"]
    assert resolve_model_dir(tmp_path).name == "step-0000006"


def test_evaluation_is_finite_and_honours_memory_overrides(tmp_path):
    model = MemorizingTransformer(MemorizingConfig.preset("tiny")).eval()
    model.save_pretrained(tmp_path)
    documents = docs(3, length=200)
    result = evaluate(model, documents)
    assert math.isfinite(result.loss) and result.tokens == sum(d.ids.numel() - 1 for d in documents)
    assert result.bits_per_byte == pytest.approx(result.loss * result.tokens / math.log(2) / 900)
    assert len(result.loss_by_segment) == math.ceil((200 + 14 - 1) / 16)
    bigger = MemorizingTransformer.from_pretrained(tmp_path, memory_size=4096, knn_k=8)
    assert bigger.config.memory_size == 4096 and bigger.new_state(1).memories[2].capacity == 4096
    other = evaluate(bigger, documents)
    assert other.loss != result.loss  # more memory and k change what is retrieved
    without = MemorizingTransformer.from_pretrained(tmp_path, knn_layers=())
    assert without.new_state(1).memories == {}
    assert math.isfinite(evaluate(without, documents, max_tokens=100).loss)
    with pytest.raises(ValueError, match="does not fit this configuration"):
        MemorizingTransformer.from_pretrained(tmp_path, d_model=32)


def test_log_binned_loss_is_token_weighted():
    from memorizing_transformers.evaluation.perplexity import EvalResult
    from memorizing_transformers.evaluation.report import log_binned

    result = EvalResult(
        1.0, 2.7, None, 0, 1, loss_by_segment=[1.0, 2.0, 3.0, 5.0, 1.0], tokens_by_segment=[10, 10, 10, 30, 10]
    )
    positions, losses = log_binned(result, segment_length=100)
    assert positions == [50.0, 150.0, 300.0, 450.0]
    assert losses == [1.0, 2.0, 4.5, 1.0]


def test_atomic_writes_keep_the_old_file_on_failure_and_get_normal_permissions(tmp_path):
    from memorizing_transformers.atomic import write_atomically

    target = tmp_path / "kb.bin"
    old_mask = os.umask(0o022)
    try:
        write_atomically(target, lambda tmp: Path(tmp).write_bytes(b"first"))

        def killed_midway(tmp: str) -> None:
            Path(tmp).write_bytes(b"half")
            raise RuntimeError("killed")

        with pytest.raises(RuntimeError):
            write_atomically(target, killed_midway)
    finally:
        os.umask(old_mask)
    assert target.read_bytes() == b"first"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["kb.bin"]  # no temporary file left
