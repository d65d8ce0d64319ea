"""`mt demo`: train the same small model with and without a kNN memory on the embedded
data (the Python standard library as a corpus of long documents), evaluate both on
held-out documents, and print the comparison."""

from __future__ import annotations

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
from .data.tokenizer import load_tokenizer, train_bpe
from .evaluation.perplexity import EvalResult, evaluate
from .evaluation.report import markdown_table, plot_loss_by_position
from .model.transformer import MemorizingTransformer
from .training.trainer import TrainConfig, Trainer

# A model small enough to train in minutes on two CPU cores: 4 layers, memory in layer -2.
DEMO_MODEL: dict[str, Any] = dict(
    d_model=128, n_layers=4, n_heads=4, head_dim=32, d_ff=512,
    segment_length=128, xl_length=128, knn_layers=(-2,), memory_size=4096, knn_k=32,
)


@dataclass
class DemoScale:
    vocab_size: int
    steps: int
    batch_size: int
    max_documents: int | None  # per split; None: the whole split
    test_tokens: int | None  # None: whole test documents


FULL = DemoScale(vocab_size=4096, steps=600, batch_size=4, max_documents=None, test_tokens=None)
QUICK = DemoScale(vocab_size=512, steps=3, batch_size=2, max_documents=3, test_tokens=512)


def code_documents(scale: DemoScale, out: Path):
    """Tokenizer and train/test documents of the `code` corpus at this scale."""
    if scale.max_documents is None:
        tokenizer = load_tokenizer(str(corpus_tokenizer("code", scale.vocab_size)))
        return tokenizer, load_tokenized("code", "train", tokenizer), load_tokenized("code", "test", tokenizer)
    train = load_corpus("code", "train")[: scale.max_documents]
    test = load_corpus("code", "test")[: scale.max_documents]
    tokenizer = train_bpe((d.text for d in train), scale.vocab_size, out / "tokenizer")
    return tokenizer, tokenize_documents(train, tokenizer), tokenize_documents(test, tokenizer)


def train_and_evaluate(label: str, config: MemorizingConfig, tokenizer, train_docs, test_docs, scale: DemoScale, run_dir: Path) -> tuple[EvalResult, dict]:
    torch.manual_seed(0)
    model = MemorizingTransformer(config, tokenizer=tokenizer)
    trainer = Trainer(
        model,
        TrainConfig(steps=scale.steps, batch_size=scale.batch_size, lr=2e-3, warmup_steps=max(1, scale.steps // 10),
                    eval_every=0, checkpoint_every=max(1, scale.steps // 4), log_every=max(1, scale.steps // 20)),
        train_docs, None, run_dir,
    )
    if trainer.resume():
        print(f"  {label}: resuming {run_dir} at step {trainer.step}")
    began = time.perf_counter()
    record = trainer.train(progress=True) if trainer.step < scale.steps else {}
    train_seconds = time.perf_counter() - began
    began = time.perf_counter()
    result = evaluate(model, test_docs, max_tokens=scale.test_tokens, progress=True)
    info = {"train_seconds": train_seconds, "eval_seconds": time.perf_counter() - began, "final_train_loss": record.get("loss")}
    print(f"  {label}: test perplexity {result.perplexity:.2f} ({result.tokens:,} tokens), trained {train_seconds:.0f} s")
    return result, info


def run_demo(quick: bool = False, out_dir: Path = Path("runs/demo"), docs_dir: Path | None = None) -> dict[str, Any]:
    scale = QUICK if quick else FULL
    out = out_dir / ("quick" if quick else "full")
    print(f"== Memorizing Transformers demo ({'quick' if quick else 'full'}) -> {out}")
    print("-- the code corpus: the standard library, one document per package, split by document")
    tokenizer, train_docs, test_docs = code_documents(scale, out)
    print(f"   {len(train_docs)} training documents ({sum(d.ids.numel() for d in train_docs):,} tokens), "
          f"{len(test_docs)} test documents ({sum(d.ids.numel() for d in test_docs):,} tokens), BPE of {len(tokenizer)} tokens")
    base = MemorizingConfig.preset("small", **DEMO_MODEL, vocab_size=len(tokenizer))
    variants = {
        "XL + kNN memory": base,
        "XL only": MemorizingConfig.from_dict({**base.to_dict(), "knn_layers": ()}),
    }
    results: dict[str, EvalResult] = {}
    rows = []
    for label, config in variants.items():
        slug = "memory" if config.knn_layers else "no-memory"
        result, info = train_and_evaluate(label, config, tokenizer, train_docs, test_docs, scale, out / f"code-{slug}")
        results[label] = result
        rows.append({"label": label, "memory_size": config.memory_size if config.knn_layers else 0,
                     "knn_k": config.knn_k if config.knn_layers else 0, "xl_length": config.xl_length,
                     "segment_length": config.segment_length, **result.to_dict(), **info})
    table = markdown_table(rows)
    plot = out / "code_loss_by_position.png"
    plot_loss_by_position(results, base.segment_length, plot, f"code corpus, test split, {scale.steps} training steps")
    report = {
        "command": "mt demo" + (" --quick" if quick else ""),
        "scale": scale.__dict__,
        "model": base.to_dict(),
        "code": rows,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    write_atomically(out / "demo.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    print()
    print(f"Code corpus, held-out documents, same seed and {scale.steps} steps each:")
    print(table)
    print(f"\nplot: {plot}\nresults: {out / 'demo.json'}")
    if docs_dir is not None:
        publish(report, table, plot, docs_dir)
    return report


def publish(report: dict[str, Any], table: str, plot: Path, docs_dir: Path) -> None:
    """Copy the results into the documentation folder, with the command that made them."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(docs_dir / "demo.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    write_atomically(docs_dir / plot.name, lambda tmp: Path(tmp).write_bytes(plot.read_bytes()))
    text = (
        f"# Demo results\n\nMade by `{report['command']} --docs {docs_dir}` "
        f"({report['machine']['platform']}, torch {report['machine']['torch']}, {report['machine']['threads']} threads).\n\n"
        f"## Code corpus: held-out standard-library packages\n\n{table}\n\n![loss by position]({plot.name})\n"
    )
    write_atomically(docs_dir / "demo.md", lambda tmp: Path(tmp).write_text(text))
