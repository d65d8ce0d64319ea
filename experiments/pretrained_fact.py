"""Learning a fact at inference time: can SmolLM2-135M recall a code stated thousands of
tokens earlier, far outside its window, through a retrofitted memory with zero training?

Each trial states a fact ("The access code of vault N is D."), follows it with
`--filler` tokens of standard-library source, and then asks ("The access code of vault
N is"); greedy decoding must produce the digits. Three ways:
- window: only the last `--window` tokens (the fact is out of reach);
- window + memory: the earlier tokens streamed into `add_memory` (joint softmax, every
  layer), then `MemoryHandle.generate` on the last window;
- full context: the whole input at once (the upper bound).

    mt pretrained smollm2 --out models/smollm2-135m
    python experiments/pretrained_fact.py --checkpoint models/smollm2-135m

Writes experiments/results/pretrained_fact.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sysconfig
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memorizing_transformers.atomic import write_atomically
from memorizing_transformers.hf.retrofit import add_memory

RESULTS = Path(__file__).resolve().parent / "results"
FILLER_FILES = ["textwrap.py", "shlex.py", "heapq.py", "bisect.py", "fnmatch.py", "glob.py", "csv.py", "string.py"]


def trials(tokenizer, count: int, filler_tokens: int, seed: int) -> list[dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    out = []
    for i in range(count):
        vault, code = rng.randint(10, 99), str(rng.randint(1000, 9999))
        filler_text = (stdlib / FILLER_FILES[i % len(FILLER_FILES)]).read_text(encoding="utf-8", errors="replace")
        filler = tokenizer(filler_text)["input_ids"][:filler_tokens]
        fact = tokenizer(f"The access code of vault {vault} is {code}.\n")["input_ids"]
        question = tokenizer(f"\n# The access code of vault {vault} is")["input_ids"]
        out.append({"vault": vault, "code": code, "ids": torch.tensor([fact + filler + question])})
    return out


@torch.no_grad()
def run(args: argparse.Namespace) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    handle = add_memory(
        model,
        knn_layers=range(model.config.num_hidden_layers),
        memory_size=args.filler + 512,
        knn_k=args.k,
        memory_combine="joint",
    )
    settings = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    rows = []
    for trial in trials(tokenizer, args.trials, args.filler, args.seed):
        ids = trial["ids"]
        answers = {}
        with handle.disabled():
            last = ids[:, -args.window :]
            answers["window"] = model.generate(last, attention_mask=torch.ones_like(last), **settings)[
                0, last.shape[1] :
            ]
            answers["full_context"] = model.generate(ids, attention_mask=torch.ones_like(ids), **settings)[
                0, ids.shape[1] :
            ]
        handle.reset()
        answers["window_memory"] = handle.generate(ids, window=args.window, **settings)[0, ids.shape[1] :]
        handle.reset()
        row = {"vault": trial["vault"], "code": trial["code"], "tokens": ids.shape[1]}
        for way, new in answers.items():
            text = tokenizer.decode(new)
            row[way] = text
            row[way + "_correct"] = text.strip().startswith(trial["code"])
        print(json.dumps(row))
        rows.append(row)
    return {"settings": vars(args), "rows": rows, "platform": platform.platform()}


def table(results: dict) -> str:
    s, rows = results["settings"], results["rows"]
    ways = [
        ("window", f"window of {s['window']}"),
        ("window_memory", "window + memory"),
        ("full_context", "full context"),
    ]
    lines = [
        f"{len(rows)} facts, each followed by {s['filler']:,} tokens of other text, then asked; greedy, SmolLM2-135M, "
        f"memory in every layer (joint softmax, k {s['k']}, zero training).",
        "",
        "| way | correct | answers |",
        "|---|---:|---|",
    ]
    for key, name in ways:
        correct = sum(r[key + "_correct"] for r in rows)
        answers = "; ".join(f"{r['code']} -> {r[key].strip()[:12]!r}" for r in rows)
        lines.append(f"| {name} | {correct} / {len(rows)} | {answers} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="models/smollm2-135m")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--filler", type=int, default=2048, help="tokens between the fact and the question")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = run(args)
    results["command"] = "python experiments/pretrained_fact.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v != parser.get_default(k)
    )
    out = RESULTS / "pretrained_fact.json"
    write_atomically(out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    text = f"Made by `{results['command'].strip()}` on {results['platform']}.\n\n{table(results)}\n"
    write_atomically(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(text))
    print(text)


if __name__ == "__main__":
    main()
