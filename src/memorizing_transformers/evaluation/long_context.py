"""The long-context benchmark of a Hugging Face causal LM: the tasks of data/long_tasks.py and the
perplexity of long documents by position, read by the window alone, by the window with a memory
in each position mode, and by full attention where the input fits.

An answer is scored teacher-forced, one pass over prompt + answer: it is right when every one of
its tokens is the model's most likely next token (exactly what greedy generation would write)
and its log-likelihood is reported too, for models that do not follow instructions.

    methods                       what a prompt's last token sees
    window                        the last `window` tokens
    memory-true / memory-fixed    the last `window` tokens, and everything before them through
                                  the memory (add_memory, positions "true" / "fixed")
    full                          everything (only for inputs of at most `full_limit` tokens)
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

from ..atomic import write_atomically  # noqa: E402
from ..data.long_tasks import TASKS, LongTask, make_task  # noqa: E402
from ..devices import describe_device, synchronize  # noqa: E402
from ..hf.files import model_identity  # noqa: E402
from ..hf.handle import MemoryHandle  # noqa: E402
from ..hf.retrofit import add_memory  # noqa: E402

METHODS = ("window", "memory-true", "memory-fixed", "full")


@dataclass
class LongBenchSettings:
    """What a run measures; every field is kept in its results."""

    tasks: Sequence[str] = TASKS
    lengths: Sequence[int] = (4096, 8192, 16384)
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 2
    methods: Sequence[str] = METHODS
    window: int = 512
    knn_layers: Sequence[int] | None = None  # None: every layer
    knn_k: int = 32
    memory_backend: str = "exact"
    memory_dtype: str = "float32"
    fixed_distance: int = 512
    write_only: bool = False  # memorize a prompt without searching the memory (MemoryHandle.write_only)
    write_overlap: int | None = None  # with write_only, tokens each call reads again (None: window // 8)
    full_limit: int = 8192  # full attention only up to this many tokens
    documents: Sequence[str] = field(default_factory=list)  # text files: perplexity by position
    document_tokens: int = 16384  # each document's first tokens scored
    seed: int = 0
    memory_parameters: str | None = None  # a fine-tune's JSON ({"parameters": {name: values}}), loaded into each memory

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}: choose among {', '.join(METHODS)}")
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"unknown long-context task {task!r}: choose among {', '.join(TASKS)}")
        if self.window <= 0 or self.trials <= 0 or self.knn_k <= 0:
            raise ValueError("window, trials and knn_k must be positive")
        if self.write_overlap is not None and not 0 <= self.write_overlap < self.window:
            raise ValueError(f"need 0 <= write_overlap < window, got {self.write_overlap} and {self.window}")


def memory_parameters(path: str) -> dict[str, list[float]]:
    """The memory parameters a fine-tune wrote (a JSON whose "parameters" maps their names to values)."""
    try:
        parameters = json.loads(Path(path).read_text())["parameters"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f'{path} holds no memory parameters (a JSON with "parameters"): {error}') from None
    if not isinstance(parameters, dict):
        raise ValueError(f'{path}: "parameters" must map parameter names to their values')
    return parameters


class Readers:
    """The model read each way a method names: the same weights, one memory per position mode."""

    def __init__(self, model: PreTrainedModel, settings: LongBenchSettings, capacity: int) -> None:
        self.model, self.settings = model, settings
        layers = settings.knn_layers
        layers = list(range(model.config.num_hidden_layers)) if layers is None else list(layers)
        trained = memory_parameters(settings.memory_parameters) if settings.memory_parameters else None
        self.handles: dict[str, MemoryHandle] = {}
        for method in settings.methods:
            if method.startswith("memory-"):
                self.handles[method] = add_memory(
                    copy.deepcopy(model),
                    knn_layers=layers,
                    memory_size=capacity,
                    knn_k=settings.knn_k,
                    memory_dtype=getattr(torch, settings.memory_dtype),
                    memory_backend=settings.memory_backend,
                    positions=method.removeprefix("memory-"),
                    fixed_distance=settings.fixed_distance,
                )
                if trained is not None:
                    self.handles[method].load_memory_parameters(trained)

    def fits(self, method: str, length: int) -> bool:
        return method != "full" or length <= self.settings.full_limit

    @torch.no_grad()
    def logits(self, method: str, ids: torch.Tensor, last: int) -> torch.Tensor:
        """Next-token logits (last, vocab) at the last `last` positions of ids (1, n), as `method` reads."""
        return self.read(method, ids, last)

    def read(self, method: str, ids: torch.Tensor, last: int) -> torch.Tensor:
        """`logits`, with gradients where they are enabled: through the last window's call only
        (memorizing never keeps a graph), to the weights and the memory's parameters (a fine-tune)."""
        window, device = self.settings.window, next(self.model.parameters()).device
        ids = ids.to(device)
        if method == "full":
            return self.model(ids, logits_to_keep=last).logits[0].float()
        if method == "window":
            return self.model(ids[:, -window:], logits_to_keep=last).logits[0].float()
        handle = self.handles[method]
        handle.reset()
        split = max(0, ids.shape[1] - window)
        if split:
            search, overlap = not self.settings.write_only, self.settings.write_overlap
            handle.memorize([ids[:, :split]], window=window, search=search, overlap=overlap)
        return handle.stream(ids[:, split:], window=window)[0, -last:].float()

    @torch.no_grad()
    def plain_seconds(self, ids: torch.Tensor) -> float:
        """Wall time of the model's own forward pass over ids (1, n), window by window, with no memory
        and no logits but each window's last: what reading through the memory is measured against."""
        window, device = self.settings.window, next(self.model.parameters()).device
        synchronize(device)
        tick = time.perf_counter()
        for start in range(0, ids.shape[1], window):
            self.model(ids[:, start : start + window].to(device), logits_to_keep=1)
        synchronize(device)
        return time.perf_counter() - tick

    @torch.no_grad()
    def token_losses(self, method: str, ids: torch.Tensor) -> torch.Tensor:
        """Next-token losses (n - 1,) of a document ids (1, n) read as `method` reads: windows that
        advance by `window` (so token t sees t mod window earlier tokens in its window)."""
        window, device = self.settings.window, next(self.model.parameters()).device
        ids = ids.to(device)
        if method == "full":
            logits = self.model(ids).logits[0, :-1].float()
            return F.cross_entropy(logits, ids[0, 1:], reduction="none").cpu()
        if method == "window":
            losses = []
            for start in range(0, ids.shape[1] - 1, window):
                chunk = ids[:, start : start + window + 1]
                logits = self.model(chunk[:, :-1]).logits[0].float()
                losses.append(F.cross_entropy(logits, chunk[0, 1:], reduction="none"))
            return torch.cat(losses).cpu()
        handle = self.handles[method]
        handle.reset()
        return handle.stream(ids, window=window, losses=True)[0].cpu()


def sample_tokens(tokenizer, sample: LongTask) -> tuple[list[int], list[int]]:
    """A task's prompt and its answer as token ids; the answer after a space, as it follows the prompt."""
    prompt = tokenizer(sample.prompt)["input_ids"]
    return prompt, tokenizer(" " + sample.answer, add_special_tokens=False)["input_ids"]


def value_start(tokenizer, answer: list[int]) -> int:
    """How many of the answer's first tokens are whitespace alone (the space before its digits with
    a tokenizer that splits digits): the value itself starts after them."""
    start = 0
    while start < len(answer) - 1 and not tokenizer.decode(answer[start : start + 1]).strip():
        start += 1
    return start


def answer_score(logits: torch.Tensor, answer: torch.Tensor) -> tuple[bool, float]:
    """Whether every answer token (m,) is the argmax of its logits (m, vocab), and the answer's mean
    log-likelihood per token."""
    right = bool((logits.argmax(dim=-1).cpu() == answer).all())
    return right, float(torch.log_softmax(logits, dim=-1).cpu().gather(1, answer[:, None]).mean())


def position_buckets(length: int) -> list[tuple[int, int]]:
    """0-2K, 2-4K, 4-8K, 8-16K, ...: the ranges of target positions losses are averaged over."""
    edges = [0, 2048]
    while edges[-1] < length:
        edges.append(edges[-1] * 2)
    return list(zip(edges, edges[1:]))


def run_longbench(
    model: PreTrainedModel, tokenizer, settings: LongBenchSettings, progress=print, partial: Path | None = None
) -> dict[str, Any]:
    """Every (task, length, depth, trial) sample read by every method, and every document's losses
    by position; returns the raw rows and their summaries. With `partial`, each row is kept there
    as it is measured, and a run started again with the same settings goes on after the rows
    already there (one with other settings is refused)."""
    capacity = max([*settings.lengths, settings.document_tokens if settings.documents else 0])
    readers = Readers(model, settings, capacity)
    started, recorded = time.time(), json.loads(json.dumps(asdict(settings)))
    device_name = describe_device(next(model.parameters()).device)
    measuring = {"model": model_identity(model), "device": device_name}  # what a resumed run must be
    samples: list[dict[str, Any]] = []
    documents: list[dict[str, Any]] = []
    if partial is not None and partial.is_file():
        kept = json.loads(partial.read_text())
        if kept["settings"] != recorded or kept.get("measuring") != measuring:
            raise ValueError(
                f"{partial} holds a run with other settings, another model or another device: remove it, or "
                "choose another --out"
            )
        samples, documents = kept["samples"], kept["documents"]
        progress(f"{partial}: going on after {len(samples)} answers and {len(documents)} documents measured")
    done = {(r["task"], r["length"], r["depth"], r["trial"], r["method"]) for r in samples}

    def keep() -> None:
        if partial is not None:
            state = {"settings": recorded, "measuring": measuring, "samples": samples, "documents": documents}
            write_atomically(partial, lambda tmp: Path(tmp).write_text(json.dumps(state)))

    for task in settings.tasks:
        for length in settings.lengths:
            for depth in settings.depths:
                for trial in range(settings.trials):
                    sample = make_task(task, tokenizer, length, depth, settings.seed * 1000 + trial)
                    prompt, answer = sample_tokens(tokenizer, sample)
                    ids = torch.tensor([prompt + answer])
                    # The value alone is scored too (its separator given): a model that would write "is: 1234567"
                    # as the needle does, where the prompt ends "is", misses the space but not the value.
                    start = value_start(tokenizer, answer)
                    plain = None  # the plain forward's time over the prompt, measured once for the memory methods
                    for method in settings.methods:
                        if not readers.fits(method, ids.shape[1]) or (task, length, depth, trial, method) in done:
                            continue
                        synchronize(next(model.parameters()).device)
                        tick = time.perf_counter()
                        logits = readers.logits(method, ids[:, :-1], len(answer))
                        right, logprob = answer_score(logits, torch.tensor(answer))  # its .cpu() waits for the device
                        seconds = time.perf_counter() - tick
                        value_right, value_logprob = answer_score(logits[start:], torch.tensor(answer[start:]))
                        if method.startswith("memory-") and plain is None:
                            plain = readers.plain_seconds(ids[:, :-1])
                        samples.append(
                            {
                                "task": task,
                                "length": length,
                                "tokens": len(prompt),
                                "depth": depth,
                                "trial": trial,
                                "method": method,
                                "correct": right,
                                "answer_logprob": logprob,
                                "value_correct": value_right,
                                "value_logprob": value_logprob,
                                "seconds": seconds,
                                **({"plain_seconds": plain} if method.startswith("memory-") else {}),
                            }
                        )
                        keep()
                    progress(f"{task} {length} depth {depth} trial {trial}: {time.time() - started:.0f} s")
    for path in settings.documents[len(documents) :]:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        ids = torch.tensor([tokenizer(text)["input_ids"][: settings.document_tokens]])
        row: dict[str, Any] = {"document": str(path), "tokens": ids.shape[1], "loss_by_bucket": {}}
        for method in settings.methods:
            if ids.shape[1] < 2 or not readers.fits(method, ids.shape[1]):  # nothing to score, or too long
                continue
            losses = readers.token_losses(method, ids)
            positions = torch.arange(1, ids.shape[1])  # the position of each predicted token
            row["loss_by_bucket"][method] = {
                f"{low}-{high}": float(losses[(positions >= low) & (positions < high)].mean())
                for low, high in position_buckets(ids.shape[1])
                if bool(((positions >= low) & (positions < high)).any())
            }
        documents.append(row)
        keep()
        progress(f"{path}: {time.time() - started:.0f} s")
    return {
        "settings": asdict(settings),
        "device": device_name,
        "samples": samples,
        "documents": documents,
        "summary": summarize(samples),
    }


def summarize(samples: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy and mean answer log-likelihood per task, method and length: summary[task][method][length]."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for row in samples:
        cell = summary.setdefault(row["task"], {}).setdefault(row["method"], {}).setdefault(str(row["length"]), [])
        cell.append(row)
    return {
        task: {
            method: {
                length: {
                    "accuracy": sum(r["correct"] for r in rows) / len(rows),
                    "answer_logprob": sum(r["answer_logprob"] for r in rows) / len(rows),
                    **(
                        {
                            "value_accuracy": sum(r["value_correct"] for r in rows) / len(rows),
                            "value_logprob": sum(r["value_logprob"] for r in rows) / len(rows),
                        }
                        if all("value_correct" in r for r in rows)
                        else {}
                    ),
                    "samples": len(rows),
                    **(
                        {"time_over_plain": sum(r["seconds"] / r["plain_seconds"] for r in rows) / len(rows)}
                        if all("plain_seconds" in r for r in rows)
                        else {}
                    ),
                }
                for length, rows in by_length.items()
            }
            for method, by_length in by_method.items()
        }
        for task, by_method in summary.items()
    }


def markdown(report: dict[str, Any]) -> str:
    """Accuracy by task, method and length; perplexity of the documents by position bucket."""
    lengths = [str(n) for n in report["settings"]["lengths"]]
    header = [
        "| task | method | " + " | ".join(f"{int(n):,} tokens" for n in lengths) + " |",
        "|---|---|" + "---:|" * len(lengths),
    ]

    def table(cell: Callable[[dict[str, Any]], str], field: str) -> list[str]:
        """The rows of (task, method) with `field` in some length's summary, `cell` of each length that has it."""
        return [
            f"| {task} | {method} | "
            + " | ".join(cell(cells[n]) if field in cells.get(n, {}) else "-" for n in lengths)
            + " |"
            for task, by_method in report["summary"].items()
            for method, cells in by_method.items()
            if any(field in c for c in cells.values())
        ]

    def accuracy(rate: str, logprob: str) -> Callable[[dict[str, Any]], str]:
        return lambda c: f"{c[rate]:.0%} ({c[logprob]:.2f})"

    accuracies = table(accuracy("accuracy", "answer_logprob"), "accuracy")
    text = "Accuracy (mean log-likelihood of the answer per token):\n\n" + "\n".join(header + accuracies) + "\n"
    if all("value_accuracy" in cell for m in report["summary"].values() for c in m.values() for cell in c.values()):
        text += (
            "\nAccuracy of the value alone, the space before it given (mean log-likelihood of its tokens):\n\n"
            + "\n".join(header + table(accuracy("value_accuracy", "value_logprob"), "value_accuracy"))
            + "\n"
        )
    speed = table(lambda c: f"{c['time_over_plain']:.2f}x", "time_over_plain")
    if speed:
        text += (
            "\nTime to read a prompt through the memory (memorizing all but its last window, then that window), "
            "over the model's own forward pass over the same tokens, window by window, in the same run:\n\n"
            + "\n".join([*header, *speed])
            + "\n"
        )
    if report["documents"]:
        buckets = sorted(
            {b for d in report["documents"] for m in d["loss_by_bucket"].values() for b in m},
            key=lambda b: int(b.split("-")[0]),
        )
        rows = [
            "| document | method | " + " | ".join(buckets) + " |",
            "|---|---|" + "---:|" * len(buckets),
        ]
        for d in report["documents"]:
            for method, by_bucket in d["loss_by_bucket"].items():
                cells = [f"{math.exp(by_bucket[b]):.2f}" if b in by_bucket else "-" for b in buckets]
                rows.append(f"| {d['document']} | {method} | " + " | ".join(cells) + " |")
        text += "\nPerplexity by the position of the predicted token:\n\n" + "\n".join(rows) + "\n"
    return text


def heat_map(report: dict[str, Any], path, task: str = "passkey") -> None:
    """Accuracy of `task` by length (x) and depth (y), one panel per method: a PNG."""
    rows = [r for r in report["samples"] if r["task"] == task]
    methods = [m for m in report["settings"]["methods"] if any(r["method"] == m for r in rows)]
    lengths, depths = report["settings"]["lengths"], report["settings"]["depths"]
    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(3.2 * max(1, len(methods)), 3.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for i, depth in enumerate(depths):
            for j, length in enumerate(lengths):
                cell = [
                    r["correct"]
                    for r in rows
                    if r["method"] == method and r["depth"] == depth and r["length"] == length
                ]
                if cell:
                    grid[i, j] = sum(cell) / len(cell)
        ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_title(method)
        ax.set_xlabel("prompt tokens")
    axes[0][0].set_ylabel("depth of the key")
    fig.suptitle(f"{task}: share answered right")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_longbench(report: dict[str, Any], out, command: str) -> list:
    """longbench.json, longbench.md (the command that made them on top) and a heat map per task into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "longbench.json", out / "longbench.md"]
    write_atomically(written[0], lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    text = f"Made by `{command}` on {report['device']}.\n\n{markdown(report)}"
    write_atomically(written[1], lambda tmp: Path(tmp).write_text(text))
    for task in report["summary"]:
        heat_map(report, out / f"{task}.png", task)
        written.append(out / f"{task}.png")
    return written
