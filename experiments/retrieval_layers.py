"""Which layers' memories find the passkey? SmolLM2-135M, zero training, memory in every layer.

A passkey prompt (the `mt longbench` format, the same sample as its trial 0) is read through a
`--window`-token window, everything before the last window memorized; while the last window
is read, every layer's retrieval is recorded. For the queries that predict the answer's digits,
each head's attention mass on the needle's tokens in memory is measured: its share of the
joint softmax that went to the memory, times the part of the memory's softmax on retrieved
entries that lie in the needle ("The pass key is 12345."). Each layer's share of the answer's
attention that went to the memory at all is recorded too, also where the needle lies in the
last window (depth 1), where the memory can only distract. Layers are ranked by their best
head's mass: a memory in the top layers of that ranking is what the check run of `mt longbench
--knn-layers ...` (the command is written beside the table, on other samples: `--seed 1`) then
tests.

With `--write-only` the prompt is memorized without searching (`memorize(search=False)`, each
call reading again `--write-overlap` tokens before those it stores), and each layer's share of
retrieved entries that the call storing them read among its first 4 tokens (with almost no
context: attention sinks) is measured too.

With `--task multikey` (RULER's niah_multikey: four needles "One of the special magic numbers
for <word> is: <seven digits>.", one asked) the mass on the needles not asked is measured
beside the asked one's, and the page says whether the model's prediction is another needle's
value. `--seed S` reads the samples `mt longbench --seed S` reads.

    python experiments/retrieval_layers.py --checkpoint models/smollm2-135m --length 16384 --depths 0,0.5

Writes experiments/results/retrieval-layers-smollm2/retrieval_layers.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memorizing_transformers.atomic import write_atomically
from memorizing_transformers.data.long_tasks import make_task
from memorizing_transformers.devices import describe_device
from memorizing_transformers.evaluation.long_context import answer_score, sample_tokens
from memorizing_transformers.hf.handle import write_overlap
from memorizing_transformers.hf.retrofit import add_memory

RESULTS = Path(__file__).resolve().parent / "results" / "retrieval-layers-smollm2"


def needle_tokens(tokenizer, prompt: str, needle: re.Match) -> torch.Tensor:
    """The positions (n,) of the prompt's tokens that overlap the needle's characters."""
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    return torch.tensor([i for i, (a, b) in enumerate(offsets) if a < needle.end() and b > needle.start()])


SINK = 4  # a call's first tokens, read with (almost) no context
# The sentences a task hides in its filler ("the needles"), as data.long_tasks writes them.
NEEDLES = {"passkey": r"The pass key is (\d+)\.", "multikey": r"One of the special magic numbers for \w+ is: (\d+)\."}


@torch.no_grad()
def needle_mass(
    model,
    tokenizer,
    length: int,
    depth: float,
    window: int,
    knn_k: int,
    positions: str,
    search: bool = True,
    overlap: int | None = None,
    task: str = "passkey",
    seed: int = 0,
) -> dict:
    """Per layer and head, the attention mass the answer's queries give the asked needle through memory
    (and, for multikey, the needles not asked); per layer, the share of their attention that went to
    the memory and the share of their retrieved entries that the memorizing call which stored them
    had read among its first SINK tokens (`memorize(search=search, overlap=overlap)`). The sample is
    `mt longbench --seed seed`'s first trial."""
    sample = make_task(task, tokenizer, length, depth, seed * 1000)
    prompt, answer = sample_tokens(tokenizer, sample)
    ids = torch.tensor([prompt + answer])[:, :-1]  # what predicts every answer token
    found = list(re.finditer(NEEDLES[task], sample.prompt))
    asked = needle_tokens(tokenizer, sample.prompt, next(m for m in found if m[1] == sample.answer))
    others = [needle_tokens(tokenizer, sample.prompt, m) for m in found if m[1] != sample.answer]
    split = ids.shape[1] - window
    layers = model.config.num_hidden_layers
    handle = add_memory(
        copy.deepcopy(model), knn_layers=list(range(layers)), memory_size=ids.shape[1], knn_k=knn_k, positions=positions
    )
    tick = time.perf_counter()
    handle.memorize([ids[:, :split]], window=window, search=search, overlap=overlap)  # slot i holds token i
    read_again = 0 if search else write_overlap(window, overlap)  # what a later call reads before what it stores
    stride = window - read_again
    without_context = torch.zeros(ids.shape[1], dtype=torch.bool)  # stored by a call among its first SINK tokens
    without_context[:SINK] = True
    for start in range(stride, split, stride) if read_again < SINK else ():
        without_context[start + read_again : start + SINK] = True
    with ExitStack() as stack:
        records = {i: stack.enter_context(layer.retrieved.record()) for i, layer in handle.layers.items()}
        logits = handle.stream(ids[:, split:], window=window)
    seconds = time.perf_counter() - tick
    answered, logprob = answer_score(logits[0, -len(answer) :].float(), torch.tensor(answer))
    top = ids.shape[1] - 1
    in_asked, in_others = torch.zeros(ids.shape[1], dtype=torch.bool), torch.zeros(ids.shape[1], dtype=torch.bool)
    in_asked[asked] = True
    for needle in others:
        in_others[needle] = True
    mass, others_mass, memory_share, sink_share = [], [], [], []
    for layer in range(layers):
        (call,) = records[layer]  # the last window is read in one call
        slots, logits_mem, valid, share = (
            call[name][0, :, -len(answer) :] for name in ("slots", "logits", "valid", "share")
        )
        probs = torch.softmax(logits_mem.masked_fill(~valid, float("-inf")), dim=-1) * valid  # (heads, queries, k)
        for tokens, out in ((in_asked, mass), (in_others, others_mass)):
            on_needle = (probs * tokens[slots.clamp(max=top)]).sum(-1)  # (heads, queries)
            out.append((share * on_needle).mean(dim=-1).tolist())  # (heads,) averaged over the answer's queries
        memory_share.append(float(share.mean()))
        sink_share.append(float(without_context[slots[valid]].float().mean()))
    return {
        "task": task,
        "depth": depth,
        "tokens": ids.shape[1],
        "needle_tokens": asked.tolist(),
        "in_window": int(asked.min()) >= split,
        "answered": answered,
        "predicted": tokenizer.decode(logits[0, -len(answer) :].argmax(dim=-1)),
        "answer": sample.answer,
        "other_answers": [m[1] for m in found if m[1] != sample.answer],
        "others_in_memory": sum(int(needle.max()) < split for needle in others),
        "answer_logprob": logprob,
        "seconds": seconds,
        "mass": mass,
        "others_mass": others_mass,
        "memory_share": memory_share,
        "retrieved_without_context": sink_share,
    }


def check_command(checkpoint: str, positions: str, layers: list[int]) -> str:
    """The `mt longbench` run that tests a memory in `layers` only, on other samples (`--seed 1`)."""
    return (
        f"mt longbench {checkpoint} --out experiments/results/longbench-smollm2-passkey-top{len(layers)} "
        f"--tasks passkey --lengths 16384,32768 --depths 0,0.5,1 --trials 1 --seed 1 "
        f"--methods window,memory-{positions} --knn-layers {','.join(map(str, layers))} --device cpu"
    )


def summary(result: dict) -> str:
    """The Markdown page of a result: the layers ranked, and the check run of each subset."""
    settings, rows, best = result["settings"], result["rows"], result["best_head_mass"]
    depths = ", ".join(f"{row['depth']:g}" for row in rows)
    task, seed = settings.get("task", "passkey"), settings.get("seed", 0)
    write_only = settings.get("write_only", False)
    overlap = settings.get("write_overlap")
    flags = "" if task == "passkey" else f" --task {task}"
    flags += f" --seed {seed}" if seed else ""
    flags += (" --write-only" + ("" if overlap is None else f" --write-overlap {overlap}")) if write_only else ""
    if Path(settings["out"]).resolve() != RESULTS:
        flags += f" --out {settings['out']}"
    memorized = (
        f", memorized without searching, windows overlapping by {write_overlap(settings['window'], overlap)}"
        if write_only
        else ""
    )
    lines = [
        f"Made by `python experiments/retrieval_layers.py --checkpoint {settings['checkpoint']} --length "
        f"{settings['length']} --depths {settings['depths']} --positions {settings['positions']}{flags}` "
        f"on {result['device']}.",
        "",
        f"The {TASK_NAMES[task]} at {settings['length']:,} tokens, depths {depths}, memory in every layer "
        f"({settings['positions']} positions, k {settings['knn_k']}, window {settings['window']}{memorized}); "
        "answered: "
        + ", ".join(f"depth {row['depth']:g} {'yes' if row['answered'] else 'no'}" for row in rows)
        + ". Attention mass of the answer's queries on the needle through memory, the best head of each layer "
        f"(the lower of the depths{'' if len(ranked_rows(rows)) == len(rows) else ' where the needle is in memory'})"
        ", layers ranked:",
        "",
        "| rank | layer | needle mass, best head | "
        + " | ".join(f"depth {row['depth']:g}, best head" for row in rows)
        + " |",
        "|---:|---:|---:|" + "---:|" * len(rows),
    ]
    for rank, layer in enumerate(result["ranked"], 1):
        per_depth = " | ".join(f"{max(row['mass'][layer]):.3f}" for row in rows)
        lines.append(f"| {rank} | {layer} | {best[layer]:.3f} | {per_depth} |")
    if "memory_share" in rows[0]:
        lines += ["", *answers(rows), ""]
        others = task != "passkey"
        lines.append(
            "Per layer, the share of the answer's attention that went to the memory (all heads)"
            + (" and the best head's mass through memory on the asked needle / on those not asked" if others else "")
            + ":"
        )
        lines += ["", "| layer | " + " | ".join(f"depth {row['depth']:g}" for row in rows) + " |"]
        lines += ["|---:|" + "---:|" * len(rows)]
        for layer in range(len(rows[0]["mass"])):
            cells = [
                f"{row['memory_share'][layer]:.2f}"
                + (f"; {max(row['mass'][layer]):.2f} / {max(row['others_mass'][layer]):.2f}" if others else "")
                for row in rows
            ]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    if write_only:
        lines += [
            "",
            f"Share of the answer's retrieved entries that the call storing them read among its first {SINK} tokens:",
            "",
        ]
        lines += ["| layer | " + " | ".join(f"depth {row['depth']:g}" for row in rows) + " |"]
        lines += ["|---:|" + "---:|" * len(rows)]
        for layer in range(len(rows[0]["mass"])):
            lines.append(
                f"| {layer} | " + " | ".join(f"{row['retrieved_without_context'][layer]:.2f}" for row in rows) + " |"
            )
        for row in rows:
            shares = row["retrieved_without_context"]
            lines.append("")
            lines.append(
                f"Depth {row['depth']:g}: more than half in {sum(x > 0.5 for x in shares)} of {len(shares)} layers; "
                f"answer log-likelihood {row['answer_logprob']:.3f} per token."
            )
    # The check runs memorize with search, the passkey, on other samples (seed 1) than the ranking's.
    for top in [] if write_only or task != "passkey" or seed else settings["top"]:
        layers = sorted(result["ranked"][:top])
        lines += ["", f"The {top} layers ranked first, {layers}, are checked on other samples by:", ""]
        lines.append(f"    {check_command(settings['checkpoint'], settings['positions'], layers)}")
    return "\n".join(lines) + "\n"


TASK_NAMES = {"passkey": "passkey", "multikey": "multi-key needle"}


def ranked_rows(rows: list[dict]) -> list[dict]:
    """The rows whose asked needle lies in memory (all rows if there is none)."""
    return [row for row in rows if not row.get("in_window")] or rows


def answers(rows: list[dict]) -> list[str]:
    """One line per row: what the model predicted (each answer token the argmax, given the ones before)."""
    lines = []
    for row in rows:
        where = "in the window" if row["in_window"] else "in memory"
        others = row["other_answers"]
        # The first digit predicted, where it is not the answer's but begins needles not asked.
        first = next((c for c in row["predicted"] if c.isdigit()), row["answer"][0])
        mistaken = [value for value in others if value[0] == first != row["answer"][0]]
        lines.append(
            f"- Depth {row['depth']:g}: the asked needle {where}, predicted {row['predicted'].strip()!r} for "
            f"{row['answer']!r} ({row['answer_logprob']:.3f} per token)"
            + (
                f"; {row['others_in_memory']} of {len(others)} other needles in memory, their values "
                + ", ".join(others)
                + ("" if not mistaken else f" (the first digit predicted, {first}, begins {', '.join(mistaken)})")
                if others
                else ""
            )
            + f"; read in {row['seconds']:.0f} s."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="models/smollm2-135m")
    parser.add_argument("--task", choices=sorted(NEEDLES), default="passkey")
    parser.add_argument("--seed", type=int, default=0, help="the samples of `mt longbench --seed`")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--depths", default="0,0.5", help="comma-separated needle depths")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--knn-k", type=int, default=32)
    parser.add_argument("--positions", choices=["true", "fixed"], default="fixed")
    parser.add_argument("--write-only", action="store_true", help="memorize without searching")
    parser.add_argument("--write-overlap", type=int, help="with --write-only: tokens read again per call (window/8)")
    parser.add_argument("--top", default="6,11", help="comma-separated sizes of the subsets the check runs test")
    parser.add_argument("--summarize", action="store_true", help="only rewrite the page from the JSON there")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    path, partial = args.out / "retrieval_layers.json", args.out / "retrieval_layers.partial.json"
    if args.summarize:
        result = json.loads(path.read_text())
        result["settings"]["top"] = [int(n) for n in args.top.split(",")]
    else:
        torch.set_num_threads(args.threads)
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
        settings = vars(args) | {"out": str(args.out), "top": [int(n) for n in args.top.split(",")]}
        del settings["summarize"]
        # Each depth's row is kept as it is measured; a run started again with the same settings skips those done.
        kept = json.loads(partial.read_text()) if partial.is_file() else {}
        rows = kept["rows"] if kept.get("settings") == settings else []
        for depth in [float(d) for d in args.depths.split(",")][len(rows) :]:
            rows.append(
                needle_mass(
                    model,
                    tokenizer,
                    args.length,
                    depth,
                    args.window,
                    args.knn_k,
                    args.positions,
                    search=not args.write_only,
                    overlap=args.write_overlap,
                    task=args.task,
                    seed=args.seed,
                )
            )
            args.out.mkdir(parents=True, exist_ok=True)
            state = json.dumps({"settings": settings, "rows": rows})
            write_atomically(partial, lambda tmp: Path(tmp).write_text(state))
            print(f"depth {depth}: answered {rows[-1]['answered']}, {rows[-1]['seconds']:.0f} s", flush=True)
        layers = len(rows[0]["mass"])
        best = [min(max(row["mass"][layer]) for row in ranked_rows(rows)) for layer in range(layers)]  # the worse depth
        result = {
            "settings": settings,
            "device": describe_device(next(model.parameters()).device),
            "rows": rows,
            "best_head_mass": best,
            "ranked": sorted(range(layers), key=lambda layer: -best[layer]),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    partial.unlink(missing_ok=True)
    (args.out / "retrieval_layers.md").write_text(summary(result))
    print(summary(result))


if __name__ == "__main__":
    main()
