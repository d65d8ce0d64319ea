"""Top-k search: KNNMemory's exact and approximate backends, faiss IndexFlatIP, and matmul.

Exact: one segment's queries (heads x queries x head_dim) searched against M stored keys
per head, top-32, on random unit vectors; compared in the same run with faiss
IndexFlatIP on the same data, with a plain matmul of the same shape (the FLOP ceiling
of exact search), and with the same search on PyTorch's ops alone (no CPU kernel).

Approximate: the `ivf` backend against the exact backend on the same memory, and against
`faiss_ivf` (a faiss IVF index of the same lists and probes): speed-up and recall@32 (the share
of the exact top-32 that it returns), on random unit vectors and, with --checkpoint, on the keys
and queries of a trained model's memory layer (real keys cluster; uniform random vectors in 64
dimensions are the worst case of IVF).

The contenders of a row are timed in interleaved rounds (see common.interleaved); a time
is the median over rounds, a ratio the median of the per-round ratios, with their min and
max in the JSON.

    python -m benchmarks.search                                   # random vectors
    python -m benchmarks.search --checkpoint runs/demo/full/code-memory --corpus code
    python -m benchmarks.search --quick                           # small sizes, seconds
    python -m benchmarks.search --rounds 12                       # more rounds: a narrower interval
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from memorizing_transformers import KNNMemory, MemorizingTransformer
from memorizing_transformers.data.pipeline import load_tokenized
from memorizing_transformers.devices import describe_device
from memorizing_transformers.memory.exact import ExactSearch, block_topk, score_blocks
from memorizing_transformers.runs import resolve_model_dir

from .common import Case, interleaved, parse_arguments, spread, write_results


def random_unit(heads: int, n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(heads, n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


@torch.no_grad()
def model_keys(checkpoint: str, corpus: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit keys of a checkpoint's first memory layer over `size` tokens of a corpus's train
    split (documents back to back), and the queries of the segment after them.

    A memory layer's keys and queries depend only on the layers below it, never on what
    its memory holds, so the stream needs no large memory. Returns (heads, size, head_dim)
    and (heads, segment_length, head_dim).
    """
    model = MemorizingTransformer.from_pretrained(resolve_model_dir(checkpoint)).eval()
    config, layer = model.config, model.config.memory_layer_indices[0]
    length = config.segment_length
    ids = torch.cat([d.ids for d in load_tokenized(corpus, "train", model.tokenizer)])[: size + length]
    if ids.numel() < size + length:
        raise ValueError(f"the {corpus} train split holds {ids.numel():,} tokens, fewer than {size + length:,}")
    captured: list[torch.Tensor] = []
    hook = model.blocks[layer].attn.qkv.register_forward_hook(lambda module, inputs, output: captured.append(output[0]))
    state = model.new_state(1)
    for start in range(0, ids.numel(), length):
        state = model(ids[None, start : start + length], state=state).state
    hook.remove()
    q, k, _ = rearrange(torch.cat(captured), "t (three h d) -> three h t d", three=3, h=config.n_heads)
    return F.normalize(k[:, :size], dim=-1), F.normalize(q[:, size:], dim=-1)


def filled(keys: torch.Tensor, backend: str, device: torch.device) -> KNNMemory:
    heads, size, dim = keys.shape
    memory = KNNMemory(1, heads, dim, size, device=device, backend=backend)
    memory.add(keys[None].to(device), keys[None].to(device))
    return memory


def race(contenders: dict[str, Any], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each contender in each round, interleaved (see common.interleaved)."""
    cases = [Case("ours", name, run, 0) for name, run in contenders.items()]
    return dict(zip(contenders, interleaved(cases, rounds, calls=1, warmup=1, device=device)))


def ratio_fields(name: str, over: list[float], under: list[float]) -> dict[str, float]:
    """name (the median of over / under, per round), name_min and name_max, and the median's 95% interval
    (name_low, name_high)."""
    measured = spread([a / b for a, b in zip(over, under)])
    return {name: measured["median"], **{f"{name}_{end}": measured[end] for end in ("min", "max", "low", "high")}}


def exact_rows(
    sizes: list[int], heads: int, queries: int, dim: int, k: int, repeats: int, device: torch.device
) -> list[dict]:
    rows = []
    for size in sizes:
        keys, q = random_unit(heads, size, dim, 0), random_unit(heads, queries, dim, 1)
        memory = filled(keys, "exact", device)
        torch_ops = copy.copy(memory)  # the same store, searched with PyTorch's ops alone (no CPU kernel)
        torch_ops.backend = ExactSearch(kernel=False)
        q_device = q[None].to(device)
        flops = 2.0 * heads * queries * size * dim
        # The FLOP ceiling: the same product in one matmul, without top-k or masking, into scores allocated
        # once: past 1 GiB of scores (262K keys) a fresh output would be handed back to the system at every
        # call (keep_freed_host_memory keeps up to 1 GiB) and page-fault in again, timing the faults.
        keys_t = memory.keys.transpose(-1, -2)
        scores = torch.empty((*q_device.shape[:-1], size), device=device)
        indices = [faiss.IndexFlatIP(dim) for _ in range(heads)]
        for h, index in enumerate(indices):
            index.add(keys[h].numpy())
        q_np = [np.ascontiguousarray(q[h].numpy()) for h in range(heads)]
        times = race(
            {
                "ours": lambda: memory.search(q_device, k),
                "PyTorch ops": lambda: torch_ops.search(q_device, k),
                "matmul": lambda: torch.matmul(q_device, keys_t, out=scores),
                "faiss flat": lambda: [index.search(q_np[h], k) for h, index in enumerate(indices)],
            },
            repeats,
            device,
        )
        ours, matmul, flat = (statistics.median(times[name]) for name in ("ours", "matmul", "faiss flat"))
        found = memory.search(q_device, k).slots.cpu()
        same = np.mean(
            [
                np.array_equal(np.sort(indices[h].search(q_np[h], k)[1], axis=1), np.sort(found[0, h].numpy(), axis=1))
                for h in range(heads)
            ]
        )
        rows.append(
            {
                "memory_size": size,
                "ours_s": ours,
                "faiss_flat_s": flat,
                "matmul_s": matmul,
                "pytorch_ops_s": statistics.median(times["PyTorch ops"]),
                **ratio_fields("speedup_vs_pytorch_ops", times["PyTorch ops"], times["ours"]),
                **ratio_fields("speedup_vs_faiss_flat", times["faiss flat"], times["ours"]),
                "ours_gflops": flops / ours / 1e9,
                "matmul_gflops": flops / matmul / 1e9,
                **ratio_fields("fraction_of_matmul", times["matmul"], times["ours"]),
                "same_neighbours_as_faiss": float(same),
            }
        )
        print(
            f"exact M={size:>9,}: ours {ours * 1e3:8.1f} ms, faiss flat {flat * 1e3:8.1f} ms, matmul "
            f"{matmul * 1e3:8.1f} ms"
        )
    return rows


def approximate_rows(
    data: str, keys: torch.Tensor, queries: torch.Tensor, sizes: list[int], k: int, repeats: int, device: torch.device
) -> list[dict]:
    rows = []
    q = queries[None].to(device)  # (1, heads, queries, head_dim)
    for size in sizes:
        exact = filled(keys[:, -size:], "exact", device)
        began = time.perf_counter()
        ivf = filled(keys[:, -size:], "ivf", device)
        build = time.perf_counter() - began
        # The same lists and probes in a faiss IVF index (its lists in fp16), the backend faiss_ivf.
        faiss_ivf = filled(keys[:, -size:], "faiss_ivf", device)
        times = race(
            {
                "exact": lambda: exact.search(q, k),
                "ivf": lambda: ivf.search(q, k),
                "faiss": lambda: faiss_ivf.search(q, k),
            },
            repeats,
            device,
        )
        exact_s, ivf_s = statistics.median(times["exact"]), statistics.median(times["ivf"])
        truth = exact.search(q, k).slots
        recall, recall_faiss = (
            float((truth[..., :, None] == m.search(q, k).slots[..., None, :]).any(-1).float().mean())
            for m in (ivf, faiss_ivf)
        )
        rows.append(
            {
                "data": data,
                "queries": "x".join(map(str, queries.shape)),
                "memory_size": size,
                "exact_s": exact_s,
                "ivf_s": ivf_s,
                **ratio_fields("speedup", times["exact"], times["ivf"]),
                "faiss_ivf_s": statistics.median(times["faiss"]),
                **ratio_fields("speedup_vs_faiss_ivf", times["faiss"], times["ivf"]),
                "recall_at_k": recall,
                "recall_at_k_faiss_ivf": recall_faiss,
                "ivf_build_s": build,
                "ivf": repr(ivf.backend),
            }
        )
        print(
            f"{data} M={size:>9,}: exact {exact_s * 1e3:8.1f} ms, ivf {ivf_s * 1e3:8.1f} ms, recall@{k} "
            f"{recall:.3f}, build {build:.1f} s, faiss_ivf {statistics.median(times['faiss']) * 1e3:8.1f} ms"
        )
    return rows


def nprobe_rows(
    keys: torch.Tensor,
    queries: torch.Tensor,
    size: int,
    probes: tuple[int, ...],
    k: int,
    repeats: int,
    device: torch.device,
) -> list[dict]:
    """Recall and time of the `ivf` backend at `size` keys against the lists it probes per
    query (its default, ivf_nprobe 16, among them): the trade-off a smaller scan would buy."""
    q = queries[None].to(device)
    exact, ivf = filled(keys[:, -size:], "exact", device), filled(keys[:, -size:], "ivf", device)
    truth = exact.search(q, k).slots

    def probing(n: int):
        def search():
            ivf.backend.nprobe = n
            return ivf.search(q, k)

        return search

    times = race({"exact": lambda: exact.search(q, k), **{f"nprobe {n}": probing(n) for n in probes}}, repeats, device)
    rows = []
    for n in probes:
        found = probing(n)().slots
        rows.append(
            {
                "memory_size": size,
                "nprobe": n,
                "lists": max(1, size // ivf.backend.list_size),
                "ivf_s": statistics.median(times[f"nprobe {n}"]),
                **ratio_fields("speedup", times["exact"], times[f"nprobe {n}"]),
                "recall_at_k": float((truth[..., :, None] == found[..., None, :]).any(-1).float().mean()),
            }
        )
    return rows


CACHE_BLOCKS = 1 << 21  # the cache-sized score blocks (8 MiB of fp32) the exact search cut on a CPU before


def block_rows(
    shapes: list[tuple[str, int, int, int, int]], dim: int, k: int, repeats: int, device: torch.device
) -> list[dict]:
    """The exact search cut by its rule against cache-sized blocks of CACHE_BLOCKS scores, same store,
    same queries; each shape (label, rows, heads, queries per head, memory size)."""
    rows = []
    for label, batch, heads, queries, size in shapes:
        keys = random_unit(batch * heads, size, dim, 0).view(batch, heads, size, dim)
        memory = KNNMemory(batch, heads, dim, size, device=device)
        memory.add(keys.to(device), keys.to(device))
        q = random_unit(batch * heads, queries, dim, 1).view(batch, heads, queries, dim).to(device)
        rule, cache = ExactSearch(kernel=False), ExactSearch(CACHE_BLOCKS, kernel=False)
        times = race(
            {"rule": lambda: rule.search(memory.store, q, k), "cache": lambda: cache.search(memory.store, q, k)},
            repeats,
            device,
        )
        rows.append(
            {
                "shape": label,
                "memory_size": size,
                "rule_s": statistics.median(times["rule"]),
                "cache_blocks_s": statistics.median(times["cache"]),
                **ratio_fields("time_ratio", times["rule"], times["cache"]),
                "same_scores": bool(
                    torch.equal(rule.search(memory.store, q, k)[0], cache.search(memory.store, q, k)[0])
                ),
            }
        )
        print(f"blocks, {label} at {size:,}: {rows[-1]['time_ratio']:.2f}x the time of blocks of {CACHE_BLOCKS:,}")
    return rows


def topk_rows(shapes: list[tuple[str, int, int, int, int]], k: int, repeats: int, device: torch.device) -> list[dict]:
    """The exact search's top-k of one score block (block_topk) against torch.topk on the same scores,
    the block cut as the search cuts it for each shape (label, rows, heads, queries per head, memory size)."""
    rows = []
    for label, batch, heads, queries, size in shapes:
        pairs, width = score_blocks(batch * heads, queries, size, k)
        generator = torch.Generator().manual_seed(0)
        scores = torch.randn(pairs, queries, min(width, size), generator=generator).to(device)
        times = race({"block": lambda: block_topk(scores, k), "torch": lambda: scores.topk(k, dim=-1)}, repeats, device)
        rows.append(
            {
                "shape": label,
                "memory_size": size,
                "block": list(scores.shape),
                "block_topk_s": statistics.median(times["block"]),
                "torch_topk_s": statistics.median(times["torch"]),
                **ratio_fields("time_ratio", times["block"], times["torch"]),
                "same_values": bool(torch.equal(block_topk(scores, k)[0], scores.topk(k, dim=-1).values)),
            }
        )
        print(f"top-k, {label} at {size:,}: block_topk {rows[-1]['time_ratio']:.2f}x the time of torch.topk")
    return rows


def tables(
    exact: list[dict], approximate: list[dict], settings: dict, probes: list[dict], blocks: list[dict], tops: list[dict]
) -> str:
    lines = [
        f"Exact top-{settings['k']} of {settings['heads']} heads x {settings['queries']} queries x {settings['dim']} "
        "dims, random unit vectors:",
        "",
        "| memory size | ours (ms) | faiss IndexFlatIP (ms) | ours / faiss speed-up | ours GFLOP/s | matmul GFLOP/s "
        "| ours / matmul | same neighbours | PyTorch ops alone (ms) | kernel speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in exact:
        lines.append(
            f"| {r['memory_size']:,} | {r['ours_s'] * 1e3:.1f} | {r['faiss_flat_s'] * 1e3:.1f} | "
            f"{r['speedup_vs_faiss_flat']:.2f}x | "
            f"{r['ours_gflops']:.1f} | {r['matmul_gflops']:.1f} | {r['fraction_of_matmul']:.0%} | "
            f"{r['same_neighbours_as_faiss']:.0%} | {r['pytorch_ops_s'] * 1e3:.1f} | "
            f"{r['speedup_vs_pytorch_ops']:.2f}x |"
        )
    lines += [
        "",
        f"Approximate (`ivf` backend) against exact on the same memory, and against a faiss IVF index of the same "
        f"lists and probes (`faiss_ivf`), top-{settings['k']}:",
        "",
        "| data | queries (heads x n x dim) | memory size | exact (ms) | IVF (ms) | IVF speed-up | "
        f"recall@{settings['k']} | IVF build (s) | faiss IVF (ms) | IVF / faiss IVF speed-up | "
        f"recall@{settings['k']} of faiss IVF |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in approximate:
        lines.append(
            f"| {r['data']} | {r['queries']} | {r['memory_size']:,} | {r['exact_s'] * 1e3:.1f} | "
            f"{r['ivf_s'] * 1e3:.1f} | {r['speedup']:.1f}x | "
            f"{r['recall_at_k']:.3f} | {r['ivf_build_s']:.1f} | {r['faiss_ivf_s'] * 1e3:.1f} | "
            f"{r['speedup_vs_faiss_ivf']:.2f}x | {r['recall_at_k_faiss_ivf']:.3f} |"
        )
    if probes:
        lines += [
            "",
            f"The model's keys at {probes[0]['memory_size']:,}, `ivf` probing more or fewer of its "
            f"{probes[0]['lists']} lists per query (the default: 16):",
            "",
            f"| lists probed | share of the keys scanned | IVF (ms) | speed-up over exact | recall@{settings['k']} |",
            "|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['nprobe']} | {r['nprobe'] / r['lists']:.1%} | {r['ivf_s'] * 1e3:.1f} | {r['speedup']:.1f}x | "
            f"{r['recall_at_k']:.3f} |"
            for r in probes
        ]
    lines += [
        "",
        f"The exact search's score blocks against cache-sized blocks of {CACHE_BLOCKS:,} scores "
        f"(`ExactSearch(block_elements={CACHE_BLOCKS})`), same store and queries, top-{settings['k']}:",
        "",
        "| shape | memory size | the search's blocks (ms) | cache-sized blocks (ms) | time ratio | min-max "
        "| same scores |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['shape']} | {r['memory_size']:,} | {r['rule_s'] * 1e3:.1f} | {r['cache_blocks_s'] * 1e3:.1f} | "
        f"{r['time_ratio']:.2f}x | {r['time_ratio_min']:.2f}-{r['time_ratio_max']:.2f}x | "
        f"{'yes' if r['same_scores'] else 'no'} |"
        for r in blocks
    ]
    lines += [
        "",
        f"The top-{settings['k']} of one score block, cut as the exact search cuts it (queries x slots per "
        "(row, head) pair), random scores: block_topk (the k best groups of 32, then of 8, then top-k) against "
        "torch.topk:",
        "",
        "| shape | memory size | block (pairs x queries x slots) | block_topk (ms) | torch.topk (ms) | time ratio "
        "| min-max | same values |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['shape']} | {r['memory_size']:,} | {' x '.join(f'{n:,}' for n in r['block'])} | "
        f"{r['block_topk_s'] * 1e3:.2f} | {r['torch_topk_s'] * 1e3:.2f} | {r['time_ratio']:.2f}x | "
        f"{r['time_ratio_min']:.2f}-{r['time_ratio_max']:.2f}x | {'yes' if r['same_values'] else 'no'} |"
        for r in tops
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args, device = parse_arguments(__doc__, argv, model_keys=True, extra=[("--rounds", int, 5)])
    sizes = [1024, 4096] if args.quick else [8192, 65536, 262144, 1048576]
    # Up to 5 rounds the median's 95% interval is the rounds' min-max; from 9 on it is narrower (common.spread).
    settings = dict(heads=4, queries=64 if args.quick else 256, dim=64, k=32, repeats=2 if args.quick else args.rounds)
    exact = exact_rows(sizes, device=device, **settings)
    heads, queries, dim, k, repeats = (settings[n] for n in ("heads", "queries", "dim", "k", "repeats"))
    approximate_sizes = sizes[1:]
    approximate = approximate_rows(
        "random unit vectors",
        random_unit(heads, max(approximate_sizes), dim, 0),
        random_unit(heads, queries, dim, 1),
        approximate_sizes,
        k,
        repeats,
        device,
    )
    # A training step's search (4 rows x 4 heads, 256 queries each) and a retrofit window's (SmolLM2's
    # 3 key heads, each read by 3 query heads x 512 tokens).
    shapes = [("training step", 4, 4, 256, n) for n in ([2048] if args.quick else [8192, 65536])]
    shapes += [("retrofit window", 1, 3, 1536, n) for n in ([4096] if args.quick else [32768, 131072])]
    blocks = block_rows(shapes, dim, k, repeats, device)
    tops = topk_rows(shapes, k, repeats, device)
    command = "python -m benchmarks.search" + (" --quick" if args.quick else "")
    command += f" --rounds {args.rounds}" if args.rounds != 5 and not args.quick else ""
    probes = []
    if args.checkpoint:
        keys, model_queries = model_keys(args.checkpoint, args.corpus, max(approximate_sizes))
        approximate += approximate_rows(
            f"model keys ({args.corpus})", keys, model_queries, approximate_sizes, k, repeats, device
        )
        probes = nprobe_rows(keys, model_queries, approximate_sizes[0], (4, 8, 16, 32), k, repeats, device)
        command += f" --checkpoint {args.checkpoint} --corpus {args.corpus}"
    results = {
        "command": command,
        "device": describe_device(device),
        "settings": settings,
        "exact": exact,
        "approximate": approximate,
        "nprobe": probes,
        "blocks": blocks,
        "topk": tops,
    }
    text = tables(exact, approximate, settings, probes, blocks, tops)
    print(text)
    write_results("search-quick" if args.quick else "search", results, text, Path(args.out))


if __name__ == "__main__":
    main()
