"""One long document streamed at inference through a memory of 1,048,576 tokens per head.

Batch 1, bf16 storage, the `small` preset (random weights: this measures the mechanics,
not the quality) with its memory layer's capacity raised to 2^20 tokens. The document
is the longest of a corpus's train split, tokenized with the model's tokenizer; the
stream runs past the memory's capacity so that FIFO eviction is exercised too. Reported:
time per segment as the memory fills (median per fill range), the XL-only model's time
per segment measured in the same run as the baseline, the exact backend's time per
segment on the full memory, and the process's peak resident memory.

    python -m benchmarks.long_stream                       # ivf backend, metamath
    python -m benchmarks.long_stream --quick               # 4K memory, random tokens
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memorizing_transformers import MemorizingConfig, MemorizingState, MemorizingTransformer
from memorizing_transformers.data.pipeline import load_tokenized
from memorizing_transformers.devices import describe_device, synchronize
from memorizing_transformers.evaluation.peak_memory import process_memory_bytes
from memorizing_transformers.memory.knn_memory import make_backend

from .common import parse_arguments, write_results


def longest_document(corpus: str, tokenizer, tokens: int) -> torch.Tensor:
    document = max(load_tokenized(corpus, "train", tokenizer), key=lambda d: d.ids.numel())
    if document.ids.numel() < tokens:
        raise ValueError(
            f"the longest {corpus} document ({document.name}) has {document.ids.numel():,} tokens, fewer than "
            f"{tokens:,}"
        )
    return document.ids[:tokens]


@torch.no_grad()
def stream(
    model: MemorizingTransformer, ids: torch.Tensor, device: torch.device, state: MemorizingState | None = None
) -> tuple[list[float], MemorizingState]:
    """Stream `ids` (one document) segment by segment: the wall time of each segment, and the final state."""
    state = state or model.new_state(1)
    length, times = model.config.segment_length, []
    for start in tqdm(range(0, ids.numel(), length), unit="segment", leave=False):
        began = time.perf_counter()
        state = model(ids[None, start : start + length].to(device), state=state).state
        synchronize(device)
        times.append(time.perf_counter() - began)
    return times, state


def main(argv: list[str] | None = None) -> None:
    args, device = parse_arguments(__doc__, argv)
    capacity = 4096 if args.quick else 1 << 20
    # 1,024 keys per IVF list (1,024 lists at 2^20): the lists train once the memory holds
    # 65,536 keys (exact search until then) and each query scans 16 of them.
    config = MemorizingConfig.preset(
        "small",
        memory_size=capacity,
        memory_dtype="bfloat16",
        memory_backend="ivf",
        ivf_list_size=1024,
        **(dict(vocab_size=512, d_model=64, d_ff=128) if args.quick else {}),
    )
    torch.manual_seed(0)
    model = MemorizingTransformer(config).to(device).eval()
    length = config.segment_length
    tokens = capacity + 16 * length  # 16 segments past capacity: the ring evicts
    if args.quick:
        ids = torch.randint(0, config.vocab_size, (tokens,))
    else:
        ids = longest_document("metamath", model.tokenizer, tokens)

    baseline = (
        MemorizingTransformer(MemorizingConfig.from_dict({**config.to_dict(), "knn_layers": ()})).to(device).eval()
    )
    xl_time = statistics.median(stream(baseline, ids[: 32 * length], device)[0][2:])

    began = time.perf_counter()
    times, state = stream(model, ids, device)
    total = time.perf_counter() - began
    memory = next(iter(state.memories.values()))
    ranges = (
        [(0, 65536), (65536, 262144), (262144, capacity), (capacity, tokens)]
        if not args.quick
        else [(0, capacity), (capacity, tokens)]
    )
    by_fill = []
    for lo, hi in ranges:
        picked = times[lo // length : hi // length]
        by_fill.append(
            {
                "tokens_from": lo,
                "tokens_to": hi,
                "median_s": statistics.median(picked),
                "max_s": max(picked),
                "ratio_to_xl": statistics.median(picked) / xl_time,
            }
        )

    for memory_layer in state.memories.values():  # the same full store, searched exactly
        memory_layer.backend = make_backend("exact")
    exact_times, _ = stream(model, ids[-4 * length :], device, state)

    store_bytes = sum(t.numel() * t.element_size() for m in state.memories.values() for t in m.state_dict().values())
    results = {
        "command": "python -m benchmarks.long_stream" + (" --quick" if args.quick else ""),
        "device": describe_device(device),
        "config": config.to_dict(),
        "tokens": tokens,
        "memory_fill": int(memory.fill[0]),
        "total_s": total,
        "tokens_per_s": tokens / total,
        "xl_only_segment_s": xl_time,
        "by_fill": by_fill,
        "exact_full_memory_segment_s": statistics.median(exact_times),
        "store_bytes": store_bytes,
        "peak_resident_bytes": process_memory_bytes("VmHWM"),
        "segment_times": times,
    }
    lines = [
        f"{tokens:,} tokens of one document, batch 1, segments of {length}, memory {capacity:,} tokens per head "
        f"({config.n_heads} heads x {config.head_dim}, bf16, `ivf` with {config.ivf_list_size} keys per list, "
        f"nprobe {config.ivf_nprobe}), filled to {results['memory_fill']:,}; "
        f"{total:.0f} s in all ({results['tokens_per_s']:,.0f} tokens/s).",
        "",
        "| memory holds (tokens) | median s / segment | max s / segment | ratio to XL only |",
        "|---|---:|---:|---:|",
    ]
    for r in by_fill:
        lines.append(
            f"| {r['tokens_from']:,} to {r['tokens_to']:,} | {r['median_s']:.3f} | {r['max_s']:.3f} | "
            f"{r['ratio_to_xl']:.2f}x |"
        )
    lines += [
        f"| XL only (baseline, same run) | {xl_time:.3f} | | 1.00x |",
        f"| full, `exact` backend | {results['exact_full_memory_segment_s']:.3f} | | "
        f"{results['exact_full_memory_segment_s'] / xl_time:.2f}x |",
        "",
        f"Stored keys and values: {store_bytes / 2**20:,.0f} MiB; peak resident memory of the process: "
        f"{results['peak_resident_bytes'] / 2**30:.2f} GiB.",
    ]
    text = "\n".join(lines)
    print(text)
    write_results("long_stream-quick" if args.quick else "long_stream", results, text, Path(args.out))


if __name__ == "__main__":
    main()
