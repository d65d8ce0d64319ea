"""Does a short fine-tune of the memory's own numbers move a long-context task that zero training misses?

With its joint softmax, add_memory gives every memory layer one `memory_bias` per head (270 numbers in
all 30 layers of SmolLM2-135M), zero at first: added to the logits of the retrieved entries, it sets how
much a head reads its memory against its window. This trains those numbers and nothing else, on samples
of a `mt longbench` task that the benchmark never reads (seeds from 1,000,000 on: the benchmark's are
seed * 1000 + trial, depths drawn uniformly from 0-1), each read exactly as the benchmark reads it
(`Readers.read`: the prompt memorized, its last window read with gradients), the loss the cross-entropy
of the answer's value (the space before it given). It writes the trained values, which `mt longbench
--memory-parameters` loads, so the fine-tuned memory is scored by the benchmark itself.

    python experiments/longbench_finetune.py --task multikey --length 8192 --steps 40 --write-only \\
        --out experiments/results/longbench-finetune-multikey-write-only
    mt longbench models/smollm2-135m --memory-parameters \\
        experiments/results/longbench-finetune-multikey-write-only/memory_parameters.json ...

Writes OUT/memory_parameters.json (the values, the loss of every step, the settings, the command) and
OUT/finetune.md; a stopped run goes on from OUT/finetune.partial.pt (written after every step).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from memorizing_transformers.atomic import write_atomically
from memorizing_transformers.data.long_tasks import TASKS, make_task
from memorizing_transformers.devices import describe_device
from memorizing_transformers.evaluation.long_context import LongBenchSettings, Readers, sample_tokens, value_start
from memorizing_transformers.loading import load_huggingface

TRAINING_SEEDS = 1_000_000  # the first training sample's seed: far from the benchmark's seed * 1000 + trial


def training_sample(task: str, tokenizer, length: int, step: int) -> tuple[torch.Tensor, int, int, float]:
    """Step `step`'s sample: (ids (1, n) of prompt + answer, answer tokens, where its value starts, depth)."""
    depth = round(random.Random(f"depth:{step}").random(), 2)
    prompt, answer = sample_tokens(tokenizer, make_task(task, tokenizer, length, depth, TRAINING_SEEDS + step))
    return torch.tensor([prompt + answer]), len(answer), value_start(tokenizer, answer), depth


def finetune(args: argparse.Namespace, command: str) -> dict:
    out = Path(args.out)
    model, tokenizer = load_huggingface(args.checkpoint, torch.device(args.device))
    settings = LongBenchSettings(
        tasks=[args.task],
        lengths=[args.length],
        methods=[args.method],
        window=args.window,
        knn_k=args.knn_k,
        write_only=args.write_only,
    )
    readers = Readers(model, settings, args.length)  # the memory method reads a copy of the model: its handle's
    handle = readers.handles[args.method]
    for p in handle.model.parameters():
        p.requires_grad_(False)
    trained = handle.memory_parameters()
    for p in trained.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained.values(), lr=args.lr, weight_decay=0.0)
    recorded = {"settings": vars(args), "steps": []}
    partial = out / "finetune.partial.pt"
    if partial.is_file():
        kept = torch.load(partial, weights_only=False)
        if kept["settings"] != recorded["settings"]:
            raise SystemExit(f"{partial} holds a run with other settings: remove it, or choose another --out")
        handle.load_memory_parameters(kept["parameters"])
        optimizer.load_state_dict(kept["optimizer"])
        recorded["steps"] = kept["steps"]
        print(f"{partial}: going on after {len(recorded['steps'])} steps", file=sys.stderr)
    for step in range(len(recorded["steps"]), args.steps):
        tick = time.perf_counter()
        ids, answer, start, depth = training_sample(args.task, tokenizer, args.length, step)
        logits = readers.read(args.method, ids[:, :-1], answer)  # (answer, vocab)
        loss = F.cross_entropy(logits[start:], ids[0, -answer + start :].to(logits.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recorded["steps"].append({"depth": depth, "loss": loss.item(), "seconds": time.perf_counter() - tick})
        state = {
            "settings": recorded["settings"],
            "steps": recorded["steps"],
            "parameters": {name: p.detach().cpu() for name, p in trained.items()},
            "optimizer": optimizer.state_dict(),
        }
        write_atomically(partial, lambda tmp, state=state: torch.save(state, tmp))
        print(f"step {step + 1}/{args.steps} depth {depth}: loss {loss.item():.3f}", file=sys.stderr)
    return {
        "command": command,
        "device": describe_device(next(model.parameters()).device),
        **recorded,
        "parameters": {name: p.detach().cpu().tolist() for name, p in trained.items()},
    }


def markdown(result: dict) -> str:
    steps = result["steps"]
    losses = [s["loss"] for s in steps]
    quarter = max(1, len(losses) // 4)  # a quarter of the steps
    values = [v for vs in result["parameters"].values() for v in vs]
    per_layer = {name.split(".self_attn")[0]: sum(vs) / len(vs) for name, vs in result["parameters"].items()}
    lines = [
        f"Made by `{result['command']}` on {result['device']}.",
        "",
        f"{len(steps)} steps in {sum(s['seconds'] for s in steps) / 60:.1f} minutes; the value's loss, mean of the "
        f"first {quarter} steps {sum(losses[:quarter]) / quarter:.3f}, of the last {quarter} "
        f"{sum(losses[-quarter:]) / quarter:.3f}.",
        f"The {len(values)} trained numbers: from {min(values):+.3f} to {max(values):+.3f}, "
        f"mean {sum(values) / len(values):+.3f}.",
        "",
        "| layer | mean memory_bias over its heads |",
        "|---|---:|",
        *(f"| {name} | {mean:+.3f} |" for name, mean in per_layer.items()),
        "",
        "| step | depth | loss |",
        "|---:|---:|---:|",
        *(f"| {i + 1} | {s['depth']} | {s['loss']:.3f} |" for i, s in enumerate(steps)),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="models/smollm2-135m")
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", choices=TASKS, default="multikey")
    parser.add_argument("--length", type=int, default=8192, help="prompt tokens of a training sample")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--method", choices=["memory-true", "memory-fixed"], default="memory-fixed")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--knn-k", type=int, default=32)
    parser.add_argument("--write-only", action="store_true", help="memorize the prompt without searching")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--summarize", action="store_true", help="only rewrite finetune.md from the JSON")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.summarize:
        result = json.loads((out / "memory_parameters.json").read_text())
    else:
        argv = sys.argv[1:] if argv is None else argv
        result = finetune(args, "python experiments/longbench_finetune.py " + shlex.join(argv))
        write_atomically(out / "memory_parameters.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
        (out / "finetune.partial.pt").unlink(missing_ok=True)
    write_atomically(out / "finetune.md", lambda tmp: Path(tmp).write_text(markdown(result)))
    written = [out / "finetune.md"] if args.summarize else [out / "memory_parameters.json", out / "finetune.md"]
    print("wrote " + " and ".join(map(str, written)))


if __name__ == "__main__":
    main()
