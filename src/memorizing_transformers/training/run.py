"""`mt train` as a library call: a run described by a run configuration (preset, corpus,
vocab_size, tokenizer, model overrides, train settings), trained into its folder and
resumable there."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_atomically
from ..config import MemorizingConfig
from ..data.pipeline import corpus_tokenizer, load_tokenized
from ..data.tokenizer import load_tokenizer
from ..pretrained import MemorizingTransformer
from . import distributed
from .checkpoint import run_lock
from .trainer import TrainConfig, Trainer


def train_run(
    run: dict[str, Any],
    out: str | Path,
    resume: bool = False,
    device: torch.device | str = "cpu",
    max_seconds: float | None = None,
) -> dict[str, Any] | None:
    """Train the run `run` describes into `out` (locked against a second process), from its
    last checkpoint with `resume`; returns the training record. A folder that holds another
    run is refused. Under torchrun, every process trains its rows of the batch (see
    training/distributed.py); rank 0 alone writes and returns the record (None on the others),
    and every process leaves the process group when the run is done."""
    device = distributed.start_from_environment(torch.device(device))
    main = distributed.is_main()
    record = _train_in(run, Path(out), resume, device, max_seconds)
    distributed.stop()
    return record if main else None


def _train_in(
    run: dict[str, Any], out: Path, resume: bool, device: torch.device, max_seconds: float | None
) -> dict[str, Any]:
    main = distributed.is_main()
    with distributed.main_only(run_lock(out)):
        saved_run = out / "run_config.json"
        if resume and saved_run.is_file():
            previous = json.loads(saved_run.read_text())
            if {k: v for k, v in previous.items() if k != "train"} != {k: v for k, v in run.items() if k != "train"}:
                raise ValueError(f"--resume: {saved_run} describes another model or corpus than these flags")
        elif saved_run.is_file() and not resume:
            raise ValueError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        if not main:  # rank 0 trains the tokenizer and tokenizes the corpus once; the others then read them
            distributed.barrier()
        tokenizer = load_tokenizer(run["tokenizer"] or str(corpus_tokenizer(run["corpus"], run["vocab_size"])))
        config = MemorizingConfig.preset(run["preset"], **{**run["model"], "vocab_size": len(tokenizer)})
        train_config = TrainConfig(**run["train"], extra={"corpus": run["corpus"], "preset": run["preset"]})
        train_docs = load_tokenized(run["corpus"], "train", tokenizer)
        valid_docs = load_tokenized(run["corpus"], "valid", tokenizer)
        if main:
            distributed.barrier()
        torch.manual_seed(train_config.seed)
        model = MemorizingTransformer(config, tokenizer=tokenizer).to(device)
        trainer = Trainer(model, train_config, train_docs, valid_docs, out)
        if resume and not trainer.resume() and main:
            print(f"no checkpoint in {out}: starting from step 0", file=sys.stderr)
        if main:
            write_atomically(saved_run, lambda tmp: Path(tmp).write_text(json.dumps(run, indent=2)))
            params = sum(p.numel() for p in model.parameters())
            world = distributed.rank_and_world()[1]
            print(
                f"training {params / 1e6:.2f}M parameters on {run['corpus']} "
                f"({sum(d.ids.numel() for d in train_docs):,} tokens) into {out}"
                + (f", {world} processes" if world > 1 else "")
            )
        return trainer.train(max_seconds=max_seconds)
