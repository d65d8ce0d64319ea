"""`mt demo`: show the memory working, then measure it on real long documents.

1. The recall task (names bound to values, asked again far later): the same small model
   is trained with and without a kNN memory, and answer accuracy is reported by where
   the binding lies (in the segment, in the XL cache, or only in the memory).
2. Python code (`pycode`: the standard library and the installed packages, one document per
   directory): a small vanilla model pre-trained for 20M tokens is fine-tuned for 500K tokens
   with and without a kNN memory, and test perplexity is reported on held-out directories,
   for the memory model also with its memory switched off.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import write_atomically
from .config import MemorizingConfig
from .data.corpora import load_corpus
from .data.pipeline import load_tokenized, tokenize_documents
from .data.streaming import TokenizedDocument
from .data.synthetic import DISTANCE_CATEGORIES, RecallTask, curriculum_documents
from .evaluation.perplexity import EvalResult, evaluate
from .evaluation.recall import recall_accuracy
from .evaluation.report import describe, markdown_table, plot_loss_by_position
from .pretrained import MemorizingTransformer
from .training.trainer import TrainConfig, Trainer

# The code stage starts, as the paper's Table 4 does, from a vanilla model pre-trained at length: d 128,
# 4 layers, 128-token segments, 20M tokens of `pycode` (experiments/grid.py table4-pycode-2048, about an
# hour on two cores). Trained from scratch for the minutes a demo has, a model this small never learns to
# copy, and a memory has nothing to add (docs/RESULTS.md).
PRETRAINED = Path(__file__).resolve().parents[2] / "experiments/results/grids/table4-pycode-2048/pretrain-weights"
CODE_CORPUS = "pycode"
# Both fine-tunes read the previous segment (XL 128); the memory goes in layer 1, where that pre-training's
# search finds continuations, its gate starting at 0.5 (docs/RESULTS.md: the layer and the gate it takes).
CODE_XL: dict[str, Any] = dict(xl_length=128, knn_layers=())
CODE_MEMORY: dict[str, Any] = dict(xl_length=128, knn_layers=(1,), memory_size=8192, knn_k=32, memory_gate_init=0.0)


# The recall task: 32 names bound to 16 values, asked again up to 512 tokens later, so
# most answers lie beyond the 32-token segment and its 32-token XL cache.
RECALL_TASK = RecallTask(
    num_names=32, num_values=16, document_length=512, min_distance=2, max_distance=512, question_rate=0.8
)
# Three choices make the memory learnable in a minute or two on a CPU (docs/RESULTS.md):
# the memory gate starts nearly shut, layer 0 starts as a previous-token layer, and the
# distances grow by a curriculum.
RECALL_MODEL: dict[str, Any] = dict(
    d_model=64,
    n_layers=2,
    n_heads=2,
    head_dim=32,
    d_ff=128,
    segment_length=32,
    xl_length=32,
    knn_layers=(1,),
    memory_size=512,
    knn_k=8,
    memory_gate_init=-3.0,
    previous_token_bias_init=5.0,
)
EVAL_SEED_OFFSET = 1_000_000_000  # evaluation documents never share a seed with training ones


@dataclass
class DemoScale:
    steps: int  # of the code fine-tunes
    batch_size: int
    max_documents: int | None  # per split; None: the whole split
    test_tokens: int | None  # None: whole test documents
    recall_steps: int
    recall_eval_documents: int


FULL = DemoScale(
    steps=244,  # 500K tokens of 16 x 128
    batch_size=16,
    max_documents=None,
    test_tokens=200_000,
    recall_steps=2000,
    recall_eval_documents=64,
)
QUICK = DemoScale(steps=3, batch_size=2, max_documents=3, test_tokens=512, recall_steps=20, recall_eval_documents=8)


def code_documents(scale: DemoScale, tokenizer) -> tuple[list[TokenizedDocument], list[TokenizedDocument]]:
    """Train and test documents of the code corpus at this scale, read through `tokenizer`."""
    if scale.max_documents is None:
        return load_tokenized(CODE_CORPUS, "train", tokenizer), load_tokenized(CODE_CORPUS, "test", tokenizer)
    train, test = (load_corpus(CODE_CORPUS, split)[: scale.max_documents] for split in ("train", "test"))
    return tokenize_documents(train, tokenizer), tokenize_documents(test, tokenizer)


def train(
    label: str,
    config: MemorizingConfig,
    train_config: TrainConfig,
    train_docs: list[TokenizedDocument],
    run_dir: Path,
    tokenizer=None,
    start: MemorizingTransformer | None = None,
) -> tuple[MemorizingTransformer, float]:
    """Train (or finish training, resuming from the run's checkpoint) one model, from the weights of `start`
    where given; returns it and the seconds spent."""
    torch.manual_seed(train_config.seed)
    model = MemorizingTransformer(config, tokenizer=tokenizer)
    trainer = Trainer(model, train_config, train_docs, None, run_dir)
    if trainer.resume():
        print(f"  {label}: resuming {run_dir} at step {trainer.step}")
    elif start is not None:
        model.take_weights(start)
    began = time.perf_counter()
    if trainer.step < train_config.steps:
        trainer.train(progress=True)
    return model, time.perf_counter() - began


def load_pretrained(pretrained: Path) -> MemorizingTransformer:
    """The vanilla model the code stage fine-tunes, or a one-line error saying where it should be."""
    if not (pretrained / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo's code stage starts from the pre-trained weights in {pretrained}, which are not there: run "
            "`mt demo` from a checkout of the repository, or pass --pretrained DIR"
        )
    return MemorizingTransformer.from_pretrained(pretrained)


def code_stage(
    scale: DemoScale, out: Path, start: MemorizingTransformer, pretrained: Path
) -> tuple[list[dict[str, Any]], str, Path]:
    """Fine-tune `start` (read from `pretrained`) with and without memory on Python code; evaluate on held-out
    directories."""
    tokenizer = start.tokenizer
    print(
        f"-- Python code (`{CODE_CORPUS}`: the standard library and the installed packages, one document per "
        f"directory), from a vanilla model pre-trained on it ({pretrained})"
    )
    train_docs, test_docs = code_documents(scale, tokenizer)
    print(
        f"   {len(train_docs)} training documents ({sum(d.ids.numel() for d in train_docs):,} tokens), "
        f"{len(test_docs)} test documents ({sum(d.ids.numel() for d in test_docs):,} tokens), BPE of "
        f"{len(tokenizer)} tokens"
    )
    train_config = TrainConfig(
        steps=scale.steps,
        batch_size=scale.batch_size,
        lr=1e-3,
        warmup_steps=max(1, scale.steps // 10),
        eval_every=0,
        checkpoint_every=max(1, scale.steps // 4),
        log_every=max(1, scale.steps // 20),
    )
    results: dict[str, EvalResult] = {}
    rows = []

    def measure(label: str, model: MemorizingTransformer, train_seconds: float) -> None:
        began = time.perf_counter()
        results[label] = result = evaluate(model, test_docs, max_tokens=scale.test_tokens, progress=True)
        print(f"  {label}: test perplexity {result.perplexity:.2f} ({result.tokens:,} tokens)")
        rows.append(
            {
                "label": label,
                **describe(model),
                **result.to_dict(),
                "train_seconds": train_seconds,
                "eval_seconds": time.perf_counter() - began,
            }
        )

    for label, overrides in (("XL + kNN memory", CODE_MEMORY), ("XL only", CODE_XL)):
        config = dataclasses.replace(start.config, **overrides)
        slug = "memory" if config.knn_layers else "no-memory"
        model, train_seconds = train(label, config, train_config, train_docs, out / f"code-{slug}", tokenizer, start)
        print(f"  {label}: fine-tuned {train_seconds:.0f} s")
        measure(label, model, train_seconds)
        if config.knn_layers:  # the same weights without their memory: what the memory itself adds
            measure("XL + kNN memory, memory off", model.without_memory(), train_seconds)
    plot = out / "code_loss_by_position.png"
    tokens = scale.steps * scale.batch_size * start.config.segment_length
    plot_loss_by_position(
        results, start.config.segment_length, plot, f"{CODE_CORPUS}, test split, after {tokens:,} tokens of fine-tuning"
    )
    return rows, markdown_table(rows), plot


def recall_stage(scale: DemoScale, out: Path) -> tuple[list[dict[str, Any]], str]:
    """Train the recall model with and without memory; answer accuracy by where the binding lies."""
    print(
        f"-- the recall task: {RECALL_TASK.num_names} names bound to {RECALL_TASK.num_values} values, "
        f"asked again up to {RECALL_TASK.max_distance} tokens later; loss on the answers only"
    )
    config = MemorizingConfig(**RECALL_MODEL, vocab_size=RECALL_TASK.vocab_size)
    train_config = TrainConfig(
        steps=scale.recall_steps,
        batch_size=32,
        lr=3e-3,
        warmup_steps=min(100, scale.recall_steps),
        weight_decay=0.0,
        shuffle=False,
        eval_every=0,
        checkpoint_every=scale.recall_steps,
        log_every=max(1, scale.recall_steps // 20),
    )
    train_docs = curriculum_documents(
        RECALL_TASK, scale.recall_steps, train_config.batch_size, config.segment_length, start=32, doubling_steps=500
    )
    eval_docs = RECALL_TASK.generate_many(range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + scale.recall_eval_documents))
    rows = []
    for label, variant in (("XL + kNN memory", config), ("XL only", dataclasses.replace(config, knn_layers=()))):
        slug = "memory" if variant.knn_layers else "no-memory"
        model, seconds = train(label, variant, train_config, train_docs, out / f"recall-{slug}")
        accuracy = recall_accuracy(model, eval_docs)
        rows.append({"label": label, "train_seconds": seconds, "accuracy": accuracy})
        print(
            f"  {label}: answers beyond the XL window {accuracy['memory']['accuracy']:.1%} right, trained "
            f"{seconds:.0f} s"
        )
    lines = [
        "| model | answer in its segment | in the XL cache | only in memory | chance |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = " | ".join(
            f"{row['accuracy'][c]['accuracy']:.1%} ({row['accuracy'][c]['count']})" for c in DISTANCE_CATEGORIES
        )
        lines.append(f"| {row['label']} | {cells} | {RECALL_TASK.chance_accuracy:.1%} |")
    return rows, "\n".join(lines)


def run_demo(
    quick: bool = False, out_dir: Path = Path("runs/demo"), docs_dir: Path | None = None, pretrained: Path = PRETRAINED
) -> dict[str, Any]:
    began = time.perf_counter()
    scale = QUICK if quick else FULL
    out = out_dir / ("quick" if quick else "full")
    start = load_pretrained(pretrained)
    print(f"== Memorizing Transformers demo ({'quick' if quick else 'full'}) -> {out}")
    recall_rows, recall_table = recall_stage(scale, out)
    code_rows, code_table, plot = code_stage(scale, out, start, pretrained)
    report = {
        "command": "mt demo" + (" --quick" if quick else ""),
        "scale": dataclasses.asdict(scale),
        "recall": {"task": dataclasses.asdict(RECALL_TASK), "model": RECALL_MODEL, "results": recall_rows},
        "code": {"corpus": CODE_CORPUS, "memory": CODE_MEMORY, "xl": CODE_XL, "results": code_rows},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "wall_seconds": time.perf_counter() - began,
    }
    write_atomically(out / "demo.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    print()
    print(
        f"Recall task, {scale.recall_eval_documents} held-out documents, answer accuracy by where the binding lies "
        f"(same seed and {scale.recall_steps} steps each):"
    )
    print(recall_table)
    print()
    print(
        f"Python code, held-out documents, after {scale.steps} steps of fine-tuning from the same pre-training and "
        "seed:"
    )
    print(code_table)
    print(f"\nplot: {plot}\nresults: {out / 'demo.json'}\ndemo took {report['wall_seconds'] / 60:.1f} minutes")
    if docs_dir is not None:
        publish(report, recall_table, code_table, plot, docs_dir)
    return report


def publish(report: dict[str, Any], recall_table: str, code_table: str, plot: Path, docs_dir: Path) -> None:
    """Copy the results into the documentation folder, with the command that made them."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(docs_dir / "demo.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    write_atomically(docs_dir / plot.name, lambda tmp: Path(tmp).write_bytes(plot.read_bytes()))
    machine = report["machine"]
    text = (
        f"# Demo results\n\nMade by `{report['command']} --docs {docs_dir}` "
        f"({machine['platform']}, torch {machine['torch']}, {machine['threads']} threads, "
        f"{report['wall_seconds'] / 60:.1f} minutes in all); raw numbers in demo.json.\n\n"
        f"## Recall task: answer accuracy by where the binding lies\n\n{recall_table}\n\n"
        "## Python code: held-out directories, fine-tuned from a vanilla pre-training\n\n"
        f"{code_table}\n\n![loss by position]({plot.name})\n"
    )
    write_atomically(docs_dir / "demo.md", lambda tmp: Path(tmp).write_text(text))
