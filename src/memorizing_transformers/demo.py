"""`mt demo`: show the memory working, then measure it on real long documents.

1. The recall task (names bound to values, asked again far later): the same small model
   is trained with and without a kNN memory, and answer accuracy is reported by where
   the binding lies (in the segment, in the XL cache, or only in the memory).
2. The code corpus (the Python standard library, one document per package): the same
   small model trained with and without memory, test perplexity on held-out packages.
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
from .data.pipeline import corpus_tokenizer, load_tokenized, tokenize_documents
from .data.streaming import TokenizedDocument
from .data.synthetic import DISTANCE_CATEGORIES, RecallTask, curriculum_documents
from .data.tokenizer import load_tokenizer, train_bpe
from .evaluation.perplexity import EvalResult, evaluate
from .evaluation.recall import recall_accuracy
from .evaluation.report import describe, markdown_table, plot_loss_by_position
from .pretrained import MemorizingTransformer
from .training.trainer import TrainConfig, Trainer

# A model small enough to train in minutes on two CPU cores: 4 layers, memory in layer -2.
DEMO_MODEL: dict[str, Any] = dict(
    d_model=128,
    n_layers=4,
    n_heads=4,
    head_dim=32,
    d_ff=512,
    segment_length=128,
    xl_length=128,
    knn_layers=(-2,),
    memory_size=4096,
    knn_k=32,
)


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
    vocab_size: int
    steps: int
    batch_size: int
    max_documents: int | None  # per split; None: the whole split
    test_tokens: int | None  # None: whole test documents
    recall_steps: int
    recall_eval_documents: int


FULL = DemoScale(
    vocab_size=4096,
    steps=2500,
    batch_size=4,
    max_documents=None,
    test_tokens=None,
    recall_steps=2000,
    recall_eval_documents=64,
)
QUICK = DemoScale(
    vocab_size=512, steps=3, batch_size=2, max_documents=3, test_tokens=512, recall_steps=20, recall_eval_documents=8
)


def code_documents(scale: DemoScale, out: Path):
    """Tokenizer and train/test documents of the `code` corpus at this scale."""
    if scale.max_documents is None:
        tokenizer = load_tokenizer(str(corpus_tokenizer("code", scale.vocab_size)))
        return tokenizer, load_tokenized("code", "train", tokenizer), load_tokenized("code", "test", tokenizer)
    train = load_corpus("code", "train")[: scale.max_documents]
    test = load_corpus("code", "test")[: scale.max_documents]
    tokenizer = train_bpe((d.text for d in train), scale.vocab_size, out / "tokenizer")
    return tokenizer, tokenize_documents(train, tokenizer), tokenize_documents(test, tokenizer)


def train(
    label: str,
    config: MemorizingConfig,
    train_config: TrainConfig,
    train_docs: list[TokenizedDocument],
    run_dir: Path,
    tokenizer=None,
) -> tuple[MemorizingTransformer, float]:
    """Train (or finish training, resuming from the run's checkpoint) one model; returns it and the seconds spent."""
    torch.manual_seed(train_config.seed)
    model = MemorizingTransformer(config, tokenizer=tokenizer)
    trainer = Trainer(model, train_config, train_docs, None, run_dir)
    if trainer.resume():
        print(f"  {label}: resuming {run_dir} at step {trainer.step}")
    began = time.perf_counter()
    if trainer.step < train_config.steps:
        trainer.train(progress=True)
    return model, time.perf_counter() - began


def code_stage(scale: DemoScale, out: Path) -> tuple[list[dict[str, Any]], str, Path]:
    """Train the same small model with and without memory on the code corpus; evaluate on held-out packages."""
    print("-- the code corpus: the standard library, one document per package, split by document")
    tokenizer, train_docs, test_docs = code_documents(scale, out)
    print(
        f"   {len(train_docs)} training documents ({sum(d.ids.numel() for d in train_docs):,} tokens), "
        f"{len(test_docs)} test documents ({sum(d.ids.numel() for d in test_docs):,} tokens), BPE of "
        f"{len(tokenizer)} tokens"
    )
    base = MemorizingConfig.preset("small", **DEMO_MODEL, vocab_size=len(tokenizer))
    train_config = TrainConfig(
        steps=scale.steps,
        batch_size=scale.batch_size,
        lr=2e-3,
        warmup_steps=max(1, scale.steps // 10),
        eval_every=0,
        checkpoint_every=max(1, scale.steps // 4),
        log_every=max(1, scale.steps // 20),
    )
    results: dict[str, EvalResult] = {}
    rows = []
    for label, config in (("XL + kNN memory", base), ("XL only", dataclasses.replace(base, knn_layers=()))):
        slug = "memory" if config.knn_layers else "no-memory"
        model, train_seconds = train(label, config, train_config, train_docs, out / f"code-{slug}", tokenizer)
        began = time.perf_counter()
        results[label] = result = evaluate(model, test_docs, max_tokens=scale.test_tokens, progress=True)
        print(
            f"  {label}: test perplexity {result.perplexity:.2f} ({result.tokens:,} tokens), trained "
            f"{train_seconds:.0f} s"
        )
        rows.append(
            {
                "label": label,
                **describe(model),
                **result.to_dict(),
                "train_seconds": train_seconds,
                "eval_seconds": time.perf_counter() - began,
            }
        )
    plot = out / "code_loss_by_position.png"
    plot_loss_by_position(results, base.segment_length, plot, f"code corpus, test split, {scale.steps} training steps")
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


def run_demo(quick: bool = False, out_dir: Path = Path("runs/demo"), docs_dir: Path | None = None) -> dict[str, Any]:
    began = time.perf_counter()
    scale = QUICK if quick else FULL
    out = out_dir / ("quick" if quick else "full")
    print(f"== Memorizing Transformers demo ({'quick' if quick else 'full'}) -> {out}")
    recall_rows, recall_table = recall_stage(scale, out)
    code_rows, code_table, plot = code_stage(scale, out)
    report = {
        "command": "mt demo" + (" --quick" if quick else ""),
        "scale": dataclasses.asdict(scale),
        "recall": {"task": dataclasses.asdict(RECALL_TASK), "model": RECALL_MODEL, "results": recall_rows},
        "code": {"model": DEMO_MODEL, "results": code_rows},
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
    print(f"Code corpus, held-out documents, same seed and {scale.steps} steps each:")
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
        f"## Code corpus: held-out standard-library packages\n\n{code_table}\n\n![loss by position]({plot.name})\n"
    )
    write_atomically(docs_dir / "demo.md", lambda tmp: Path(tmp).write_text(text))
