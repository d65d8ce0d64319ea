"""Training: truncated back-propagation through segments, with memory, checkpoints and resume.

Each step feeds one segment per row (rows pinned to documents by the streaming
batcher), carries the training stream's state (XL caches and kNN memories) to the
next step, and back-propagates through the current segment only. Validation streams
the valid split with a state of its own, so training and evaluation memories never mix.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model
from tqdm.auto import tqdm

from ..data.streaming import StreamingBatcher, TokenizedDocument
from ..evaluation.perplexity import evaluate
from ..pretrained import MemorizingTransformer
from ..runs import latest_checkpoint
from . import distributed
from .checkpoint import (
    load_training_state,
    resume_candidates,
    run_lock,
    save_checkpoint,
    truncate_metrics,
)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    shuffle: bool = True  # document order shuffled per epoch; False keeps the given order (a curriculum)
    eval_every: int = 200  # 0: only at the end
    eval_tokens: int = 20_000  # validation budget per evaluation
    checkpoint_every: int = 200  # 0: only at the end
    checkpoint_minutes: float = 0.0  # also checkpoint when this much wall time has passed since the last (0: never)
    keep_checkpoints: int = 2
    log_every: int = 10
    # Steps whose loss or gradient is not finite (NaN, inf) that may be skipped (no update,
    # counted in metrics.jsonl) before training stops; 0 stops at the first, with no checkpoint.
    skip_nonfinite: int = 0
    # Under torchrun: shard the weights, gradients and AdamW state across the processes (FSDP)
    # instead of keeping a whole copy in each (DDP); see training/distributed.py.
    fsdp: bool = False
    # Where the training stream's memories live (None: the model's device; "cpu" beside a GPU:
    # pinned host memory, searched there, for memories larger than the GPU holds).
    memory_device: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # recorded with the run (e.g. corpus, preset)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "log_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "eval_tokens", "checkpoint_every", "skip_nonfinite"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not (self.checkpoint_minutes >= 0 and math.isfinite(self.checkpoint_minutes)):
            raise ValueError(f"TrainConfig.checkpoint_minutes must be >= 0, got {self.checkpoint_minutes}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr}")


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: MemorizingTransformer, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, scales, gates, biases) do not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=False)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient stopped being finite."""


def segment_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy over the global batch's scored targets, as this rank's share to
    back-propagate (DDP averages the ranks' gradients), and that mean itself; 0 (with a graph)
    when the batch scores none."""
    world = distributed.rank_and_world()[1]
    if world == 1:
        if not (targets != -100).any():
            return logits.sum() * 0.0, 0.0
        # ignore_index averages over the scored targets, without gathering their rows of logits
        loss = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-100)
        return loss, loss.item()
    scored = float(distributed.total((targets != -100).sum()))
    if scored == 0:
        return logits.sum() * 0.0, 0.0
    summed = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return summed * (world / scored), float(distributed.total(summed.detach())) / scored


class Trainer:
    """Train `model` on `train_docs`, validate on `valid_docs`, checkpoint into `run_dir`.

    Under torchrun (torch.distributed initialised, see training/distributed.py) each rank trains
    its rows of the global batch through DistributedDataParallel, or with `fsdp` on its shards of
    the model; rank 0 validates (every rank does, in step, when the model is sharded), logs and
    writes the checkpoints, which hold the whole model and the whole batch's stream state."""

    def __init__(
        self,
        model: MemorizingTransformer,
        config: TrainConfig,
        train_docs: list[TokenizedDocument],
        valid_docs: list[TokenizedDocument] | None,
        run_dir: str | Path,
    ) -> None:
        self.model, self.config, self.valid_docs = model, config, valid_docs
        self.run_dir = Path(run_dir)
        # Dropout draws from torch's global generator: seeding it here makes a run repeat
        # itself, as Hugging Face's Trainer does in its constructor (set_seed).
        rank, world = distributed.rank_and_world()
        torch.manual_seed(config.seed + rank)  # each process draws its own rows' dropout masks
        random.seed(config.seed)
        self.batcher = StreamingBatcher(
            train_docs,
            config.batch_size,
            model.config.segment_length,
            seed=config.seed,
            shuffle=config.shuffle,
            epochs=None,
        )
        self.rows = distributed.own_rows(config.batch_size)  # this rank's rows of every global batch
        self.main = distributed.is_main()
        self.network = model  # what the step calls: the model (sharded in place by FSDP), or DDP around it
        self.sharded = world > 1 and config.fsdp
        if self.sharded:
            distributed.shard(model)
        elif world > 1:
            # The XL compression's projections see no gradient on a step without a cache (the first).
            self.network = torch.nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=bool(model.config.xl_compression)
            )
        self.optimizer = make_optimizer(model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, config))
        self.state = model.new_state(self.rows.stop - self.rows.start, memory_device=config.memory_device)
        self.step = 0
        self.skipped = 0  # steps skipped for a non-finite loss or gradient
        self.train_seconds = 0.0  # wall time spent in train(), summed over every resumed part of the run
        self.metrics_path = self.run_dir / "metrics.jsonl"
        cuda = model.device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    # ------------------------------------------------------------------ checkpoints
    def training_state(self, optimizer_by_name: dict[str, Any] | None = None) -> dict[str, Any]:
        """What a checkpoint holds besides the weights; with `optimizer_by_name` (a sharded model's
        optimizer state gathered whole, keyed by parameter name) in place of the optimizer's own."""
        return {
            "step": self.step,
            "skipped": self.skipped,
            "train_seconds": self.train_seconds,
            "train_config": asdict(self.config),
            "optimizer": self.optimizer.state_dict() if optimizer_by_name is None else optimizer_by_name,
            "optimizer_by_name": optimizer_by_name is not None,
            "scheduler": self.scheduler.state_dict(),
            "batcher": self.batcher.state_dict(),
            "stream_state": distributed.gather_rows(self.state.state_dict()),  # every rank's rows
            "rng": {
                "torch": torch.get_rng_state(),
                "torch_ranks": distributed.gather(torch.get_rng_state()),  # every process's, by rank
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python": random.getstate(),
            },
        }

    def save(self) -> Path | None:
        """Checkpoint the run (rank 0 writes it; every rank must call this); refused
        (`TrainingDiverged`) when a weight is no longer finite."""
        if not distributed.all_finite(list(self.model.parameters())):
            raise TrainingDiverged(
                f"step {self.step}: the weights are no longer finite; stopped without writing a "
                f"checkpoint (the last one: {latest_checkpoint(self.run_dir) or 'none'})"
            )
        model, optimizer_by_name = self.model, None
        if self.sharded:  # gathered whole on rank 0, into a plain copy of the model that writes itself
            weights, optimizer_by_name = distributed.full_state(self.model, self.optimizer)
            model = self._unsharded(weights) if self.main else None
        state = self.training_state(optimizer_by_name)
        if not self.main:
            return None
        return save_checkpoint(self.run_dir, self.step, model, state, keep=self.config.keep_checkpoints)

    def _unsharded(self, weights: dict[str, torch.Tensor]) -> MemorizingTransformer:
        """A plain model on the CPU holding `weights`, its tokenizer the model's (built on the meta
        device: no weights initialised, no random numbers drawn)."""
        with torch.device("meta"):
            twin = type(self.model)(self.model.config, tokenizer=self.model._tokenizer_source)
        twin.load_state_dict(weights, assign=True)
        if self.model.config.tie_embeddings:
            twin.lm_head.weight = twin.embed.weight
        twin._tokenizer = self.model._tokenizer
        return twin

    def resume(self) -> bool:
        """Continue from the run's newest checkpoint that loads (the one `latest` names first,
        then the others by step, each failure reported); False when there is none."""
        candidates = resume_candidates(self.run_dir)
        failures = []
        for checkpoint in candidates:
            try:
                self._load(checkpoint)
            except (ValueError, OSError) as err:
                print(f"warning: cannot resume from {checkpoint}: {err}", file=sys.stderr)
                failures.append(f"{checkpoint.name}: {err}")
                continue
            if failures:
                print(f"resuming from the older {checkpoint} at step {self.step}", file=sys.stderr)
            if self.main:
                truncate_metrics(self.metrics_path, self.step)
            return True
        if failures:
            raise ValueError(f"no checkpoint of {self.run_dir} loads: " + "; ".join(failures))
        return False

    def _load(self, checkpoint: Path) -> None:
        saved = load_training_state(checkpoint)
        if (
            saved["train_config"]["batch_size"] != self.config.batch_size
            or saved["train_config"]["seed"] != self.config.seed
        ):
            raise ValueError(f"cannot resume {checkpoint}: it was trained with another batch size or seed")
        weights = checkpoint / "model.safetensors"
        if self.sharded and not saved.get("optimizer_by_name"):
            raise ValueError(f"cannot resume {checkpoint} with fsdp: it was written without it (resume it without)")
        try:
            if self.sharded:  # every rank reads the whole weights and keeps its shards
                whole = load_file(weights)
                if self.model.config.tie_embeddings:
                    whole.setdefault("lm_head.weight", whole["embed.weight"])
                distributed.load_whole(self.model, self.optimizer, whole, None)
            else:
                load_model(self.model, weights, device=str(self.model.device))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{weights} is truncated or corrupt ({err})") from None
        if saved.get("optimizer_by_name"):  # written under fsdp: whole, keyed by parameter name
            distributed.load_whole(self.model, self.optimizer, None, saved["optimizer"])
        else:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.batcher.load_state_dict(saved["batcher"])
        self.state.load_state_dict({k: v[self.rows] for k, v in saved["stream_state"].items()})  # this rank's rows
        rank, world = distributed.rank_and_world()
        by_rank = saved["rng"].get("torch_ranks") or [saved["rng"]["torch"]]
        if len(by_rank) == world:  # each process goes on with its own generator
            torch.set_rng_state(by_rank[rank])
        else:  # another world size: fresh generators per rank, from the run's seed and step
            torch.manual_seed(self.config.seed + rank + 1_000_003 * saved["step"])
        if saved["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        random.setstate(saved["rng"]["python"])
        self.step = saved["step"]
        self.skipped = saved.get("skipped", 0)
        self.train_seconds = saved.get("train_seconds", 0.0)

    # ------------------------------------------------------------------ loop
    def train_step(self) -> dict[str, float]:
        batch = next(self.batcher)  # the global batch: every rank draws the same, and keeps its rows
        rows = self.rows
        device = self.model.device
        self.model.train()
        with self.autocast:
            out = self.network(
                batch.input_ids[rows].to(device),
                attention_mask=batch.attention_mask[rows].to(device),
                state=self.state,
                start_of_document=batch.start_of_document[rows].to(device),
            )
        self.state = out.state
        loss, mean_loss = segment_loss(out.logits, batch.targets[rows].to(device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = distributed.whole(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip))
        stats = {
            "loss": mean_loss,
            "grad_norm": grad_norm.item(),
            "targets": batch.num_targets,
            "tokens": int(batch.attention_mask.sum()),
            "skipped": False,
        }
        if not (math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])):
            what = "loss" if not math.isfinite(stats["loss"]) else "gradient norm"
            if self.skipped >= self.config.skip_nonfinite:
                last = latest_checkpoint(self.run_dir)
                raise TrainingDiverged(
                    f"step {self.step + 1}: the {what} is {stats['loss'] if what == 'loss' else stats['grad_norm']}; "
                    f"stopped without writing a checkpoint (the last one: {last or 'none'}). Lower the learning rate "
                    f"(now {self.scheduler.get_last_lr()[0]:.3g}), or allow skipped steps with skip_nonfinite"
                    + (f" (already {self.skipped} skipped)" if self.skipped else "")
                )
            self.optimizer.zero_grad(set_to_none=True)  # skipped: no update, the schedule goes on
            self.skipped += 1
            stats["skipped"] = True
            with warnings.catch_warnings():  # torch warns of a schedule stepped without an update
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        else:
            self.optimizer.step()
            self.scheduler.step()
        self.step += 1
        return stats

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        finite = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        with self.metrics_path.open("a") as f:  # strict JSON: a non-finite number is written as null
            f.write(json.dumps(finite, allow_nan=False) + "\n")

    def validate(self) -> dict[str, float]:
        result = evaluate(self.model, self.valid_docs, batch_size=1, max_tokens=self.config.eval_tokens)
        return {"valid_loss": result.loss, "valid_perplexity": result.perplexity, "valid_tokens": result.tokens}

    def train(
        self, max_seconds: float | None = None, progress: bool = True, until_step: int | None = None
    ) -> dict[str, Any]:
        """Run until `config.steps` (or `max_seconds` of wall time, or step `until_step`, to
        look at the model between parts of a run); returns the last logged record. A part
        ends with a checkpoint, as the run's end does.

        The run directory is locked meanwhile: another process training into it is refused."""
        bar = tqdm(
            total=self.config.steps, initial=self.step, disable=not (progress and self.main), desc="train", unit="step"
        )
        with distributed.main_only(run_lock(self.run_dir)):
            try:
                return self._train(max_seconds, bar, min(self.config.steps, until_step or self.config.steps))
            finally:
                bar.close()  # also before an error, whose message then starts on a line of its own

    def _train(self, max_seconds: float | None, bar: tqdm, until: int) -> dict[str, Any]:
        config = self.config
        began = last_checkpoint = time.perf_counter()
        counted = began  # train_seconds holds the time up to here
        window_tokens, window_loss, window_steps, window_start = 0, 0.0, 0, time.perf_counter()
        record: dict[str, Any] = {}
        while self.step < until:
            stats = self.train_step()
            if not stats["skipped"]:
                window_tokens += stats["tokens"]
                window_loss += stats["loss"]
                window_steps += 1
            out_of_time = max_seconds is not None and time.perf_counter() - began >= max_seconds
            now = time.perf_counter()
            due = bool(config.checkpoint_minutes) and now - last_checkpoint >= 60 * config.checkpoint_minutes
            out_of_time, due = distributed.main_decides(out_of_time, due)  # taken by every rank together
            last = self.step == until or out_of_time
            if self.step % config.log_every == 0 or last:
                elapsed = time.perf_counter() - window_start
                fill = self.state.memory_fill()
                record = {
                    "step": self.step,
                    "loss": window_loss / window_steps if window_steps else None,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": stats["grad_norm"],
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                    "memory_fill": sum(sum(rows) for rows in fill.values())
                    / max(1, sum(len(rows) for rows in fill.values())),
                    "time": time.time(),
                    "skipped_steps": self.skipped,
                }
                if self.model.config.knn_layers:
                    record["memory_gates"] = self.model.memory_gates()
                validating = (config.eval_every and self.step % config.eval_every == 0) or last
                if self.valid_docs and validating and (self.main or self.sharded):  # sharded: all, in step
                    record.update(self.validate())
                self.log(record)
                bar.set_postfix(
                    loss=f"{record['loss'] or float('nan'):.3f}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                    fill=f"{record['memory_fill']:.0f}",
                )
                window_tokens, window_loss, window_steps, window_start = 0, 0.0, 0, time.perf_counter()
            now = time.perf_counter()
            self.train_seconds, counted = self.train_seconds + now - counted, now
            if (config.checkpoint_every and self.step % config.checkpoint_every == 0) or due or last:
                self.save()
                last_checkpoint = time.perf_counter()
            bar.update(1)
            if last:
                break
        return record
