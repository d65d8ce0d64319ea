"""Does a small model learn to use its kNN memory? Name/value recall on a CPU.

Trains the same small Memorizing Transformer twice, with the same seed, data and
number of steps: (a) with a kNN memory in one layer, (b) without memory. The task
(`memorizing_transformers.data.synthetic.RecallTask`) binds names to values and
asks for them again later, at distances from a few tokens to the whole document;
the loss covers the answers only. Answers are scored by where their binding lies:
in the query's segment, in the Transformer-XL window, or only in the memory.

Training goes through the library's `Trainer`, as every training here does: each
batch row streams through one document, segment by segment, carrying the stream
state, one optimiser step per segment (as the paper does: keys in memory come from
slightly older weights); a row's state is cleared where its next document starts.
The documents are made by the library's `curriculum_documents` and scored by
`recall_accuracy`, as in `mt demo`. Runs are counted in steps (the same command gives
the same figures on the same machine and threads), checkpointed in
runs/synthetic_recall[-TAG]/, and resume when interrupted.

Three choices make the memory model learn within a few thousand steps on one CPU
thread (each can be switched off to see it stall at chance):
- the memory gate starts nearly closed (`memory_gate_init`, g = 0.05 instead of
  the model's 0.5): with half of each head's output coming from a memory that
  retrieves nothing useful yet, the local copy circuit never forms;
- a curriculum of distances (`curriculum_*`): questions first stay within 32
  tokens, so the induction circuit (query by name, copy the token after its
  earlier occurrence) forms locally; the limit then doubles every 500 steps, and
  the memory, which shares the layer's query/key/value projections, is ready to
  use once answers lie beyond the XL window;
- layer 0 starts as a previous-token layer (`previous_token_bias`), so the key
  written at a value token can encode the name before it.
The gate and the previous-token prior are the model options `memory_gate_init` and
`previous_token_bias_init`; the curriculum is in the training documents.

    python experiments/synthetic_recall.py --quick            # about a minute, a smoke test
    python experiments/synthetic_recall.py                    # 4,000 steps each, with and without memory
    python experiments/synthetic_recall.py --memory-gate-init 0 --memory-only --tag gate-0

Writes experiments/results/synthetic_recall[-TAG].json and a .log beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from memorizing_transformers import MemorizingConfig, MemorizingTransformer
from memorizing_transformers.atomic import write_atomically
from memorizing_transformers.data.synthetic import DISTANCE_CATEGORIES, RecallTask, curriculum_documents
from memorizing_transformers.demo import RECALL_MODEL, RECALL_TASK
from memorizing_transformers.evaluation.recall import recall_accuracy
from memorizing_transformers.training.trainer import TrainConfig, Trainer

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path("runs") / "synthetic_recall"  # RUNS.parent / synthetic_recall[-TAG] holds the checkpoints
EVAL_SEED_OFFSET = 1_000_000_000  # evaluation documents never share a seed with training ones
MILESTONES = {"above_chance": None, "50%": 0.5, "90%": 0.9}  # None: twice the chance accuracy

log = logging.getLogger("synthetic_recall")


@dataclass
class Settings:
    """Everything a run depends on (stored in the results)."""

    seed: int = 0
    steps: int = 4000
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 100  # then a constant learning rate
    weight_decay: float = 0.0
    eval_every: int = 250
    eval_documents: int = 64
    # Adds this to layer 0's position bias at distance 1 in every head, so the layer starts
    # as a previous-token layer (0 keeps the model's own zero initialisation).
    previous_token_bias: float = RECALL_MODEL["previous_token_bias_init"]
    # Initial gate of the memory layers: sigmoid(-3) = 0.05 of each head's output comes from
    # memory at first (the model's own initialisation is 0, a gate of 0.5).
    memory_gate_init: float = RECALL_MODEL["memory_gate_init"]
    # Curriculum: training documents start with questions at most `curriculum_start`
    # tokens from their binding, a limit that doubles every `curriculum_steps` steps up
    # to the task's max_distance (0: no curriculum). Evaluation always uses the full task.
    curriculum_start: int = 32
    curriculum_steps: int = 500
    # The demo's recall task and model (memorizing_transformers.demo), its two initial values above.
    task: dict[str, Any] = field(default_factory=lambda: asdict(RECALL_TASK))
    model: dict[str, Any] = field(
        default_factory=lambda: {
            k: v for k, v in RECALL_MODEL.items() if k not in ("memory_gate_init", "previous_token_bias_init")
        }
    )


def build_model(settings: Settings, task: RecallTask, memory: bool) -> MemorizingTransformer:
    """The model of `settings`, with its memory layers or none, initialised from `settings.seed`."""
    fields = {
        **settings.model,
        "vocab_size": task.vocab_size,
        "memory_gate_init": settings.memory_gate_init,
        "previous_token_bias_init": settings.previous_token_bias,
    }
    if not memory:
        fields["knn_layers"] = ()
    torch.manual_seed(settings.seed)
    return MemorizingTransformer(MemorizingConfig(**fields))


def train(settings: Settings, task: RecallTask, memory: bool, run_dir: Path) -> dict[str, Any]:
    """Train one model for `settings.steps` (resuming from `run_dir`), evaluating every
    `eval_every` steps; returns its curve and milestones."""
    model = build_model(settings, task, memory)
    config = model.config
    documents = curriculum_documents(
        task,
        settings.steps,
        settings.batch_size,
        config.segment_length,
        start=settings.curriculum_start,
        doubling_steps=settings.curriculum_steps,
        seed=settings.seed,
    )
    train_config = TrainConfig(
        steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.learning_rate,
        min_lr_ratio=1.0,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        seed=settings.seed,
        shuffle=False,
        eval_every=0,
        checkpoint_every=0,
        log_every=settings.eval_every,
    )
    trainer = Trainer(model, train_config, documents, None, run_dir)
    trainer.resume()
    eval_docs = task.generate_many(
        [EVAL_SEED_OFFSET + settings.seed * 10_000 + i for i in range(settings.eval_documents)]
    )
    curve_path = run_dir / "curve.json"
    curve = [p for p in json.loads(curve_path.read_text()) if p["step"] <= trainer.step] if curve_path.is_file() else []
    segments_per_document = -(-(task.document_length - 1) // config.segment_length)

    def record() -> None:
        accuracy = recall_accuracy(model, eval_docs, batch_size=settings.batch_size)
        losses = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()] if trainer.step else []
        step = trainer.step
        limit = (
            task.max_distance
            if not settings.curriculum_steps
            else min(task.max_distance, settings.curriculum_start * 2 ** (step // settings.curriculum_steps))
        )
        point = {
            "step": step,
            "documents": settings.batch_size * -(-step // segments_per_document),
            "train_seconds": round(trainer.train_seconds, 1),
            "loss": losses[-1]["loss"] if losses else None,
            "train_max_distance": limit,
            **{f"acc_{name}": accuracy[name]["accuracy"] for name in DISTANCE_CATEGORIES},
        }
        if memory:
            gates = torch.sigmoid(model.blocks[config.memory_layer_indices[0]].attn.memory_gate)
            point["memory_gate"] = [round(g, 3) for g in gates.tolist()]
        curve.append(point)
        write_atomically(curve_path, lambda tmp: Path(tmp).write_text(json.dumps(curve)))
        log.info(
            "%s step %6d  %6.0fs  loss %s  max distance %4d  acc segment %.3f  xl %.3f  memory %.3f%s",
            "memory   " if memory else "no-memory",
            step,
            point["train_seconds"],
            "-" if point["loss"] is None else f"{point['loss']:5.3f}",
            limit,
            point["acc_segment"],
            point["acc_xl"],
            point["acc_memory"],
            f"  gate {point['memory_gate']}" if memory else "",
        )

    if not curve or curve[-1]["step"] != trainer.step:
        record()
    while trainer.step < settings.steps:
        trainer.train(until_step=(trainer.step // settings.eval_every + 1) * settings.eval_every, progress=False)
        record()
    return {
        "memory": memory,
        "config": config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": trainer.step,
        "documents": curve[-1]["documents"],
        "train_seconds": curve[-1]["train_seconds"],
        "final": curve[-1],
        "milestones_memory_only": milestones(curve, task.chance_accuracy),
        "curve": curve,
    }


def milestones(curve: list[dict[str, Any]], chance: float) -> dict[str, dict[str, float] | None]:
    """The first evaluation at which answers reachable only through the memory pass each threshold."""
    reached: dict[str, dict[str, float] | None] = {}
    for name, value in MILESTONES.items():
        threshold = 2 * chance if value is None else value
        first = next((p for p in curve if p["acc_memory"] >= threshold), None)
        reached[name] = None if first is None else {"step": first["step"], "train_seconds": first["train_seconds"]}
    return reached


def parse_args(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke test of about a minute")
    parser.add_argument("--steps", type=int, help="training steps of each model")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--previous-token-bias", type=float)
    parser.add_argument("--memory-gate-init", type=float)
    parser.add_argument("--curriculum-start", type=int)
    parser.add_argument("--curriculum-steps", type=int)
    parser.add_argument(
        "--task", type=json.loads, default={}, help="task overrides as JSON, e.g. '{\"num_values\": 8}'"
    )
    parser.add_argument("--model", type=json.loads, default={}, help="model overrides as JSON, e.g. '{\"knn_k\": 8}'")
    parser.add_argument("--memory-only", action="store_true", help="skip the no-memory baseline")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON and log go")
    parser.add_argument("--runs", type=Path, default=RUNS.parent, help="where the checkpoints go")
    args = parser.parse_args(argv)
    settings = Settings()
    if args.quick:
        settings.steps, settings.eval_every, settings.eval_documents = 600, 100, 16
        settings.curriculum_steps, settings.task["document_length"] = 250, 256
    for name in (
        "steps",
        "seed",
        "batch_size",
        "learning_rate",
        "eval_every",
        "previous_token_bias",
        "memory_gate_init",
        "curriculum_start",
        "curriculum_steps",
    ):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    settings.task.update(args.task)
    settings.model.update(args.model)
    args.tag = args.tag or ("quick" if args.quick else "")
    return settings, args


def main(argv: list[str] | None = None) -> Path:
    settings, args = parse_args(argv)
    torch.set_num_threads(1)
    stem = "synthetic_recall" + (f"-{args.tag}" if args.tag else "")
    args.results.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    log.handlers = [logging.StreamHandler(), logging.FileHandler(args.results / f"{stem}.log", mode="a")]
    for handler in log.handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    task = RecallTask(**settings.task)
    log.info("task %s  chance %.4f", task, task.chance_accuracy)
    runs_dir = args.runs / stem
    saved = runs_dir / "settings.json"
    if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(asdict(settings))):
        raise SystemExit(f"{runs_dir} holds runs with other settings: remove it, or choose another --tag")
    write_atomically(saved, lambda tmp: Path(tmp).write_text(json.dumps(asdict(settings), indent=2)))
    runs = [train(settings, task, memory=True, run_dir=runs_dir / "memory")]
    if not args.memory_only:
        runs.append(train(settings, task, memory=False, run_dir=runs_dir / "no_memory"))
    result = {
        "experiment": "synthetic_recall",
        "command": "python experiments/synthetic_recall.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": asdict(settings),
        "task": asdict(task),
        "chance_accuracy": task.chance_accuracy,
        "categories": {
            "segment": "binding in the query's segment",
            "xl": "in the XL window before it",
            "memory": "beyond the XL window: reachable only through the kNN memory",
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "runs": {("memory" if run["memory"] else "no_memory"): run for run in runs},
    }
    path = args.results / f"{stem}.json"
    write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    log.info("wrote %s", path)
    return path


if __name__ == "__main__":
    main()
