import json

import pytest
import torch

from benchmarks import (
    allocator,
    fits,
    long_stream,
    memory_step,
    memory_use,
    retrofit,
    search,
    targets,
    train_step,
)
from benchmarks import compile as compile_step
from benchmarks.common import median_interval
from memorizing_transformers import MemorizingConfig, MemorizingTransformer
from memorizing_transformers.data.streaming import TokenizedDocument


def test_search_benchmark_quick(tmp_path):
    search.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "search-quick.json").read_text())
    assert [r["memory_size"] for r in results["exact"]] == [1024, 4096]
    assert all(r["same_neighbours_as_faiss"] == 1.0 for r in results["exact"])
    # 4,096 keys make 16 IVF lists; nprobe 16 searches them all: exact with the ivf backend, all but the fp16
    # rounding of near-ties with faiss_ivf's half-precision lists.
    [approximate] = results["approximate"]
    assert approximate["memory_size"] == 4096 and approximate["recall_at_k"] == 1.0
    assert approximate["recall_at_k_faiss_ivf"] >= 0.99 and approximate["speedup_vs_faiss_ivf"] > 0
    assert "| random unit vectors | 4x64x64 | 4,096 |" in (tmp_path / "search-quick.md").read_text()
    # The exact search in this device's blocks and in large ones: the same scores, both timed.
    assert [(r["shape"], r["memory_size"]) for r in results["blocks"]] == [
        ("training step", 2048),
        ("retrofit window", 4096),
    ]
    assert all(r["same_scores"] and r["time_ratio"] > 0 for r in results["blocks"])


def test_allocator_benchmark_quick(tmp_path):
    allocator.main(["--quick", "--out", str(tmp_path), "--device", "cpu"])
    results = json.loads((tmp_path / "allocator-quick.json").read_text())
    assert [(r["pair"], r["setting"]) for r in results["runs"]] == [(0, "glibc default"), (0, "keep freed")]
    assert [r["variant"] for r in results["rows"]] == ["XL only", "memory 512 + XL", "memory 2K IVF + XL"]
    assert all(r["keep_over_default"]["median"] > 0 for r in results["rows"])
    assert "| memory 512 + XL |" in (tmp_path / "allocator-quick.md").read_text()


def test_compile_benchmark_quick(tmp_path):
    compile_step.main(["--quick", "--out", str(tmp_path), "--device", "cpu"])
    results = json.loads((tmp_path / "compile-quick.json").read_text())
    assert [r["variant"] for r in results["rows"]] == ["vanilla", "XL only", "memory 512", "memory 2K IVF + XL"]
    for row in results["rows"]:  # each variant timed compiled against eager, or the compiler's error given
        assert row["error"] or row["compiled_over_eager"]["median"] > 0
        assert row["graphs"] > 0
    assert "| memory 2K IVF + XL |" in (tmp_path / "compile-quick.md").read_text()


def test_train_step_benchmark_quick(tmp_path):
    train_step.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "train_step-quick.json").read_text())
    rows = results["configs"]["quick"]["rows"]
    # the exact search's matmul speed, measured beside the steps for the targets' floors
    assert set(results["configs"]["quick"]["search_matmul_gflops"]) == {"512", "2048"}
    assert all(v > 0 for v in results["configs"]["quick"]["search_matmul_gflops"].values())
    # and the same products timed in the steps' rounds, with the floor each puts under its memory row
    floors = results["configs"]["quick"]["search_floors"]
    assert set(floors) == {"512", "2048"}
    for f in floors.values():
        assert f["product_gflops"] > 0 and f["floor"]["median"] > 0 and f["step_over_floor"]["median"] > 0
        assert f["floor"]["low"] <= f["floor"]["median"] <= f["floor"]["high"]
    assert (
        "The exact search's product alone, timed in the same rounds" in (tmp_path / "train_step-quick.md").read_text()
    )
    assert [r["variant"] for r in rows] == [
        "vanilla",
        "XL only",
        "memory 512",
        "memory 2K",
        "memory 2K + XL",
        "memory 2K IVF",
        "memory 2K IVF + XL",
        "vanilla, 1 kv head",
        "XL only, 1 kv head",
        "memory 2K + XL, 1 kv head",
        "memory 2K IVF + XL, 1 kv head",
        "memory 512, PyTorch ops",  # the exact search without the CPU kernel, in the step
    ]
    xl = next(r for r in rows if r["variant"] == "XL only")
    assert xl["ratio_to_xl"] == xl["ratio_to_xl_min"] == xl["ratio_to_xl_max"] == 1.0  # a ratio per round, to itself
    # every variant timed in every round, in the same rounds
    assert all(len(r["round_seconds"]) == results["rounds"] == 3 for r in rows)
    assert all(r["seconds_min"] <= r["seconds"] <= r["seconds_max"] for r in rows)
    # the grids' shape: memories as a stream of documents leaves them, the IVF memory's young rows searched exactly
    documents = results["configs"]["quick documents"]
    assert documents["batch_size"] == 8
    assert [r["variant"] for r in documents["rows"]] == [
        "XL only",
        "memory 512 + XL",
        "memory 2K + XL",
        "memory 2K IVF + XL",
        "memory 512 + XL, PyTorch ops",
    ]


def test_the_documents_configuration_is_the_grid_runs_model():
    config, batch = train_step.grid_model()
    assert (batch, config.segment_length, config.knn_layers, config.memory_size) == (16, 128, (1,), 8192)


def test_staggered_fills_leave_row_i_holding_its_share_of_the_memory():
    mask = train_step.staggered_fills(4, 64, torch.device("cpu"))
    assert mask.sum(dim=1).tolist() == [16, 32, 48, 64]
    assert all(bool(row[: int(row.sum())].all()) for row in mask)  # a prefix, as after a reset


def test_memory_step_benchmark_quick(tmp_path):
    memory_step.main(["--quick", "--out", str(tmp_path)])
    backends = json.loads((tmp_path / "memory_step-quick.json").read_text())["backends"]
    assert sorted(backends) == ["memory 2K", "memory 2K IVF"]
    for rows in backends.values():
        by = {r["part"].strip(): r for r in rows}
        cost = by["the memory's cost (the difference)"]["round_seconds"]
        parts = [by[name]["round_seconds"] for name in ("search", "gather", "write")]
        rest = by["the rest: scoring, combination, backward (by subtraction)"]["round_seconds"]
        # The parts and the rest add up to the memory's cost in every round.
        assert all(abs(sum(p[r] for p in parts) + rest[r] - c) < 1e-9 for r, c in enumerate(cost))
    # Within the exact search, right under "search": the same search on PyTorch's ops alone (on a CPU), its
    # product alone, and with one pass over its scores.
    parts = [r["part"] for r in backends["memory 2K"]]
    at = parts.index("  search")
    assert parts[at + 1 : at + 4] == ["    " + name for name in (memory_step.TORCH_OPS, *memory_step.SEARCH_PRODUCT)]
    assert not any("product" in r["part"] or "PyTorch" in r["part"] for r in backends["memory 2K IVF"])


@pytest.mark.slow
def test_memory_use_benchmark_quick(tmp_path):
    memory_use.main(["--quick", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "memory_use-quick.json").read_text())["rows"]
    assert [(r["dtype"], r["backend"]) for r in rows] == [
        ("float32", "exact"),
        ("float32", "ivf"),
        ("float32", "faiss_ivf"),
        ("bfloat16", "exact"),
        ("bfloat16", "ivf"),
        ("bfloat16", "faiss_ivf"),
    ]
    # A memory can never take less than its keys and values, nor peak below what stays resident.
    assert all(r["bytes_per_token"] >= r["store_bytes_per_token"] for r in rows)
    assert all(r["peak_bytes"] >= r["resident_bytes"] for r in rows)


@pytest.mark.slow
def test_long_stream_benchmark_quick(tmp_path):
    long_stream.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "long_stream-quick.json").read_text())
    assert results["memory_fill"] == 4096 and results["tokens"] == 8192
    assert len(results["segment_times"]) == 8192 // 256


def test_model_keys_are_the_keys_the_model_writes_to_its_memory(tmp_path, monkeypatch):
    config = MemorizingConfig.preset("tiny", vocab_size=50257, memory_size=4096)  # the default tokenizer's vocabulary
    torch.manual_seed(0)
    MemorizingTransformer(config).save_pretrained(tmp_path / "model")
    ids = torch.randint(0, config.vocab_size, (20 * config.segment_length,))
    monkeypatch.setattr(search, "load_tokenized", lambda corpus, split, tokenizer: [TokenizedDocument("doc", ids)])
    size = 10 * config.segment_length
    keys, queries = search.model_keys(str(tmp_path / "model"), "any", size)
    assert keys.shape == (config.n_heads, size, config.head_dim)
    assert queries.shape == (config.n_heads, config.segment_length, config.head_dim)
    model = MemorizingTransformer.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        state = model(ids[None, :size]).state
    stored = state.memories[config.memory_layer_indices[0]].keys[0, :, :size]
    torch.testing.assert_close(keys, stored, rtol=1e-4, atol=1e-5)


def test_targets_table_reads_the_measured_figures(tmp_path):
    def step(variant, ratio, low, high):
        return {
            "variant": variant,
            "ratio_to_xl": ratio,
            "ratio_to_xl_min": low,
            "ratio_to_xl_max": high,
            "seconds": 0.6 * ratio,
            "tokens_per_s": 1700 / ratio,
        }

    def faster(median, low, high):
        return {"median": median, "min": low, "max": high}

    def floor(gflop, median, low, high):
        """An exact search's product timed in the steps' rounds (0.5 s) and the floor it puts under its row."""
        return {
            "gflop": gflop,
            "product_seconds": {"median": 0.5, "min": 0.45, "max": 0.55},
            "product_gflops": gflop / 0.5,
            "floor": {"median": median, "min": low - 0.05, "max": high + 0.05, "low": low, "high": high},
        }

    (tmp_path / "train_step.json").write_text(
        json.dumps(
            {
                "batch_size": 4,
                "rounds": 6,
                "configs": {
                    "reference": {
                        "config": {"n_heads": 4, "segment_length": 256, "head_dim": 64},
                        "rows": [
                            step("vanilla", 0.8, 0.8, 0.8),
                            step("XL only", 1.0, 1.0, 1.0),
                            step("memory 8K", 1.10, 1.05, 1.12),
                            step("memory 64K", 2.50, 2.4, 2.6),
                            step("memory 64K IVF + XL", 1.28, 1.20, 1.36),
                            step("memory 64K IVF", 1.2, 1.1, 1.3),
                        ],
                        "search_floors": {"8192": floor(4.295, 0.9, 0.8, 1.0), "65536": floor(34.36, 1.0, 0.9, 1.1)},
                        "tokens_per_s_vs_popular": {
                            "memory 64K IVF + XL": faster(1.6, 1.52, 1.7),
                            "memory 64K IVF": faster(1.4, 1.3, 1.45),
                            "vanilla": faster(0.98, 0.9, 1.05),
                            "XL only": faster(1.02, 1.01, 1.03),
                            "XL only, 1 kv head": faster(1.2, 1.1, 1.3),
                        },
                    }
                },
            }
        )
    )
    (tmp_path / "search.json").write_text(
        json.dumps(
            {
                "exact": [
                    {"memory_size": 65536, "matmul_gflops": 40.0},
                    {"memory_size": 262144, "speedup_vs_faiss_flat": 2.0, "fraction_of_matmul": 0.75},
                ],
                "approximate": [
                    {"data": "model keys (code)", "memory_size": 65536, "recall_at_k": 0.99, "speedup": 2.0},
                    {"data": "model keys (code)", "memory_size": 262144, "recall_at_k": 0.85, "speedup": 9.0},
                ],
            }
        )
    )
    (tmp_path / "long_stream.json").write_text(
        json.dumps(
            {
                "tokens": 1052672,
                "memory_fill": 1 << 20,
                "config": {"memory_size": 1 << 20},
                "by_fill": [{"median_s": 0.2, "ratio_to_xl": 1.5}],
            }
        )
    )

    def verdicts(search_s: float, exact_s: tuple[float, float] | None = None) -> tuple[list[str], dict[str, str]]:
        """targets.md's lines and verdicts, memory_step having timed the IVF search at `search_s` (and the
        exact search and its product alone at `exact_s`)."""
        parts = [{"part": "step, XL only", "seconds": 0.6}, {"part": "  search", "seconds": search_s}]
        run = {"backends": {"memory 64K IVF": parts}}
        if exact_s is not None:
            run["backends"]["memory 64K"] = [
                {"part": "  search", "seconds": exact_s[0]},
                {"part": "    its product alone (cache-sized blocks)", "seconds": exact_s[1]},
            ]
            run["search_gflop"] = 34.36
        (tmp_path / "memory_step.json").write_text(json.dumps(run))
        targets.main(["--out", str(tmp_path)])
        page = (tmp_path / "targets.md").read_text().splitlines()
        rows = [line for line in page if line.startswith("| ") and not line.startswith("| target |")]
        return page, {line.split(" | ")[0].strip("| "): line.rstrip(" |").split(" | ")[-1] for line in rows}

    page, met = verdicts(0.1)  # IVF floor (0.6 + 0.1) / 0.6 = 1.17x, under the goal
    assert met["step, memory 8K exact / XL only"] == "yes"  # 1.05-1.12, all under 1.15
    floor_row = next(line for line in page if "memory 64K exact" in line)
    assert "34 GFLOP at 40 GFLOP/s, puts the floor at 2.43x" in floor_row  # (0.6 + 34.36 / 40) / 0.6
    assert floor_row.endswith("| yes |")  # 2.4-2.6 within 10% of 2.43 (2.67)
    # a median under the goal whose rounds straddle it gets no verdict
    ivf = "step, memory 64K IVF + XL / XL only (recall@32 on model keys at 64K)"
    assert met[ivf] == "spread too wide for a verdict"
    assert met["tokens/s, ours memory 64K IVF + XL / theirs (same memory, exact), same rounds"] == "yes"
    assert met["tokens/s, ours memory 64K IVF / theirs (same memory, exact), same rounds"] == "no"
    assert met["tokens/s, ours vanilla / theirs, same rounds"] == "spread too wide for a verdict"
    assert met["tokens/s, ours XL only / theirs, both with one key/value head, same rounds"] == "yes"
    assert not any("ours vanilla / theirs, both with one" in line for line in page)  # not measured: no row
    assert met["IVF search at 262K / exact, recall@32 on model keys"] == "no"  # fast, but recall 0.85 < 0.9
    # A floor from memory_step's run that this run's median beats (1.28x under 1.67x) is no floor:
    # the rounds decide, and the row says that split is stale.
    page, met = verdicts(0.4)
    assert met[ivf] == "spread too wide for a verdict"
    assert "puts the floor at 1.67x (the median beats it" in next(line for line in page if line.startswith(f"| {ivf}"))
    # A search slower than the goal's whole budget: out of reach, whatever the rounds' spread.
    train_json = json.loads((tmp_path / "train_step.json").read_text())
    reference = train_json["configs"]["reference"]
    reference["rows"] = [
        step("memory 64K IVF + XL", 1.8, 1.25, 1.9) if r["variant"] == "memory 64K IVF + XL" else r
        for r in reference["rows"]
    ]
    reference["tokens_per_s_vs_popular"]["memory 64K IVF + XL"] = faster(1.2, 1.1, 1.6)
    (tmp_path / "train_step.json").write_text(json.dumps(train_json))
    page, met = verdicts(0.4)
    assert met[ivf] == "no: out of reach of this search, its floor 1.67x misses the goal"
    # 1.2 x 1.08 s / (0.6 + 0.4): at most 1.30x with nothing but the search added to XL only
    row = "tokens/s, ours memory 64K IVF + XL / theirs (same memory, exact), same rounds"
    assert met[row] == "no: out of reach of this search, its ceiling 1.30x misses the goal"
    # Figures from runs on unlike devices (here, thread counts) are not compared.
    search_json = json.loads((tmp_path / "search.json").read_text())
    (tmp_path / "search.json").write_text(json.dumps({**search_json, "device": "x86_64 CPU, 1 threads"}))
    page, met = verdicts(0.1)
    assert met["step, memory 64K exact / XL only, against its floor"].startswith("not comparable: measured on x86_64")
    # ... unless train_step measured the search's matmul beside the steps: (0.6 + 34.36 / 80) / 0.6
    train_json = json.loads((tmp_path / "train_step.json").read_text())
    train_json["configs"]["reference"]["search_matmul_gflops"] = {"8192": 80.0, "65536": 80.0}
    (tmp_path / "train_step.json").write_text(json.dumps(train_json))
    page, met = verdicts(0.1)
    floor_row = next(line for line in page if "memory 64K exact" in line)
    assert "34 GFLOP at 80 GFLOP/s, puts the floor at 1.72x" in floor_row and floor_row.endswith("| no |")
    assert "puts the floor at 1.09x" in next(line for line in page if "memory 8K exact" in line)
    # The search against its own product in memory_step's rounds: 34.36 GFLOP in 0.4 s, 86 GFLOP/s.
    page, met = verdicts(0.1, exact_s=(0.5, 0.4))
    exact_row = next(line for line in page if line.startswith("| step, memory 64K exact"))
    assert "the search took 500 ms and its product alone 400 ms (86 GFLOP/s)" in exact_row
    assert exact_row.endswith("| no |")

    # The product timed in the steps' rounds: a floor whose interval lies past the goal (1.10 x 1.72x) puts the
    # goal out of reach of any selection; one that straddles it leaves the verdict to the rounds.
    def in_rounds(low, median, high):
        train_json["configs"]["reference"]["search_floors"]["65536"] = floor(34.36, median, low, high)
        (tmp_path / "train_step.json").write_text(json.dumps(train_json))
        return verdicts(0.1)

    page, met = in_rounds(1.95, 2.0, 2.1)
    exact_row = next(line for line in page if line.startswith("| step, memory 64K exact"))
    assert "(goal 1.89x); timed in the same rounds the product alone took 500 ms (69 GFLOP/s)" in exact_row
    assert exact_row.endswith("| no: out of reach of PyTorch's product, its floor 1.95x misses the goal |")
    page, met = in_rounds(1.85, 2.0, 2.1)
    assert met["step, memory 64K exact / XL only, against its floor"] == "no"
    # A step below the floor PyTorch's product puts under it (1.5x under 1.72x): met, and the row says why.
    train_json["configs"]["reference"]["rows"][3] = step("memory 64K", 1.5, 1.45, 1.55)
    page, met = in_rounds(1.0, 1.1, 1.2)
    exact_row = next(line for line in page if line.startswith("| step, memory 64K exact"))
    assert "the step beats that floor: the floor is PyTorch's product timed alone" in exact_row
    assert exact_row.endswith("| yes |")


@pytest.mark.slow
def test_fault_script_quick(tmp_path):
    from benchmarks import faults

    results = faults.main(["--quick", "--out", str(tmp_path)])
    assert all(row["same_losses"] for row in results["rows"] if "skipped" not in row)
    kills = results["rows"][0]["kills"]
    assert len(kills) == 2 and kills[1] == "inside a checkpoint write"


def test_interleaved_rounds_rotate_the_order_and_refill_memories_across_their_cycle():
    from benchmarks.common import Case, interleaved

    calls, fills = [], []
    cases = [Case("ours", name, lambda name=name: calls.append(name), 1) for name in "abc"]
    cases[2].set_fill = fills.append
    times = interleaved(cases, rounds=3, calls=2, warmup=1, device=torch.device("cpu"))
    assert calls[:3] == ["a", "b", "c"]  # warm-up, one step each
    rounds = [calls[3 + 6 * r : 9 + 6 * r : 2] for r in range(3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert fills == [0.5 / 3, 1.5 / 3, 2.5 / 3] and all(len(t) == 3 for t in times)


@pytest.mark.parametrize("variant", ["vanilla", "XL only", "memory", "memory + XL"])
def test_the_popular_implementations_cases_are_the_models_their_labels_name(variant, monkeypatch):
    """Each labelled step of memorizing-transformers-pytorch attends its XL cache and searches its
    kNN memory exactly when the label says so (an "XL only" step once ran their plain model)."""
    theirs = pytest.importorskip("memorizing_transformers_pytorch.memorizing_transformers_pytorch")
    import contextlib

    from benchmarks import popular

    seen = {"xl": 0, "knn": 0}
    for name, cls in (("xl", theirs.Attention), ("knn", theirs.KNNAttention)):
        forward = cls.forward

        def counted(self, x, *args, name=name, forward=forward, **kwargs):
            seen[name] += kwargs.get("xl_memory") is not None if name == "xl" else 1
            return forward(self, x, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)
    shape = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, head_dim=16, knn_layer=1, k=4)
    with contextlib.ExitStack() as resources:
        case = popular.case(
            variant, variant, **shape, segment_length=8, batch=2, memory_size=64, xl_length=8, resources=resources
        )
        case.step()
        case.step()  # reads the cache the first step left
    assert (seen["knn"] > 0, seen["xl"] > 0) == popular.VARIANTS[variant]


def test_gpu_check_says_plainly_that_there_is_no_gpu_here():
    import subprocess
    import sys
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        return  # on a GPU machine `make gpu-check` itself is the test
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "no CUDA device here" in result.stderr


def test_retrofit_benchmark_quick(tmp_path):
    retrofit.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "retrofit-quick.json").read_text())
    assert len(results["rows"]) == 4 and results["plain_forward_s"] > 0
    for row in results["rows"]:
        assert row["memorize_s"] > 0 and row["first_token_ms"] > 0 and row["generate_ms_per_token"] > 0
        assert row["store_bytes"] > 0  # the memories hold what was memorized
    assert "| all layers, exact |" in (tmp_path / "retrofit-quick.md").read_text()


def test_fits_scales_the_measured_overheads_to_a_preset(tmp_path):
    measured = {
        "device": "test",
        "rows": [
            {"memory_size": 1024, "dtype": "bfloat16", "backend": "exact", "ratio_to_store": 1.0},
            {"memory_size": 1024, "dtype": "float32", "backend": "faiss_ivf", "ratio_to_store": 2.0},
        ],
    }
    (tmp_path / "memory_use.json").write_text(json.dumps(measured))
    fits.main(["--memory-use", str(tmp_path / "memory_use.json"), "--out", str(tmp_path)])
    text = (tmp_path / "fits.md").read_text()
    # paper preset: 8 heads x 128, one memory layer; 65,536 bf16 entries: 2 x 8 x 128 x 2 bytes each = 256 MiB
    assert "| 65,536 | bfloat16 | exact | 256 | 96 | 320 | 564 |" in text
    assert "| 65,536 | float32 | faiss_ivf | 1,024 | 24 | 80 | 141 |" in text


def test_the_medians_interval_is_the_order_statistics_that_cover_it():
    """x(j) and x(n + 1 - j), j the largest with P(Binomial(n, 1/2) < j) <= 2.5%: min and max up to 8
    values, x(2) and x(8) of 9 (coverage 96%), x(3) and x(10) of 12, x(6) and x(15) of 20."""
    assert median_interval([5.0, 1.0, 3.0]) == (1.0, 5.0)
    assert median_interval(list(range(8))) == (0, 7)
    assert median_interval(list(range(1, 10))) == (2, 8)
    assert median_interval(list(range(12, 0, -1))) == (3, 10)
    assert median_interval(list(range(1, 21))) == (6, 15)
    # by simulation: the interval of 12 draws holds the true median at least 95% of the time
    generator = torch.Generator().manual_seed(0)
    draws = torch.rand(4000, 12, generator=generator)  # uniform: median 0.5
    held = sum(low <= 0.5 <= high for low, high in (median_interval(row.tolist()) for row in draws))
    assert held / 4000 >= 0.95


def test_a_target_is_judged_by_the_medians_interval_not_the_extreme_rounds():
    # 12 rounds, one slow outlier: the rounds straddle 1.15, the median's interval (1.04-1.10) does not
    ratios = [1.04, 1.05, 1.06, 1.07, 1.07, 1.08, 1.08, 1.09, 1.10, 1.10, 1.11, 1.40]
    low, high = median_interval(ratios)
    measured = {"median": 1.08, "min": min(ratios), "max": max(ratios), "low": low, "high": high}
    assert targets.verdict(measured, 1.15, at_most=True) == "yes"
    assert targets.verdict({**measured, "low": 1.0, "high": 1.2}, 1.15, at_most=True) == "spread too wide for a verdict"
    # figures recorded before the interval: the rounds' min-max decides, as it did
    assert targets.verdict({"median": 1.08, "min": 1.04, "max": 1.40}, 1.15, at_most=True) == (
        "spread too wide for a verdict"
    )
