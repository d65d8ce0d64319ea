"""What a retrofitted memory costs a pretrained model at inference: memorizing a long input and
generating after it, against the model alone, in the same run.

For each memory set-up (which layers, which search backend, which storage dtype): the time to
memorize TOKENS tokens through a sliding window (`MemoryHandle.memorize`), against the model's
own forward pass over the same tokens, window by window; with the full memory, the time to the
first generated token (the prompt's last window read through the memory) and per token after it,
against generating from the window alone; and the growth of the process's resident
memory while memorizing, beside the size of the stores. The set-ups and the plain forward pass
are timed in rounds, one after the other, so that a slow spell of the machine falls on all.

    python -m benchmarks.retrofit --checkpoint models/smollm2-135m --tokens 16384
    python -m benchmarks.retrofit --quick                          # a tiny random Llama, seconds
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from memorizing_transformers.devices import describe_device
from memorizing_transformers.evaluation.peak_memory import PeakMemory
from memorizing_transformers.hf.retrofit import add_memory

from .common import parse_arguments, write_results

GENERATED = 16  # tokens generated after the memorized input


def setups(layers: int) -> dict[str, dict]:
    """Memory in every layer, or in every 5th; exact search in float32, or IVF over bfloat16 keys."""
    every_fifth = list(range(layers - 1, -1, -5))[::-1]
    return {
        "all layers, exact": dict(knn_layers=list(range(layers))),
        "all layers, ivf, bf16": dict(
            knn_layers=list(range(layers)), memory_backend="ivf", memory_dtype=torch.bfloat16
        ),
        f"layers {every_fifth}, exact": dict(knn_layers=every_fifth),
        f"layers {every_fifth}, ivf, bf16": dict(
            knn_layers=every_fifth, memory_backend="ivf", memory_dtype=torch.bfloat16
        ),
    }


@torch.no_grad()
def plain_forward(model: PreTrainedModel, ids: torch.Tensor, window: int) -> float:
    began = time.perf_counter()
    for start in range(0, ids.shape[1], window):
        model(ids[:, start : start + window], logits_to_keep=1)
    return time.perf_counter() - began


@torch.no_grad()
def generation_times(generate) -> tuple[float, float]:
    """generate(n) makes n new tokens after the prompt's window. Returns the seconds to the first
    (the window read, then one token; the faster of two tries) and the seconds per token after it
    (the difference between making 1 + GENERATED tokens and making one, over GENERATED)."""
    first = float("inf")
    for _ in range(2):
        began = time.perf_counter()
        generate(1)
        first = min(first, time.perf_counter() - began)
    began = time.perf_counter()
    generate(1 + GENERATED)
    return first, (time.perf_counter() - began - first) / GENERATED


def main(argv: list[str] | None = None) -> None:
    args, device = parse_arguments(
        __doc__, argv, model_keys=True, extra=[("--tokens", int, 16384), ("--rounds", int, 2)]
    )
    if not (args.quick or args.checkpoint):
        sys.exit("benchmarks.retrofit: give --checkpoint MODEL_FOLDER (e.g. models/smollm2-135m), or --quick")
    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import tiny_llama

        base, tokens, window, rounds = tiny_llama(max_position_embeddings=4096).to(device), 512, 64, 1
    else:
        base = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).to(device).eval()
        tokens, window, rounds = args.tokens, 512, args.rounds
    layers = base.config.num_hidden_layers
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (1, tokens), generator=generator).to(device)
    prompt = ids[:, -window:]

    def options(n: int) -> dict:
        return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    handles = {
        name: add_memory(copy.deepcopy(base), memory_size=tokens, **setup) for name, setup in setups(layers).items()
    }

    plain_s: list[float] = []
    rows = {name: {"memorize_s": [], "peak_growth_bytes": 0} for name in handles}
    for _ in range(rounds):
        plain_s.append(plain_forward(base, ids, window))
        for name, handle in handles.items():
            handle.reset()
            with PeakMemory(device) as peak:
                began = time.perf_counter()
                handle.memorize([ids[:, :-window]], window=window)
                rows[name]["memorize_s"].append(time.perf_counter() - began)
            rows[name]["peak_growth_bytes"] = max(rows[name]["peak_growth_bytes"], peak.peak_bytes)
    window_first_s, window_token_s = generation_times(
        lambda n: base.generate(prompt, attention_mask=torch.ones_like(prompt), **options(n))
    )
    plain = statistics.median(plain_s) * (tokens - window) / tokens  # over the tokens memorized
    results_rows = []
    for name, handle in handles.items():
        memorize = statistics.median(rows[name]["memorize_s"])
        first_s, token_s = generation_times(lambda n: handle.generate(prompt, window=window, **options(n)))
        stores = sum(
            t.numel() * t.element_size()
            for layer in handle.layers.values()
            if layer.memory is not None
            for t in layer.memory.state_dict().values()
        )
        results_rows.append(
            {
                "setup": name,
                "memorize_s": memorize,
                "memorize_s_all": rows[name]["memorize_s"],
                "tokens_per_s": (tokens - window) / memorize,
                "ratio_to_plain_forward": memorize / plain,
                "first_token_ms": 1e3 * first_s,
                "ratio_to_window_first_token": first_s / window_first_s,
                "generate_ms_per_token": 1e3 * token_s,
                "ratio_to_window_generation": token_s / window_token_s,
                "store_bytes": stores,
                "peak_growth_bytes": rows[name]["peak_growth_bytes"],
            }
        )
    results = {
        "command": "python -m benchmarks.retrofit "
        + ("--quick" if args.quick else f"--checkpoint {args.checkpoint} --tokens {tokens} --rounds {rounds}"),
        "device": describe_device(device),
        "model": type(base).__name__ + ("" if args.quick else f" ({args.checkpoint})"),
        "tokens": tokens,
        "window": window,
        "plain_forward_s": plain,
        "plain_tokens_per_s": (tokens - window) / plain,
        "window_first_token_ms": 1e3 * window_first_s,
        "window_generate_ms_per_token": 1e3 * window_token_s,
        "rows": results_rows,
    }
    lines = [
        f"{results['model']}: {tokens - window:,} random tokens memorized through a {window}-token window; the "
        f"model's own forward pass over them takes {plain:.1f} s ({results['plain_tokens_per_s']:,.0f} tokens/s); "
        f"greedy generation from the window alone: the first token (the window read) in "
        f"{results['window_first_token_ms']:.1f} ms, then {results['window_generate_ms_per_token']:.1f} ms per token.",
        "",
        "| memory | memorize (s) | tokens/s | over the plain forward | first token (ms) | over the window's | "
        "then (ms / token) | over the window's | stores (MiB) | resident growth (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results_rows:
        lines.append(
            f"| {r['setup']} | {r['memorize_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['ratio_to_plain_forward']:.2f}x | "
            f"{r['first_token_ms']:.1f} | {r['ratio_to_window_first_token']:.2f}x | "
            f"{r['generate_ms_per_token']:.1f} | {r['ratio_to_window_generation']:.2f}x | "
            f"{r['store_bytes'] / 2**20:.0f} | {r['peak_growth_bytes'] / 2**20:.0f} |"
        )
    write_results("retrofit-quick" if args.quick else "retrofit", results, "\n".join(lines), Path(args.out))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
