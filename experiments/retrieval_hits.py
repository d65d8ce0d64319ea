"""Does the search find what the next token needs? The memory's retrieval against chance, layer by
layer, in a model trained here and in SmolLM2-135M.

A memory can only pay if its search returns entries that help the prediction. For each query and
head this counts whether the k entries found include one that *holds the answer* (the token the
query's prediction needs) or *continues the query* (the answer right after the query's own token,
the match an induction head makes), beside the chance that k entries drawn at random from the
memory would, and the weight the head's readout gives the entries found
(memorizing_transformers/evaluation/retrieval.py).

The models, each given a memory of `--memory-size` entries in one layer at a time, with no training
(a layer's queries and keys come from the layers below it, which a memory in that layer does not
change): the vanilla pre-trainings of the grids (experiments/grid.py; their weights are committed
beside their JSON), with segments of 128 and an XL cache of 128 as the grids' memory rows read; the
grid runs given with `--runs` (memory models fine-tuned from them) at their own memory layers, a run
with no memory (another pre-training of the corpus, e.g. table4-proofs-2048/pretrain) at `--layers`; and
SmolLM2-135M (`make smollm2`) with a 512-token window, for the layers given with `--smollm2-layers`.
Documents: the first `--documents` test documents of `--corpus` holding at least `--tokens` tokens
under the corpus's tokenizer, each cut to its first `--tokens` tokens under each model's tokenizer.

    python experiments/retrieval_hits.py --threads 1
    python experiments/retrieval_hits.py --summarize

Writes experiments/results/retrieval_hits-CORPUS.json and .md; cases measured before are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from memorizing_transformers import MemorizingTransformer
from memorizing_transformers.atomic import write_atomically
from memorizing_transformers.data.corpora import load_corpus
from memorizing_transformers.data.pipeline import load_tokenized
from memorizing_transformers.evaluation.inspect import inspect_ids, inspect_pretrained_ids
from memorizing_transformers.evaluation.retrieval import FIELDS, KINDS, retrieval_hits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid import named_run, weights_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PRETRAININGS = {"proofs": "table4-proofs", "pycode": "table4-pycode-2048", "books": "table4-books"}
WINDOW = 512  # a Hugging Face model's window


def documents(corpus: str, tokenizer, count: int, tokens: int) -> list[tuple[str, str, torch.Tensor]]:
    """(name, text, ids) of the first `count` test documents holding at least `tokens` tokens."""
    texts = {doc.name: doc.text for doc in load_corpus(corpus, "test")}
    chosen = [d for d in load_tokenized(corpus, "test", tokenizer) if d.ids.numel() >= tokens][:count]
    if len(chosen) < count:
        raise ValueError(f"{corpus} has {len(chosen)} test documents of {tokens:,} tokens or more, fewer than {count}")
    return [(d.name, texts[d.name], d.ids[:tokens]) for d in chosen]


def summed(rows: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per head, the documents' figures pooled, each document weighted by its queries."""
    pooled = []
    for heads in zip(*rows):
        queries = sum(h["queries"] for h in heads)
        head: dict[str, Any] = {"head": heads[0]["head"], "queries": queries}
        for kind in KINDS:
            head[kind] = {}
            for field in heads[0][kind]:
                values = [(h[kind][field], h["queries"]) for h in heads if not math.isnan(h[kind][field])]
                weight = sum(q for _, q in values)
                head[kind][field] = sum(v * q for v, q in values) / weight if weight else math.nan
        pooled.append(head)
    return pooled


def run_folder(name: str) -> Path:
    """The final weights of grid run GRID/RUN, kept beside its result by experiments/grid.py."""
    folder = weights_dir(*named_run(name), RESULTS / "grids")
    if not (folder / "config.json").is_file():
        raise SystemExit(f"error: {name}'s final weights were not kept ({folder} is missing)")
    return folder


def own_case(folder: Path, layer: int, memory_size: int, k: int, docs) -> list[dict[str, Any]]:
    """Per head, the pooled `retrieval_hits` of a model trained here (a saved folder), given a memory in
    `layer` and read with segments of 128 and an XL cache of 128."""
    trained = MemorizingTransformer.from_pretrained(folder)
    changes = dict(segment_length=128, xl_length=128, knn_layers=(layer,), memory_size=memory_size, knn_k=k)
    model = MemorizingTransformer(dataclasses.replace(trained.config, **changes), tokenizer=trained.tokenizer)
    model.take_weights(trained)
    return summed([retrieval_hits(ids, inspect_ids(model, ids, top=k)) for _, _, ids in docs])


def hf_case(checkpoint: str | Path, layer: int, memory_size: int, k: int, docs, tokens: int) -> list[dict[str, Any]]:
    """The same for a Hugging Face model (SmolLM2) given a memory with `add_memory`, read through a
    512-token window; each document's text cut to its first `tokens` tokens under the model's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memorizing_transformers.hf.retrofit import add_memory

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    handle = add_memory(model, knn_layers=[layer], memory_size=memory_size, knn_k=k)
    per_doc = []
    for _, text, _ in docs:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0, :tokens]
        report = inspect_pretrained_ids(handle, tokenizer, ids, window=WINDOW, layer=layer, top=k)
        per_doc.append(retrieval_hits(ids, report))
    return summed(per_doc)


def cell(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def mean_over_heads(heads: list[dict[str, float]], field: str) -> float:
    """The mean of `field` over the heads that have it (NaN where a head's queries never met the case)."""
    values = [h[field] for h in heads if not math.isnan(h[field])]
    return sum(values) / len(values) if values else math.nan


def table(result: dict[str, Any]) -> str:
    lines = [
        f"Made by {', then '.join(f'`{command}`' for command in result['commands'])} "
        f"({result['threads']} threads): {result['corpus']}, "
        f"{len(result['documents'])} test documents, their first {result['tokens']:,} tokens; a memory of "
        f"{result['memory_size']:,} entries in one layer at a time, k = {result['k']}, no training for it "
        "(a run fine-tuned with a memory: at its own memory layer, as trained).",
        "",
        "Per layer and kind of entry, the mean over heads, each over the queries whose memory holds an entry "
        "of the kind (`in memory`: their share of all queries): the share of the k entries found that are of "
        "the kind against their share of the memory (a random draw's; the best head's in brackets), the ratio "
        "of the two (above 1: the search finds them more often than chance), the share of queries whose k "
        "entries include one against the chance of that in k random entries, how often the best-scored entry "
        "found is one (above their share: the scores rank them first, and a sharper readout would weigh them "
        "more), and the weight the readout (a softmax over the entries' scores) puts on them, which a uniform "
        "readout would give their share.",
        "",
        "| model | layer | kind | in memory | share of entries found | of memory | ratio | any found | chance "
        "| best entry | readout weight |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in result["cases"]:
        for kind in KINDS:
            heads = [h[kind] for h in case["heads"]]

            def mean(field: str, heads: list[dict[str, float]] = heads) -> float:
                return mean_over_heads(heads, field)

            best = max(heads, key=lambda h: -1.0 if math.isnan(h["share"]) else h["share"])
            lines.append(
                f"| {case['model']} | {case['layer']} | {kind} | {cell(mean('in_memory'))} | "
                f"{cell(mean('share'), 3)} ({cell(best['share'], 3)}) | {cell(mean('base_rate'), 3)} | "
                f"{cell(mean('share') / mean('base_rate'), 1)}x | {cell(mean('found'))} | {cell(mean('chance'))} | "
                f"{cell(mean('best'), 3)} | {cell(mean('weight'), 3)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="proofs", choices=sorted(PRETRAININGS))
    parser.add_argument("--documents", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--memory-size", type=int, default=8192)
    parser.add_argument("--knn-k", type=int, default=32)
    parser.add_argument("--layers", default="0,1,2,3", help="layers of the grid's model to give the memory")
    parser.add_argument(
        "--runs", nargs="*", default=[], metavar="GRID/RUN", help="grid runs whose final weights were kept, too"
    )
    parser.add_argument("--smollm2", default="models/smollm2-135m", help="SmolLM2's folder (skipped if absent)")
    parser.add_argument("--smollm2-layers", default="2,7,14,18,20,25")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--summarize", action="store_true", help="only rewrite the .md from the .json")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    path = out / f"retrieval_hits-{args.corpus}.json"
    result = json.loads(path.read_text()) if path.is_file() else None
    if not args.summarize:
        pretraining = f"{PRETRAININGS[args.corpus]}/pretrain"
        docs = documents(
            args.corpus,
            MemorizingTransformer.from_pretrained(run_folder(pretraining)).tokenizer,
            args.documents,
            args.tokens,
        )
        settings = {
            "corpus": args.corpus,
            "documents": [name for name, _, _ in docs],
            "tokens": args.tokens,
            "memory_size": args.memory_size,
            "k": args.knn_k,
            "kinds": list(KINDS),
            "fields": list(FIELDS),
        }
        if result is None or any(result.get(key) != value for key, value in settings.items()):
            result = {**settings, "cases": []}
        given = ("corpus", "documents", "tokens", "memory_size", "knn_k", "layers", "smollm2", "smollm2_layers", "out")
        flags = [
            f"--{n.replace('_', '-')} {getattr(args, n)}" for n in given if getattr(args, n) != parser.get_default(n)
        ]
        flags += [f"--runs {' '.join(args.runs)}"] if args.runs else []
        command = " ".join(["python experiments/retrieval_hits.py", *flags])
        # Each invocation adds the cases it lacks: the JSON lists every command that added some.
        commands = result.get("commands", [])
        result["commands"] = commands + [command] * (command not in commands)
        result["threads"] = torch.get_num_threads()
        done = {(c["model"], c["layer"]) for c in result["cases"]}
        layers = [int(layer) for layer in args.layers.split(",")]
        todo = [(pretraining, layer) for layer in layers]
        for run in args.runs:  # fine-tuned memory models at their own memory layers, other models at --layers
            config = MemorizingTransformer.from_pretrained(run_folder(run)).config
            todo += [(run, layer) for layer in config.memory_layer_indices or layers]
        if Path(args.smollm2).is_dir():
            todo += [("SmolLM2-135M", int(layer)) for layer in args.smollm2_layers.split(",")]
        for model_name, layer in todo:
            if (model_name, layer) in done:
                continue
            started = time.perf_counter()
            if model_name == "SmolLM2-135M":
                heads = hf_case(args.smollm2, layer, args.memory_size, args.knn_k, docs, args.tokens)
                window = f"window {WINDOW}"
            else:
                heads = own_case(run_folder(model_name), layer, args.memory_size, args.knn_k, docs)
                window = "segment 128 + XL 128"
            case = {"model": model_name, "window": window, "heads": heads, "layer": layer}
            result["cases"].append({**case, "seconds": time.perf_counter() - started})
            write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
            print(f"{model_name} layer {layer}: {time.perf_counter() - started:.0f} s", flush=True)
        write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))  # the commands
    if result is None:
        sys.exit(f"error: {path} does not exist: run without --summarize first")
    write_atomically(path.with_suffix(".md"), lambda tmp: Path(tmp).write_text(table(result)))
    print(table(result))


if __name__ == "__main__":
    main()
