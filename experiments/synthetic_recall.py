"""Does a small model learn to use its kNN memory? Name/value recall on a CPU.

Trains the same small Memorizing Transformer twice, with the same seed, data and
number of steps: (a) with a kNN memory in one layer, (b) without memory. The task
(`memorizing_transformers.data.synthetic.RecallTask`) binds names to values and
asks for them again later, at distances from a few tokens to the whole document;
the loss covers the answers only. Answers are scored by where their binding lies:
in the query's segment, in the Transformer-XL window, or only in the memory.

Training streams each batch row through one document, segment by segment,
carrying the stream state, and takes one optimiser step per segment (as the
paper does: keys in memory come from slightly older weights). Every document
batch starts from a fresh state.

Three choices make the memory model learn within a minute or two on one CPU
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

    python experiments/synthetic_recall.py --quick            # < 1 minute, a smoke test
    python experiments/synthetic_recall.py                    # about 5 minutes
    python experiments/synthetic_recall.py --memory-gate-init 0 --memory-only --tag gate-0

Writes experiments/results/synthetic_recall[-TAG].json and a .log beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from memorizing_transformers import MemorizingConfig, MemorizingTransformer
from memorizing_transformers.data.synthetic import (
    DISTANCE_CATEGORIES,
    RecallDocument,
    RecallTask,
    accuracy_by_category,
)

RESULTS = Path(__file__).resolve().parent / "results"
EVAL_SEED_OFFSET = 1_000_000_000  # evaluation documents never share a seed with training ones
MILESTONES = {"above_chance": None, "50%": 0.5, "90%": 0.9}  # None: twice the chance accuracy

log = logging.getLogger("synthetic_recall")


@dataclass
class Settings:
    """Everything a run depends on (stored in the results)."""

    seed: int = 0
    budget_minutes: float = 3.0
    max_steps: int = 1_000_000
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_documents: int = 64
    # Adds this to layer 0's position bias at distance 1 in every head, so the layer starts
    # as a previous-token layer (0 keeps the model's own zero initialisation).
    previous_token_bias: float = 5.0
    # Initial gate bias of the memory layers: sigmoid(-3) = 0.05 of each head's output
    # comes from memory at first (the model's own initialisation is 0, a gate of 0.5).
    memory_gate_init: float = -3.0
    # Curriculum: training documents start with questions at most `curriculum_start`
    # tokens from their binding, a limit that doubles every `curriculum_steps` steps up
    # to the task's max_distance (0: no curriculum). Evaluation always uses the full task.
    curriculum_start: int = 32
    curriculum_steps: int = 500
    task: dict[str, Any] = field(default_factory=lambda: dict(
        num_names=32, num_values=16, document_length=512, min_distance=2, max_distance=512, question_rate=0.8,
    ))
    model: dict[str, Any] = field(default_factory=lambda: dict(
        d_model=64, n_layers=2, n_heads=2, head_dim=32, d_ff=128,
        segment_length=32, xl_length=32, knn_layers=(1,), memory_size=512, knn_k=8,
    ))


def stack(documents: list[RecallDocument]) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-length documents -> ids (batch, n) and loss mask (batch, n)."""
    ids = torch.stack([d.document.ids for d in documents])
    mask = torch.stack([d.document.loss_mask for d in documents])
    return ids, mask


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


def segment_loss(
    model: MemorizingTransformer, ids: torch.Tensor, mask: torch.Tensor, start: int, state
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """Run the segment at `start` and return (logits of answer queries, their targets, the loss, state).

    Position t of the segment predicts token t + 1 of the document, which may be the
    first token of the next segment.
    """
    L = model.config.segment_length
    out = model(ids[:, start : start + L], state=state)
    targets = ids[:, start + 1 : start + L + 1]
    answer = mask[:, start + 1 : start + L + 1]
    logits = out.logits[:, : targets.shape[1]][answer]  # (answers, vocab)
    loss = F.cross_entropy(logits, targets[answer]) if answer.any() else logits.sum() * 0.0
    return logits, targets[answer], loss, out.state


@torch.no_grad()
def evaluate(model: MemorizingTransformer, documents: list[RecallDocument], batch_size: int) -> dict[str, Any]:
    """Answer accuracy by distance category on `documents` (each streamed from a fresh state)."""
    model.eval()
    config = model.config
    correct = []
    for first in range(0, len(documents), batch_size):
        batch = documents[first : first + batch_size]
        ids, mask = stack(batch)
        state = model.new_state(len(batch))
        hits = torch.zeros_like(mask)
        for start in range(0, ids.shape[1], config.segment_length):
            logits, targets, _, state = segment_loss(model, ids, mask, start, state)
            window = mask[:, start + 1 : start + config.segment_length + 1]
            hits[:, start + 1 : start + 1 + window.shape[1]][window] = logits.argmax(-1) == targets
        correct += [row[d.answer_positions] for row, d in zip(hits, batch)]
    categories = torch.cat([d.categories(config.segment_length, config.xl_length) for d in documents])
    model.train()
    return accuracy_by_category(torch.cat(correct), categories)


def training_task(settings: Settings, task: RecallTask, step: int) -> RecallTask:
    """The task of the training documents at `step` under the curriculum."""
    if not settings.curriculum_steps:
        return task
    limit = settings.curriculum_start * 2 ** (step // settings.curriculum_steps)
    return replace(task, max_distance=max(task.min_distance, min(task.max_distance, limit)))


def train(settings: Settings, task: RecallTask, memory: bool, max_steps: int, budget_s: float) -> dict[str, Any]:
    """Train one model until `max_steps` or `budget_s` seconds; return its curve and milestones."""
    model = build_model(settings, task, memory)
    config = model.config
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / settings.warmup_steps))
    eval_docs = task.generate_many([EVAL_SEED_OFFSET + settings.seed * 10_000 + i for i in range(settings.eval_documents)])
    chance = task.chance_accuracy
    thresholds = {name: (2 * chance if value is None else value) for name, value in MILESTONES.items()}
    milestones: dict[str, dict[str, float] | None] = {name: None for name in MILESTONES}
    curve = []
    step = documents = 0
    train_s = 0.0
    recent_losses: list[float] = []

    def record() -> None:
        accuracy = evaluate(model, eval_docs, settings.batch_size)
        point = {"step": step, "documents": documents, "train_seconds": round(train_s, 1),
                 "loss": sum(recent_losses) / len(recent_losses) if recent_losses else None,
                 "train_max_distance": training_task(settings, task, step).max_distance,
                 **{f"acc_{name}": accuracy[name]["accuracy"] for name in DISTANCE_CATEGORIES}}
        if memory:
            gates = torch.sigmoid(model.blocks[config.memory_layer_indices[0]].attn.gate_bias)
            point["memory_gate"] = [round(g, 3) for g in gates.tolist()]
        curve.append(point)
        recent_losses.clear()
        for name, threshold in thresholds.items():
            if milestones[name] is None and point["acc_memory"] >= threshold:
                milestones[name] = {"step": step, "train_seconds": point["train_seconds"]}
        log.info("%s step %6d  docs %6d  %6.0fs  loss %5.3f  max distance %4d  acc segment %.3f  xl %.3f  memory %.3f%s",
                 "memory   " if memory else "no-memory", step, documents, train_s, math.nan if point["loss"] is None else point["loss"],
                 point["train_max_distance"],
                 point["acc_segment"], point["acc_xl"], point["acc_memory"],
                 f"  gate {point['memory_gate']}" if memory else "")

    model.train()
    record()
    while step < max_steps and train_s < budget_s:
        started = time.perf_counter()
        seeds = [settings.seed * 10_000_000 + documents + i for i in range(settings.batch_size)]
        ids, mask = stack(training_task(settings, task, step).generate_many(seeds))
        documents += settings.batch_size
        state = model.new_state(settings.batch_size)
        for start in range(0, ids.shape[1], config.segment_length):
            _, _, loss, state = segment_loss(model, ids, mask, start, state)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            recent_losses.append(loss.item())
            step += 1
            if step % settings.eval_every == 0 or step >= max_steps:
                train_s += time.perf_counter() - started
                record()
                started = time.perf_counter()
            if step >= max_steps:
                break
        train_s += time.perf_counter() - started
    if curve[-1]["step"] != step:
        record()
    return {"memory": memory, "config": config.to_dict(), "parameters": sum(p.numel() for p in model.parameters()),
            "steps": step, "documents": documents, "train_seconds": round(train_s, 1),
            "final": curve[-1], "milestones_memory_only": milestones, "curve": curve}


def parse_args() -> tuple[Settings, str, bool]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke test of well under a minute")
    parser.add_argument("--budget-minutes", type=float, help="training time of the memory model (the baseline runs as many steps)")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--previous-token-bias", type=float)
    parser.add_argument("--memory-gate-init", type=float)
    parser.add_argument("--curriculum-start", type=int)
    parser.add_argument("--curriculum-steps", type=int)
    parser.add_argument("--task", type=json.loads, default={}, help='task overrides as JSON, e.g. \'{"num_values": 8}\'')
    parser.add_argument("--model", type=json.loads, default={}, help='model overrides as JSON, e.g. \'{"knn_k": 8}\'')
    parser.add_argument("--memory-only", action="store_true", help="skip the no-memory baseline")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()
    settings = Settings()
    if args.quick:
        settings.budget_minutes, settings.eval_every, settings.eval_documents = 0.4, 100, 16
        settings.curriculum_steps, settings.task["document_length"] = 250, 256
    for name in ("budget_minutes", "max_steps", "seed", "batch_size", "learning_rate", "eval_every",
                 "previous_token_bias", "memory_gate_init", "curriculum_start", "curriculum_steps"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    settings.task.update(args.task)
    settings.model.update(args.model)
    tag = args.tag or ("quick" if args.quick else "")
    return settings, tag, args.memory_only


def main() -> None:
    settings, tag, memory_only = parse_args()
    torch.set_num_threads(1)
    stem = "synthetic_recall" + (f"-{tag}" if tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(), logging.FileHandler(RESULTS / f"{stem}.log", mode="w")])
    task = RecallTask(**settings.task)
    log.info("task %s  chance %.4f", task, task.chance_accuracy)
    runs = [train(settings, task, memory=True, max_steps=settings.max_steps, budget_s=60 * settings.budget_minutes)]
    if not memory_only:
        runs.append(train(settings, task, memory=False, max_steps=runs[0]["steps"], budget_s=math.inf))
    result = {
        "experiment": "synthetic_recall",
        "settings": asdict(settings),
        "task": asdict(task),
        "chance_accuracy": task.chance_accuracy,
        "categories": {"segment": "binding in the query's segment", "xl": "in the XL window before it",
                       "memory": "beyond the XL window: reachable only through the kNN memory"},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "runs": {("memory" if run["memory"] else "no_memory"): run for run in runs},
    }
    path = RESULTS / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
