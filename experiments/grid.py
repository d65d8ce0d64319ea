"""Run a named grid of training runs to their token budgets, resumably, and tabulate them.

    python experiments/grid.py table4-code                 # run (or go on with) every run of the grid
    python experiments/grid.py table4-code --max-minutes 90 --threads 1
    python experiments/grid.py table4-code --summarize     # only the table and plot, from the JSON
    python experiments/grid.py layer1-pycode-2048 questions-pycode-2048   # one grid after the other
    python experiments/grid.py --list                      # the grids and their runs

Each run trains through the library's `Trainer` (checkpoints every few minutes, in
runs/grids/GRID/RUN), then is evaluated on the corpus's test split, whole documents,
with its memory and with the memory switched off; the result (settings, device, threads,
wall time, tokens, test perplexity, loss by position) goes to
experiments/results/grids/GRID/RUN.json, and the final weights of a run that others start
from go beside it (RUN-weights/, a few MB at these sizes), so that its fine-tunes can be
run on another machine without the long pre-training. A run whose JSON exists is skipped; an
unfinished one resumes from its newest checkpoint, so a grid of many hours completes
over several invocations, interrupted or not. A run can start from another run's final
weights (`init_from`: the paper's way to many rows at the cost of one long pre-training;
memory gates, which the source lacks, start at their initial value). Rows are matched in
training tokens; each row also reports its training seconds, so compute-matched rows can
be read from the same table. `--summarize` (and every invocation) writes GRID.md and
GRID.png beside the JSON files.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import multiprocessing
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memorizing_transformers.atomic import write_atomically
from memorizing_transformers.config import MemorizingConfig
from memorizing_transformers.data.pipeline import corpus_tokenizer, load_tokenized, tokenizer_fingerprint
from memorizing_transformers.data.streaming import TokenizedDocument
from memorizing_transformers.data.tokenizer import load_tokenizer
from memorizing_transformers.devices import keep_freed_host_memory
from memorizing_transformers.evaluation.peak_memory import PeakMemory
from memorizing_transformers.evaluation.perplexity import EvalResult, evaluate
from memorizing_transformers.evaluation.report import forward_flops_per_token, plot_loss_by_position
from memorizing_transformers.evaluation.token_gain import gain_tables, plot_gain, token_gain
from memorizing_transformers.pretrained import MemorizingTransformer
from memorizing_transformers.runs import resolve_model_dir
from memorizing_transformers.training.trainer import TrainConfig, Trainer

RESULTS = Path(__file__).resolve().parent / "results" / "grids"


@dataclass(frozen=True)
class Run:
    """One row: a model (overrides of the grid's base) trained on `tokens` tokens."""

    name: str
    label: str
    model: dict[str, Any]
    tokens: int
    seed: int = 0
    init_from: str | None = None  # a run whose final weights start this one: RUN of this grid, or GRID/RUN
    lr: float = 2e-3
    warmup_fraction: float = 0.1
    eval_memory_sizes: tuple[int, ...] = ()  # also evaluate with these memory sizes (no fine-tune)
    batch_size: int | None = None  # rows read per step; None: the grid's


@dataclass(frozen=True)
class Grid:
    name: str
    description: str
    corpus: str
    vocab_size: int
    base: dict[str, Any]  # MemorizingConfig fields shared by every run
    runs: tuple[Run, ...]
    batch_size: int = 4
    eval_tokens: int | None = None  # None: whole test documents
    document_tokens: int | None = None  # cut every document into pieces of at most this many tokens (short documents)
    # GRID/RUN: read the corpus through the tokenizer kept with that run's committed weights instead of
    # one trained on the corpus now. For a corpus that moves (pycode follows the installed packages'
    # versions): the grid's rows are then compared with each other only, never with older grids'.
    tokenizer_from: str | None = None

    def run(self, name: str) -> Run:
        for run in self.runs:
            if run.name == name:
                return run
        raise KeyError(f"grid {self.name} has no run {name!r}; its runs: {[r.name for r in self.runs]}")


# A model small enough for many runs on two CPU cores (the demo's), with what the recall
# work taught: a previous-token prior in layer 0, the memory gate starting nearly shut,
# the memory in the layer below the top.
SMALL = dict(
    d_model=128,
    n_layers=4,
    n_heads=4,
    head_dim=32,
    d_ff=512,
    segment_length=128,
    previous_token_bias_init=5.0,
    memory_gate_init=-3.0,
    knn_layers=(-2,),
    knn_k=32,
)
NO_MEMORY = dict(knn_layers=())


def fine_tune(source: str, name: str, label: str, model: dict[str, Any], tokens: int, **kw: Any) -> Run:
    """A run of `tokens` tokens from the final weights of `source` (RUN of the same grid, or GRID/RUN),
    at the learning rate of every fine-tune here."""
    return Run(name, label, model, tokens, init_from=source, lr=1e-3, **kw)


def at_tokens_per_step(runs: list[Run], tokens_per_step: int | None) -> tuple[Run, ...]:
    """The runs, each reading `tokens_per_step` tokens a step (its batch: that over its segment
    length); unchanged (the grid's batch) when None."""
    if tokens_per_step is None:
        return tuple(runs)
    batch = lambda run: tokens_per_step // {**SMALL, **run.model}["segment_length"]  # noqa: E731
    return tuple(dataclasses.replace(run, batch_size=batch(run)) for run in runs)


def table4(
    corpus: str,
    pretrain_tokens: int,
    finetune_tokens: int,
    eval_tokens: int | None = None,
    tokens_per_step: int | None = None,
) -> Grid:
    """The paper's Table 4 in kind: one vanilla pre-training, then every row fine-tuned from it
    for the same number of tokens (context L = 128: L alone, 4L alone, L + XL, L + memory 8K,
    L + memory 8K + XL, L + memory 64K + XL; two seeds of the XL and memory + XL rows; and the
    memory + XL row with the joint softmax instead of the paper's gate). With `tokens_per_step`,
    every run reads that many tokens a step (its batch: tokens_per_step / its segment length),
    and the grid is named table4-CORPUS-TOKENS; without, every run reads 4 segments a step."""
    L = SMALL["segment_length"]
    rows = [
        ("L", f"context {L}", dict(NO_MEMORY, xl_length=0), (0,)),
        ("4L", f"context {4 * L}", dict(NO_MEMORY, xl_length=0, segment_length=4 * L), (0,)),
        ("L-xl", f"context {L} + XL {L}", dict(NO_MEMORY, xl_length=L), (0, 1)),
        ("L-mem8k", f"context {L} + memory 8K", dict(xl_length=0, memory_size=8192), (0,)),
        ("L-mem8k-xl", f"context {L} + memory 8K + XL {L}", dict(xl_length=L, memory_size=8192), (0, 1)),
        (
            "L-mem8k-xl-joint",
            f"context {L} + memory 8K + XL {L}, one softmax over local and retrieved entries",
            dict(xl_length=L, memory_size=8192, memory_combine="joint"),
            (0,),
        ),
        (
            "L-mem64k-xl",
            f"context {L} + memory 64K + XL {L}",
            dict(xl_length=L, memory_size=65536, memory_backend="faiss_ivf"),
            (0,),
        ),
    ]
    runs = [Run("pretrain", f"vanilla pre-training, context {L}", dict(NO_MEMORY, xl_length=0), pretrain_tokens)]
    for name, label, model, seeds in rows:
        for seed in seeds:
            runs.append(fine_tune("pretrain", f"{name}-s{seed}", label, model, finetune_tokens, seed=seed))
    # The paper's Table 5 in kind: trained with a 2K memory, evaluated with larger ones as they are,
    # then briefly fine-tuned with the largest.
    sizes = (2048, 8192, 32768, 131072)
    runs.append(
        fine_tune(
            "pretrain",
            "L-mem2k-xl-s0",
            f"context {L} + memory 2K + XL {L}",
            dict(xl_length=L, memory_size=2048),
            finetune_tokens,
            eval_memory_sizes=sizes[1:],
        )
    )
    runs.append(
        Run(
            "L-mem2k-xl-ft128k",
            "the 2K-memory model fine-tuned with memory 128K",
            dict(xl_length=L, memory_size=131072, memory_backend="faiss_ivf"),
            finetune_tokens // 10,
            init_from="L-mem2k-xl-s0",
            lr=5e-4,
        )
    )
    scored = "whole test documents" if eval_tokens is None else f"the first {eval_tokens:,} test tokens"
    steps = f", {tokens_per_step:,} tokens a step" if tokens_per_step else ""
    return Grid(
        f"table4-{corpus}" + (f"-{tokens_per_step}" if tokens_per_step else ""),
        f"Table 4 in kind on `{corpus}`: {pretrain_tokens:,} tokens of vanilla pre-training, "
        f"then each row fine-tuned from it for {finetune_tokens:,} tokens{steps}; {scored} scored",
        corpus,
        4096,
        SMALL,
        at_tokens_per_step(runs, tokens_per_step),
        eval_tokens=eval_tokens,
    )


def questions(
    corpus: str,
    finetune_tokens: int,
    eval_tokens: int | None,
    tokens_per_step: int | None = None,
    memory_layer: int | None = None,
) -> list[Grid]:
    """The three questions of the project, as fine-tunes of the same pre-training as table4-CORPUS
    (whose XL and memory rows they are read against): (a) other long-range approaches, (b) a
    wider window instead of a memory, (c) short documents. With `tokens_per_step`, against
    table4-CORPUS-TOKENS, every run reading that many tokens a step. With `memory_layer`, for a
    corpus that has moved since table4-CORPUS ran (pycode): read through the pre-training's
    tokenizer, with contexts L and 4L of their own, the short documents' memory in that layer with the
    gate starting at 0.5 (as layerN-CORPUS's memory rows), and read against the rows of layers-CORPUS and
    layerN-CORPUS (experiments/grid.py `in_layer`)."""
    suffix = f"-{tokens_per_step}" if tokens_per_step else ""
    L, source = SMALL["segment_length"], f"table4-{corpus}{suffix}/pretrain"
    moved = memory_layer is not None
    other = [
        (
            "window512",
            f"context {L}, sliding window 512 over an XL cache of 512",
            dict(NO_MEMORY, xl_length=512, attention_window=512),
        ),
        (
            "window512-g8",
            f"context {L}, sliding window 512 + the document's first 8 tokens (global, Longformer-style)",
            dict(NO_MEMORY, xl_length=512, attention_window=512, global_tokens=8),
        ),
        (
            "linformer64",
            f"context {L}, XL cache of 512 compressed to 64 slots (causal Linformer)",
            dict(NO_MEMORY, xl_length=512, xl_compression=64),
        ),
        ("2L", f"context {2 * L}", dict(NO_MEMORY, xl_length=0, segment_length=2 * L)),
        ("2L-xl", f"context {2 * L} + XL {2 * L}", dict(NO_MEMORY, xl_length=2 * L, segment_length=2 * L)),
    ]
    short = [
        ("short-xl", f"context {L} + XL {L}", dict(NO_MEMORY, xl_length=L)),
        (
            "short-mem8k-xl",
            f"context {L} + memory 8K + XL {L}"
            + (f", the memory in layer {memory_layer}, gate starting at 0.5" if moved else ""),
            dict(
                xl_length=L,
                memory_size=8192,
                **(dict(knn_layers=(memory_layer,), memory_gate_init=0.0) if moved else {}),
            ),
        ),
    ]
    if moved:  # table4-CORPUS's context-alone rows read the corpus as it was: these read it as it is
        other += [
            ("L", f"context {L}", dict(NO_MEMORY, xl_length=0)),
            ("4L", f"context {4 * L}", dict(NO_MEMORY, xl_length=0, segment_length=4 * L)),
        ]
    make = lambda rows: at_tokens_per_step(  # noqa: E731
        [fine_tune(source, name, label, model, finetune_tokens) for name, label, model in rows],
        tokens_per_step,
    )
    return [
        Grid(
            f"questions-{corpus}{suffix}",
            f"Other long-range approaches and wider windows on `{corpus}`, fine-tuned for "
            f"{finetune_tokens:,} tokens from the pre-training of table4-{corpus}{suffix} "
            + (
                f"through its tokenizer (read against layers-{corpus}{suffix}'s XL and layer-{memory_layer} rows)"
                if moved
                else "(read against its XL and memory rows)"
            ),
            corpus,
            4096,
            SMALL,
            make(other),
            eval_tokens=eval_tokens,
            tokenizer_from=source if moved else None,
        ),
        Grid(
            f"short-{corpus}{suffix}",
            f"Short documents: `{corpus}` cut into pieces of {2 * L} tokens (two segments), "
            f"fine-tuned for {finetune_tokens:,} tokens from the pre-training of table4-{corpus}{suffix}",
            corpus,
            4096,
            SMALL,
            make(short),
            eval_tokens=eval_tokens,
            document_tokens=2 * L,
            tokenizer_from=source if moved else None,
        ),
    ]


def layers(
    corpus: str, finetune_tokens: int, eval_tokens: int | None, tokens_per_step: int | None = None, moved: bool = False
) -> Grid:
    """Memory 8K + XL in another layer than table4's (layer 2 of 4), fine-tuned like table4-CORPUS's
    rows from its pre-training, on the seed of its `-s0` rows (read against its L-xl-s0 and
    L-mem8k-xl-s0): where experiments/retrieval_hits.py finds the pre-training's search most selective.
    `moved`: the corpus has changed since table4-CORPUS ran (pycode): the grid reads it through the
    pre-training's tokenizer and runs its own XL and layer-2 rows to compare with."""
    suffix = f"-{tokens_per_step}" if tokens_per_step else ""
    L, source = SMALL["segment_length"], f"table4-{corpus}{suffix}/pretrain"
    xl = fine_tune(source, "L-xl-s0", f"context {L} + XL {L}", dict(NO_MEMORY, xl_length=L), finetune_tokens)
    runs = [xl] if moved else []
    runs += [
        fine_tune(
            source,
            f"L-mem8k-xl-layer{layer}-s0",
            f"context {L} + memory 8K + XL {L}, the memory in layer {layer}",
            dict(xl_length=L, memory_size=8192, knn_layers=(layer,)),
            finetune_tokens,
        )
        for layer in ((1, 2, 3) if moved else (1, 3))
    ]
    if moved:  # the layer that pays, and XL alone, on a second seed
        runs.append(dataclasses.replace(runs[1], name="L-mem8k-xl-layer1-s1", seed=1))
        runs.append(dataclasses.replace(xl, name="L-xl-s1", seed=1))
    # The gate starting at 0.5, which pays in pycode's layer 1 (layer1-pycode-2048 has that row): in
    # layer 2, and, where this grid has no layer1-CORPUS, in layer 1 too.
    for layer in (2,) if moved else (1, 2):
        runs.append(
            fine_tune(
                source,
                f"L-mem8k-xl-layer{layer}-gate0-s0",
                f"context {L} + memory 8K + XL {L}, the memory in layer {layer}, gate starting at 0.5",
                dict(xl_length=L, memory_size=8192, knn_layers=(layer,), memory_gate_init=0.0),
                finetune_tokens,
            )
        )
    return Grid(
        f"layers-{corpus}{suffix}",
        f"The memory in layer {'1, 2 or 3' if moved else '1 or 3 instead of 2'}, fine-tuned for "
        f"{finetune_tokens:,} tokens from the "
        f"pre-training of table4-{corpus}{suffix} "
        + (
            "through its tokenizer (the corpus has moved since), beside XL and layer-2 rows of its own"
            if moved
            else "(read against its L-xl-s0 and L-mem8k-xl-s0)"
        ),
        corpus,
        4096,
        SMALL,
        at_tokens_per_step(runs, tokens_per_step),
        eval_tokens=eval_tokens,
        tokenizer_from=source if moved else None,
    )


def in_layer(
    corpus: str,
    layer: int,
    budgets: tuple[int, ...],
    finetune_tokens: int,
    scratch_tokens: int,
    eval_tokens: int | None,
    tokens_per_step: int | None = None,
    references: str | None = None,
) -> Grid:
    """Table 4's memory rows and the budget curve with the memory in `layer`, where
    experiments/retrieval_hits.py finds the pre-training's search selective (layers-CORPUS found it
    paying there at `finetune_tokens`; its L-xl and L-mem8k-xl-layerN rows are this grid's middle point
    and references; `references`: another grid's, named), and a memory model trained from scratch for
    `scratch_tokens`. Fine-tuned from table4-CORPUS's pre-training through its tokenizer, like
    layers-CORPUS for a corpus that has moved.
    The budget curve ran first with the grids' gate starting nearly shut; the gate starting at 0.5
    paid in this layer over two seeds (L-mem8k-xl-gate0-s0/s1), so every row after them starts there,
    the curve's memory runs too. The longest runs come last."""
    suffix = f"-{tokens_per_step}" if tokens_per_step else ""
    L, source = SMALL["segment_length"], f"table4-{corpus}{suffix}/pretrain"
    here, memory = f", the memory in layer {layer}", dict(knn_layers=(layer,))
    gate0, open_gate = dict(memory_gate_init=0.0), ", gate starting at 0.5"
    tune = functools.partial(fine_tune, source)
    xl = lambda tokens: tune(  # noqa: E731
        f"L-xl-{tokens // 1000}k", f"context {L} + XL {L}", dict(NO_MEMORY, xl_length=L), tokens
    )
    mem = lambda tokens, gate="", **model: tune(  # noqa: E731
        f"L-mem8k-xl-{gate}{tokens // 1000}k",
        f"context {L} + memory 8K + XL {L}{here}" + (open_gate if gate else ""),
        dict(memory, xl_length=L, memory_size=8192, **model),
        tokens,
    )
    rows = [
        (
            "L-mem8k-xl-gate0-s0",
            f"context {L} + memory 8K + XL {L}{here}{open_gate}",
            dict(memory, xl_length=L, memory_size=8192, **gate0),
        ),
        (
            "L-mem8k-gate0-s0",
            f"context {L} + memory 8K{here}{open_gate}",
            dict(memory, xl_length=0, memory_size=8192, **gate0),
        ),
        (  # the joint softmax has no gate: its gate setting, made with the rows around it, does nothing
            "L-mem8k-xl-joint-gate0-s0",
            f"context {L} + memory 8K + XL {L}{here}, one softmax over local and retrieved entries (no gate)",
            dict(memory, xl_length=L, memory_size=8192, memory_combine="joint", **gate0),
        ),
        (
            "L-mem64k-xl-gate0-s0",
            f"context {L} + memory 64K + XL {L}{here}{open_gate}",
            dict(memory, xl_length=L, memory_size=65536, memory_backend="faiss_ivf", **gate0),
        ),
    ]
    # The pre-training's weights on the corpus as it is now (0 tokens: evaluated as they are), where a
    # fine-tune into memory starts (fine_tune_into_memory in experiments/tables.py).
    runs = [
        Run("pretrain-as-is", "vanilla pre-training, not fine-tuned", dict(NO_MEMORY, xl_length=0), 0, init_from=source)
    ]
    runs += [run for tokens in budgets for run in (xl(tokens), mem(tokens))]
    first, *others = [tune(name, label, model, finetune_tokens) for name, label, model in rows]
    runs += [first, dataclasses.replace(first, name="L-mem8k-xl-gate0-s1", seed=1), *others]
    runs += [mem(tokens, "gate0-", **gate0) for tokens in budgets[:-1]]
    # The paper's Table 5 in kind: trained with a 2K memory, tested with larger ones as they are.
    runs.append(
        tune(
            "L-mem2k-xl-gate0-s0",
            f"context {L} + memory 2K + XL {L}{here}{open_gate}",
            dict(memory, xl_length=L, memory_size=2048, **gate0),
            finetune_tokens,
            eval_memory_sizes=(8192, 32768, 131072),
        )
    )
    # ... then fine-tuned briefly with the largest, as table4's L-mem2k-xl-ft128k.
    runs.append(
        Run(
            "L-mem2k-xl-gate0-ft128k",
            "the 2K-memory model fine-tuned with memory 128K",
            dict(memory, xl_length=L, memory_size=131072, memory_backend="faiss_ivf", **gate0),
            finetune_tokens // 10,
            init_from="L-mem2k-xl-gate0-s0",
            lr=5e-4,
        )
    )
    # The same fine-tune at the rate its source ended at (1e-3 decayed to 1e-4) and with exact search, as
    # the rows tested with larger memories as they are read theirs: only the weight updates differ from them.
    runs.append(
        Run(
            "L-mem2k-xl-gate0-ft128k-exact-lr1e-4",
            "the 2K-memory model fine-tuned with memory 128K (exact) at its final learning rate",
            dict(memory, xl_length=L, memory_size=131072, **gate0),
            finetune_tokens // 10,
            init_from="L-mem2k-xl-gate0-s0",
            lr=1e-4,
        )
    )
    runs += [mem(tokens, "gate0-", **gate0) for tokens in budgets[-1:]]
    # The memory model trained from scratch as long as the pre-training: the share of the gap to it that
    # a fine-tune closes, against the fine-tune's length (the paper: 85% in 4% of the steps).
    runs.append(
        Run(
            "scratch-mem8k-xl-gate0",
            f"context {L} + memory 8K + XL {L}{here}{open_gate}, from scratch",
            dict(memory, xl_length=L, memory_size=8192, **gate0),
            scratch_tokens,
        )
    )
    return Grid(
        f"layer{layer}-{corpus}{suffix}",
        "Table 4's memory rows"
        + (f" and the budget curve ({', '.join(f'{t:,}' for t in budgets)} tokens)" if budgets else "")
        + f" with the memory in layer {layer}, fine-tuned from the pre-training of table4-{corpus}{suffix} through its "
        f"tokenizer; read with {references or f'layers-{corpus}{suffix}'}'s {finetune_tokens:,}-token rows",
        corpus,
        4096,
        SMALL,
        at_tokens_per_step(runs, tokens_per_step),
        eval_tokens=eval_tokens,
        tokenizer_from=source,
    )


def budgets(
    corpus: str,
    tokens: tuple[int, ...],
    scratch_tokens: int,
    eval_tokens: int | None,
    tokens_per_step: int | None = None,
) -> Grid:
    """How the memory's gain grows with training (fine-tunes of table4-CORPUS's pre-training of
    several lengths, XL alone and memory 8K + XL; table4's rows are the longest), and a memory
    model trained from scratch as long as the pre-training: the share of the gap to it that a
    fine-tune closes, against its length (the paper: 85% in 4% of the steps). With
    `tokens_per_step`, from table4-CORPUS-TOKENS, every run reading that many tokens a step."""
    suffix = f"-{tokens_per_step}" if tokens_per_step else ""
    L, source = SMALL["segment_length"], f"table4-{corpus}{suffix}/pretrain"
    runs = []
    for budget in tokens:
        runs.append(
            fine_tune(source, f"L-xl-{budget // 1000}k", f"context {L} + XL {L}", dict(NO_MEMORY, xl_length=L), budget)
        )
        runs.append(
            fine_tune(
                source,
                f"L-mem8k-xl-{budget // 1000}k",
                f"context {L} + memory 8K + XL {L}",
                dict(xl_length=L, memory_size=8192),
                budget,
            )
        )
    # Ways a fine-tune might put its memory to use sooner, at the middle budget: the gate
    # starting half open (the paper's init; the local circuits exist already, so the reason to
    # start it shut when training from scratch is gone); the joint softmax (no gate); and a
    # memory temperature of its own, starting at 30 where the layer's is about 5 (the readout
    # over 32 retrieved entries is then no longer a near-uniform average: a lead of 0.1 in
    # cosine similarity gives the best entry about 40% of the weight), with either gate start.
    middle = tokens[len(tokens) // 2]
    for name, label, model in (
        ("gate0", "gate starting at 0.5", dict(memory_gate_init=0.0)),
        ("joint", "one softmax over local and retrieved entries", dict(memory_combine="joint")),
        ("sharp", "memory temperature of its own from 30", dict(memory_qk_scale_init=30.0)),
        (
            "sharp-gate0",
            "memory temperature from 30, gate from 0.5",
            dict(memory_qk_scale_init=30.0, memory_gate_init=0.0),
        ),
    ):
        runs.append(
            fine_tune(
                source,
                f"L-mem8k-xl-{name}-{middle // 1000}k",
                f"context {L} + memory 8K + XL {L}, {label}",
                dict(xl_length=L, memory_size=8192, **model),
                middle,
            )
        )
    runs.append(
        Run(
            "scratch-mem8k-xl",
            f"context {L} + memory 8K + XL {L}, from scratch",
            dict(xl_length=L, memory_size=8192),
            scratch_tokens,
        )
    )
    return Grid(
        f"budgets-{corpus}{suffix}",
        f"The memory's gain against training tokens on `{corpus}`: fine-tunes of "
        f"{', '.join(f'{t:,}' for t in tokens)} tokens from table4-{corpus}{suffix}'s pre-training, and a memory "
        f"model trained from scratch for {scratch_tokens:,} tokens",
        corpus,
        4096,
        SMALL,
        at_tokens_per_step(runs, tokens_per_step),
        eval_tokens=eval_tokens,
    )


def batch16(corpus: str, finetune_tokens: int, eval_tokens: int | None) -> Grid:
    """table4's XL and memory rows read four times the tokens per step (16 x 128, as 4L reads
    4 x 512), fine-tuned for the same tokens from the same pre-training: whether what separates
    4L from L + XL there is the wider window or the less noisy steps."""
    L, source = SMALL["segment_length"], f"table4-{corpus}/pretrain"
    rows = [
        ("L-xl", f"context {L} + XL {L}", dict(NO_MEMORY, xl_length=L)),
        ("L-mem8k-xl", f"context {L} + memory 8K + XL {L}", dict(xl_length=L, memory_size=8192)),
        ("L", f"context {L}", dict(NO_MEMORY, xl_length=0)),
        (
            "L-mem8k-xl-sharp",
            f"context {L} + memory 8K + XL {L}, memory temperature of its own from 30",
            dict(xl_length=L, memory_size=8192, memory_qk_scale_init=30.0),
        ),
        (
            "L-mem8k-xl-joint-evicted",
            f"context {L} + memory 8K of what leaves XL {L}, one softmax over local and retrieved entries",
            dict(xl_length=L, memory_size=8192, memory_combine="joint", memory_writes="evicted"),
        ),
    ]
    return Grid(
        f"batch16-{corpus}",
        f"Rows of table4-{corpus} with batches of 16 x {L} tokens (4L's tokens per step), fine-tuned for "
        f"{finetune_tokens:,} tokens from its pre-training",
        corpus,
        4096,
        SMALL,
        tuple(fine_tune(source, name, label, model, finetune_tokens) for name, label, model in rows),
        batch_size=16,
        eval_tokens=eval_tokens,
    )


GRIDS = {
    grid.name: grid
    for grid in (
        table4("pycode", pretrain_tokens=20_000_000, finetune_tokens=2_000_000, eval_tokens=200_000),
        table4(
            "pycode", pretrain_tokens=20_000_000, finetune_tokens=2_000_000, eval_tokens=200_000, tokens_per_step=2048
        ),
        *questions("pycode", finetune_tokens=2_000_000, eval_tokens=200_000),
        *questions("pycode", finetune_tokens=2_000_000, eval_tokens=200_000, tokens_per_step=2048, memory_layer=1),
        batch16("pycode", finetune_tokens=2_000_000, eval_tokens=200_000),
        budgets("pycode", tokens=(250_000, 500_000, 1_000_000), scratch_tokens=20_000_000, eval_tokens=200_000),
        table4("proofs", pretrain_tokens=8_000_000, finetune_tokens=1_000_000),
        # pycode's pre-training at 2,048 tokens a step grew a layer whose search finds continuations
        # (experiments/retrieval_hits.py); proofs' at 512 a step grew none: the same recipe on proofs.
        table4("proofs", pretrain_tokens=20_000_000, finetune_tokens=2_000_000, tokens_per_step=2048),
        *questions("proofs", finetune_tokens=1_000_000, eval_tokens=None),
        layers("proofs", finetune_tokens=1_000_000, eval_tokens=None),
        layers("pycode", finetune_tokens=2_000_000, eval_tokens=200_000, tokens_per_step=2048, moved=True),
        in_layer(
            "pycode",
            1,
            budgets=(500_000, 1_000_000, 4_000_000, 8_000_000),
            finetune_tokens=2_000_000,
            scratch_tokens=20_000_000,
            eval_tokens=200_000,
            tokens_per_step=2048,
        ),
        # proofs' pre-training at 2,048 tokens a step grew a layer-1 head whose search finds continuations
        # (68% of queries against 15% by chance, experiments/retrieval_hits.py): the gate-0.5 rows there,
        # read against table4-proofs-2048's XL rows (L-xl-s0/s1); no budget curve.
        in_layer(
            "proofs",
            1,
            budgets=(),
            finetune_tokens=2_000_000,
            scratch_tokens=20_000_000,
            eval_tokens=None,
            tokens_per_step=2048,
            references="table4-proofs-2048",
        ),
        table4("books", pretrain_tokens=8_000_000, finetune_tokens=1_000_000),
        Grid(
            "quick",
            "a smoke test of the runner: a pre-training and two fine-tunes of a few steps",
            "code",
            512,
            dict(SMALL, d_model=32, n_layers=2, n_heads=2, head_dim=16, d_ff=64, segment_length=32, memory_size=256),
            (
                Run("pretrain", "vanilla", dict(NO_MEMORY, xl_length=0), 4 * 32 * 6),
                Run("xl", "XL", dict(NO_MEMORY, xl_length=32), 4 * 32 * 4, init_from="pretrain"),
                Run(
                    "as-is",
                    "the pre-training, not trained further",
                    dict(NO_MEMORY, xl_length=0),
                    0,
                    init_from="pretrain",
                ),
                Run(
                    "mem-xl",
                    "memory + XL",
                    dict(xl_length=32),
                    4 * 32 * 4,
                    init_from="pretrain",
                    eval_memory_sizes=(512,),
                ),
            ),
            batch_size=4,
            eval_tokens=256,
        ),
    )
}


# ---------------------------------------------------------------------- running
def run_settings(grid: Grid, run: Run) -> dict[str, Any]:
    """Everything that decides a run's result: a finished run whose JSON records other
    settings is run again (into a folder of its own), never silently reused."""
    config = {**grid.base, **run.model}
    config["knn_layers"] = list(config.get("knn_layers", ()))
    settings = {
        "corpus": grid.corpus,
        "vocab_size": grid.vocab_size,
        "batch_size": batch_size(grid, run),
        "model": config,
        **{k: v for k, v in dataclasses.asdict(run).items() if k not in ("name", "label", "model", "batch_size")},
    }
    if grid.document_tokens is not None:
        settings["document_tokens"] = grid.document_tokens
    if grid.tokenizer_from is not None:
        settings["tokenizer_from"] = grid.tokenizer_from
    return settings


def same_settings(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a run's recorded settings are the grid's current ones, the model's configuration
    compared as MemorizingConfig reads it (so that a value spelt as an earlier version spelt
    it, such as memory_combine "joint_softmax", is the value it stands for)."""

    def read(settings: dict[str, Any]) -> dict[str, Any]:
        model = MemorizingConfig.from_dict({**settings["model"], "vocab_size": settings["vocab_size"]}).to_dict()
        return {**settings, "model": model}

    return read(recorded) == read(current)


def batch_size(grid: Grid, run: Run) -> int:
    return run.batch_size or grid.batch_size


def steps_for(grid: Grid, run: Run) -> int:
    """The run's training steps: its tokens over a step's (at least one); none for a run of 0 tokens,
    which evaluates its source's weights as they are."""
    segment = {**grid.base, **run.model}["segment_length"]
    return max(1, run.tokens // (batch_size(grid, run) * segment)) if run.tokens else 0


def result_path(grid: Grid, run: Run, results: Path) -> Path:
    return results / grid.name / f"{run.name}.json"


def named_run(name: str) -> tuple[Grid, Run]:
    """The grid and run named GRID/RUN."""
    grid_name, run = name.split("/", 1)
    return GRIDS[grid_name], GRIDS[grid_name].run(run)


def source_of(grid: Grid, run: Run) -> tuple[Grid, Run]:
    """The grid and run whose final weights start `run`."""
    return named_run(run.init_from) if "/" in run.init_from else (grid, grid.run(run.init_from))


def started_from(grid: Grid, run: Run) -> bool:
    """Whether any run of any grid (or of `grid` itself) starts from `run`'s weights."""
    names = {run.name, f"{grid.name}/{run.name}"}
    return any(
        other.init_from in names
        for g in (grid, *GRIDS.values())
        for other in g.runs
        if other.init_from and (g is grid or "/" in other.init_from)
    )


def cut_documents(documents: list[TokenizedDocument], tokens: int | None) -> list[TokenizedDocument]:
    """Each document cut into pieces of at most `tokens` tokens, each piece a document of its own."""
    if tokens is None:
        return documents
    return [
        TokenizedDocument(f"{d.name}#{i // tokens}", d.ids[i : i + tokens])
        for d in documents
        for i in range(0, d.ids.numel(), tokens)
        if d.ids[i : i + tokens].numel() >= 2
    ]


def weights_dir(grid: Grid, run: Run, results: Path) -> Path:
    """The final weights of a run that others start from (a model folder beside its JSON)."""
    return results / grid.name / f"{run.name}-weights"


def build_model(grid: Grid, run: Run, device: torch.device) -> MemorizingTransformer:
    """The run's model, seeded, on `device`, with the corpus's tokenizer (or the grid's `tokenizer_from`)."""
    if grid.tokenizer_from is None:
        tokenizer = load_tokenizer(str(corpus_tokenizer(grid.corpus, grid.vocab_size)))
    else:
        tokenizer = load_tokenizer(str(weights_dir(*named_run(grid.tokenizer_from), RESULTS) / "tokenizer"))
    config = MemorizingConfig.from_dict({**grid.base, **run.model, "vocab_size": len(tokenizer)})
    torch.manual_seed(run.seed)
    return MemorizingTransformer(config, tokenizer=tokenizer).to(device)


def build_trainer(grid: Grid, run: Run, run_dir: Path, device: torch.device, steps: int | None = None) -> Trainer:
    """The run's model and its Trainer writing to `run_dir`; `steps` shortens the run (the
    learning-rate schedule follows)."""
    steps = steps or steps_for(grid, run) or 1  # a run of 0 tokens gets a trainer that never trains
    train = TrainConfig(
        steps=steps,
        batch_size=batch_size(grid, run),
        lr=run.lr,
        warmup_steps=max(1, int(steps * run.warmup_fraction)),
        seed=run.seed,
        eval_every=0,
        checkpoint_every=0,
        checkpoint_minutes=5.0,
        log_every=max(1, steps // 200),
        extra={"grid": grid.name, "run": run.name},
    )
    model = build_model(grid, run, device)
    documents = cut_documents(load_tokenized(grid.corpus, "train", model.tokenizer), grid.document_tokens)
    return Trainer(model, train, documents, None, run_dir)


def start_weights(grid: Grid, run: Run, model: MemorizingTransformer, results: Path) -> Path | None:
    """Load the weights `run` starts from into `model` (none for a run from scratch); their folder."""
    if run.init_from is None:
        return None
    source = weights_dir(*source_of(grid, run), results)
    weights = MemorizingTransformer.from_pretrained(source)
    # A corpus built from installed packages (pycode) changes with their versions, and so does the
    # BPE trained on it: weights read through another tokenizer would be fine-tuned on noise.
    if tokenizer_fingerprint(weights.tokenizer) != tokenizer_fingerprint(model.tokenizer):
        raise SystemExit(
            f"{grid.name}/{run.name}: the `{grid.corpus}` corpus's tokenizer is not the one {source} was trained "
            "with: the corpus has changed since (for pycode, the installed packages' versions); its rows cannot "
            "start from those weights"
        )
    model.take_weights(weights)
    return source


def train_run(
    grid: Grid, run: Run, runs_dir: Path, results: Path, device: torch.device, deadline: float | None
) -> bool:
    """Train `run` (resuming) until its budget or the deadline; True when it is finished."""
    trainer = build_trainer(grid, run, runs_dir / grid.name / run.name, device)
    model, config, steps, tokenizer = trainer.model, trainer.model.config, steps_for(grid, run), trainer.model.tokenizer
    if trainer.resume():
        print(f"  {run.name}: resuming at step {trainer.step:,} of {steps:,}")
    elif (source := start_weights(grid, run, model, results)) is not None:
        print(f"  {run.name}: starting from the weights of {source}")
    if trainer.step < steps:
        remaining = None if deadline is None else deadline - time.time()
        if remaining is not None and remaining <= 0:
            return False
        trainer.train(max_seconds=remaining)
        if trainer.step < steps:
            return False
    began = time.perf_counter()
    test_docs = cut_documents(load_tokenized(grid.corpus, "test", tokenizer), grid.document_tokens)
    memory = bool(config.knn_layers)
    seconds: dict[str, float] = {}

    def timed_evaluate(label: str, evaluated_model: MemorizingTransformer, **options) -> EvalResult:
        started = time.perf_counter()
        result = evaluate(evaluated_model, test_docs, max_tokens=grid.eval_tokens, **options)
        seconds[label] = time.perf_counter() - started
        return result

    evaluated = {
        "with memory" if memory else "no memory": timed_evaluate(
            "with memory" if memory else "no memory", model, token_losses=memory
        )
    }
    gains = None
    if memory:
        off = model.without_memory()
        evaluated["memory off"] = timed_evaluate("memory off", off, token_losses=True)
        counts = torch.bincount(torch.cat([d.ids for d in trainer.batcher.documents]), minlength=config.vocab_size)
        gains = token_gain(
            test_docs,
            evaluated["with memory"].token_losses,
            evaluated["memory off"].token_losses,
            tokenizer,
            counts,
            config.segment_length,
            config.xl_length,
        )
    for size in run.eval_memory_sizes:  # the same weights with a larger (or smaller) memory at test time
        resized = MemorizingTransformer(dataclasses.replace(config, memory_size=size), tokenizer=tokenizer).to(device)
        resized.take_weights(model)
        evaluated[f"memory {size:,}"] = timed_evaluate(f"memory {size:,}", resized)
    result = {
        "grid": grid.name,
        "run": run.name,
        "label": run.label,
        "settings": run_settings(grid, run),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "train_tokens": steps * batch_size(grid, run) * config.segment_length,
        "train_seconds": trainer.train_seconds,
        "eval_seconds": time.perf_counter() - began,
        "eval_seconds_by_variant": seconds,
        "forward_flops_per_token": forward_flops_per_token(config),
        "test": {k: v.to_dict() for k, v in evaluated.items()},
        "token_gain": gains,
        "peak_memory": peak_memory(grid, run, device),
        "memory_readout": memory_readout(model, test_docs) if memory else None,
        "memory_gates": model.memory_gates(),
        "memory_gates_by_step": gate_history(trainer.metrics_path) if memory else None,
        # what decides how much a retrieved entry weighs, per memory layer and head: the softmax
        # temperature, and the position bias the joint softmax gives it (the farthest bucket's)
        "memory_attention": {
            str(i): {
                "qk_scale": model.blocks[i].attn.log_scale.detach().exp().tolist(),
                "farthest_bias": model.blocks[i].attn.position_bias.embedding.weight[-1].detach().tolist(),
                "memory_qk_scale": model.blocks[i].attn.memory_log_scale.detach().exp().tolist()
                if hasattr(model.blocks[i].attn, "memory_log_scale")
                else None,
            }
            for i in config.memory_layer_indices
        },
        "machine": {
            "device": str(device),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    if started_from(grid, run):  # kept with the results: small, and costly to redo
        model.save_pretrained(weights_dir(grid, run, results))
    path = result_path(grid, run, results)
    write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    print(f"  {run.name}: test perplexity " + ", ".join(f"{k} {v.perplexity:.3f}" for k, v in evaluated.items()))
    return True


GATE_POINTS = 20  # steps at which a run's JSON keeps the memory gates, spread over its training


def gate_history(metrics: Path, points: int = GATE_POINTS) -> list[dict[str, Any]]:
    """The memory gates per layer and head at about `points` steps spread over training, the last
    included, from the trainer's log (a resume truncates the log to its checkpoint's step)."""
    logged = [record for line in metrics.read_text().splitlines() if "memory_gates" in (record := json.loads(line))]
    kept = logged[:: max(1, len(logged) // points)]
    if logged and kept[-1] is not logged[-1]:
        kept.append(logged[-1])
    return [{"step": record["step"], "gates": record["memory_gates"]} for record in kept]


READOUT_TOKENS = 16_384  # test tokens over which the memory's readout is inspected


@torch.no_grad()
def memory_readout(model: MemorizingTransformer, test_docs: list[TokenizedDocument]) -> dict[str, Any]:
    """How each memory head reads what it retrieves, over the first READOUT_TOKENS test tokens
    (queries that retrieved anything): the mean weight of its best entry and the entropy of
    its weights over the k entries (a uniform average of k entries: 1/k and ln k), and the
    share of its output that comes from the memory (the gate, or the joint softmax's mass)."""
    layers = model.config.memory_layer_indices
    with contextlib.ExitStack() as stack:
        traces = [stack.enter_context(model.blocks[i].attn.retrieved.record()) for i in layers]
        evaluate(model, test_docs, max_tokens=READOUT_TOKENS)
    result = {}
    for i, trace in zip(layers, traces):
        top, entropy, share, count = 0.0, 0.0, 0.0, 0.0
        for record in trace:
            valid, any_valid = record["valid"], record["valid"].any(-1)  # (batch, heads, seq, k), (b, h, s)
            weights = torch.softmax(record["logits"].masked_fill(~valid, float("-inf")), -1).nan_to_num(0.0)
            used = any_valid.float()
            top = top + (weights.max(-1).values * used).sum(dim=(0, 2))
            entropy = entropy + (-(weights * weights.clamp_min(1e-12).log()).sum(-1) * used).sum(dim=(0, 2))
            share = share + (record["share"] * used).sum(dim=(0, 2))
            count = count + used.sum(dim=(0, 2))
        count = torch.as_tensor(count).clamp_min(1)
        result[str(i)] = {
            "best_entry_weight": (torch.as_tensor(top) / count).tolist(),
            "entropy": (torch.as_tensor(entropy) / count).tolist(),
            "share_of_output": (torch.as_tensor(share) / count).tolist(),
            "uniform_entropy": math.log(model.config.knn_k),
        }
    return result


PEAK_STEPS = 20  # training steps measured once the memory is full (or from the start, without one)
PEAK_MEASURE = "peak growth over the memory in use once data and model are loaded, each phase in a fresh process"


def measure_peak(grid: Grid, run: Run, phase: str, device: str, threads: int) -> dict[str, Any]:
    """Peak memory of the run's training or of its test, as growth over the memory in use
    once data and model are loaded: training until its memory is full plus PEAK_STEPS
    steps (at most the run's own steps), or testing until a test document has filled its
    memory plus four segments (at most the grid's test tokens). Each phase runs in a fresh
    process (`peak_memory`): memory another phase freed is not reused unseen."""
    torch.set_num_threads(threads)
    device = torch.device(device)
    config = {**grid.base, **run.model}
    segment, size = config["segment_length"], config.get("memory_size", 0) if config.get("knn_layers") else 0
    if phase == "train":
        steps = min(steps_for(grid, run), -(-size // segment) + PEAK_STEPS)
        with tempfile.TemporaryDirectory() as work:
            trainer = build_trainer(grid, run, Path(work), device, steps=steps)  # weights do not matter here
            with PeakMemory(device) as use:
                trainer.train(progress=False)
        return {"train_bytes": use.peak_bytes, "train_steps": steps}
    model = build_model(grid, run, device)
    test_docs = cut_documents(load_tokenized(grid.corpus, "test", model.tokenizer), grid.document_tokens)
    tokens = size + 4 * segment if grid.eval_tokens is None else min(grid.eval_tokens, size + 4 * segment)
    with PeakMemory(device) as use:
        evaluate(model, test_docs, max_tokens=tokens)
    return {"test_bytes": use.peak_bytes, "test_tokens": tokens}


def peak_memory(grid: Grid, run: Run, device: torch.device | str) -> dict[str, Any]:
    """`measure_peak` of training and of test, each in a fresh process with this process's threads."""
    device = torch.device(device)
    measured = {"measure": PEAK_MEASURE, "counted": "CUDA allocated bytes" if device.type == "cuda" else "VmHWM"}
    for phase in ("train", "test") if run.tokens else ("test",):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            measured |= pool.apply(measure_peak, (grid, run, phase, str(device), torch.get_num_threads()))
    return measured


def run_grid(
    grid: Grid,
    runs_dir: Path,
    results: Path,
    device: torch.device,
    max_minutes: float | None,
    only: list[str] | None = None,
) -> bool:
    """Every unfinished run of the grid in order; True when all are finished."""
    deadline = None if max_minutes is None else time.time() + 60 * max_minutes
    for run in grid.runs:
        if only and run.name not in only:
            continue
        path = result_path(grid, run, results)
        if path.is_file():
            recorded = json.loads(path.read_text())["settings"]
            if same_settings(recorded, json.loads(json.dumps(run_settings(grid, run)))):
                add_peak_memory(grid, run, path, device)
                add_memory_readout(grid, run, path, runs_dir, device)
                continue
            raise SystemExit(
                f"{path} was made with other settings than the grid now gives {run.name}: "
                f"move it (and {runs_dir / grid.name / run.name}) away to run it again"
            )
        source = None if run.init_from is None else source_of(grid, run)
        if source is not None and not result_path(*source, results).is_file():
            print(f"  {run.name}: waits for {run.init_from}")
            continue
        if source is not None and not (weights_dir(*source, results) / "config.json").is_file():
            # A source finished before its final weights were kept beside its result: train it again
            # (its result is written anew), so that the runs it starts can go on.
            print(f"-- {run.init_from}: its final weights were not kept; training it again for {run.name}")
            if not train_run(*source, runs_dir, results, device, deadline):
                print("stopped at the time limit; run the same command again to go on")
                return False
        print(f"-- {grid.name}/{run.name}: {run.label}, {run.tokens:,} tokens")
        if not train_run(grid, run, runs_dir, results, device, deadline):
            print("stopped at the time limit; run the same command again to go on")
            return False
    return all(result_path(grid, run, results).is_file() for run in grid.runs)


def add_peak_memory(grid: Grid, run: Run, path: Path, device: torch.device) -> None:
    """Measure and record the peak memory of a finished run whose JSON predates it (or the way it is measured)."""
    result = json.loads(path.read_text())
    if result.get("peak_memory", {}).get("measure") != PEAK_MEASURE:
        print(f"  {run.name}: measuring its peak memory")
        result["peak_memory"] = peak_memory(grid, run, device)
        write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))


def add_memory_readout(grid: Grid, run: Run, path: Path, runs_dir: Path, device: torch.device) -> None:
    """Inspect the memory readout of a finished memory run whose JSON predates it, from its final checkpoint."""
    result = json.loads(path.read_text())
    if "memory_readout" in result or not {**grid.base, **run.model}.get("knn_layers"):
        return
    try:
        model = MemorizingTransformer.from_pretrained(resolve_model_dir(runs_dir / grid.name / run.name)).to(device)
    except (FileNotFoundError, ValueError):
        return  # its checkpoints are elsewhere: nothing to inspect here
    print(f"  {run.name}: inspecting its memory readout")
    test_docs = cut_documents(load_tokenized(grid.corpus, "test", model.tokenizer), grid.document_tokens)
    result["memory_readout"] = memory_readout(model, test_docs)
    write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))


# ---------------------------------------------------------------------- tables
def summarize(grid: Grid, results: Path) -> str:
    """GRID.md (the table) and GRID.png (loss by position) from the runs' JSON."""
    rows = [json.loads(path.read_text()) for run in grid.runs if (path := result_path(grid, run, results)).is_file()]
    lines = [
        f"# {grid.name}",
        "",
        f"{grid.description}. Made by `python experiments/grid.py {grid.name}`; "
        "raw results in the JSON files beside this one. Rows are matched in training tokens; training tokens/s "
        "and test ms/token say what they cost (one machine, the threads given).",
        "",
        "| run | model | parameters | train tokens | train tokens/s | forward GFLOP/token | peak MB train / test | "
        "test tokens | ms/token (test) | perplexity | memory off | device |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    curves: dict[str, EvalResult] = {}
    for row in rows:
        test = {k: EvalResult(**v) for k, v in row["test"].items()}
        main = test.get("with memory") or test["no memory"]
        off = f"{test['memory off'].perplexity:.3f}" if "memory off" in test else "-"
        resized = [
            f"{label}: {result.perplexity:.3f}"
            for label, result in test.items()
            if label.startswith("memory ") and label != "memory off"
        ]
        if resized:
            off += " (at test time with " + ", ".join(resized) + ")"
        machine = row["machine"]
        label = "with memory" if "with memory" in test else "no memory"
        flops = row.get(
            "forward_flops_per_token",
            forward_flops_per_token(
                MemorizingConfig.from_dict({**row["settings"]["model"], "vocab_size": row["settings"]["vocab_size"]})
            ),
        )["total"]
        per_token = (
            f"{1000 * row['eval_seconds_by_variant'][label] / main.tokens:.2f}"
            if "eval_seconds_by_variant" in row
            else "-"
        )
        peak = row.get("peak_memory")
        train = f"{peak['train_bytes'] / 2**20:,.0f}" if peak and "train_bytes" in peak else "-"  # 0 tokens: none
        peak = f"{train} / {peak['test_bytes'] / 2**20:,.0f}" if peak else "-"
        speed = f"{row['train_tokens'] / row['train_seconds']:,.0f}" if row["train_tokens"] else "-"  # 0: not trained
        lines.append(
            f"| {row['run']} | {row['label']} | {row['parameters']:,} | {row['train_tokens']:,} | "
            f"{speed} | {flops / 1e9:.4f} | {peak} | {main.tokens:,} | "
            f"{per_token} | {main.perplexity:.3f} | {off} | {machine['device']}, {machine['threads']} threads |"
        )
        curves[f"{row['run']}: {row['label']}"] = main
    missing = [run.name for run in grid.runs if not result_path(grid, run, results).is_file()]
    if missing:
        lines += ["", f"Not finished yet: {', '.join(missing)}."]
    text = "\n".join(lines) + "\n"
    if curves:
        plot = results / f"{grid.name}.png"
        plot_loss_by_position(curves, grid.base["segment_length"], plot, f"{grid.name}: test loss by position")
        text += f"\n![test loss by position]({grid.name}.png)\n"
    gained = [row for row in rows if row.get("token_gain")]
    if gained:
        text += (
            "\n## What the memory helps\n\nPer-token gain: the loss with the memory switched off minus the loss "
            "with it, same weights, on the scored test tokens.\n"
        )
        plot_gain({row["run"]: row["token_gain"] for row in gained}, results / f"{grid.name}-token-gain.png")
        text += f"\n![share of tokens and of the gain, by group]({grid.name}-token-gain.png)\n"
        text += "".join(f"\n### {row['run']}: {row['label']}\n\n{gain_tables(row['token_gain'])}\n" for row in gained)
    write_atomically(results / f"{grid.name}.md", lambda tmp: Path(tmp).write_text(text))
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grids", nargs="*", metavar="GRID", help="the grids to run, one after the other (see --list)")
    parser.add_argument("--list", action="store_true", help="the grids and their runs")
    parser.add_argument("--only", nargs="+", metavar="RUN", help="only these runs of the grid")
    parser.add_argument("--summarize", action="store_true", help="only write the table and plot from the JSON")
    parser.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this much wall time")
    parser.add_argument("--threads", type=int, help="torch threads (the figures depend on them: keep them fixed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", default="runs/grids", help="where checkpoints go")
    parser.add_argument("--results", default=str(RESULTS), help="where RUN.json files and the tables go")
    args = parser.parse_args(argv)
    keep_freed_host_memory()  # as `mt train` runs
    if args.list:
        for grid in GRIDS.values():
            print(f"{grid.name}: {grid.description}")
            for run in grid.runs:
                print(
                    f"  {run.name:14} {run.label}, {run.tokens:,} tokens"
                    + (f", from {run.init_from}" if run.init_from else "")
                )
        return
    if unknown := [name for name in args.grids if name not in GRIDS]:
        raise SystemExit(f"unknown grid {unknown[0]!r}; grids: {', '.join(GRIDS)}")
    if not args.grids:
        raise SystemExit("name a grid to run (--list shows them)")
    if args.only and len(args.grids) > 1:
        raise SystemExit("--only names runs of one grid: give one grid with it")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    for name in args.grids:
        grid, results = GRIDS[name], Path(args.results)
        if not args.summarize:
            left = None if args.max_minutes is None else max(0.0, args.max_minutes - (time.time() - started) / 60)
            finished = run_grid(grid, Path(args.runs), results, torch.device(args.device), left, args.only)
            print(f"grid {name} {'finished' if finished else 'not finished'}", file=sys.stderr)
        print(summarize(grid, results))


if __name__ == "__main__":
    main()
