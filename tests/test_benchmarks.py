import json

import torch

from benchmarks import long_stream, memory_use, search, targets, train_step
from memorizing_transformers import MemorizingConfig, MemorizingTransformer
from memorizing_transformers.data.streaming import TokenizedDocument


def test_search_benchmark_quick(tmp_path):
    search.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "search-quick.json").read_text())
    assert [r["memory_size"] for r in results["exact"]] == [1024, 4096]
    assert all(r["same_neighbours_as_faiss"] == 1.0 for r in results["exact"])
    # 4,096 keys make 16 IVF lists; nprobe 16 searches them all: exact.
    assert [(r["memory_size"], r["recall_at_k"]) for r in results["approximate"]] == [(4096, 1.0)]
    assert "| random unit vectors | 4x64x64 | 4,096 |" in (tmp_path / "search-quick.md").read_text()


def test_train_step_benchmark_quick(tmp_path):
    train_step.main(["--quick", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "train_step-quick.json").read_text())["configs"]["quick"]["rows"]
    assert [r["variant"] for r in rows] == [
        "vanilla", "XL only", "memory 512", "memory 2K", "memory 2K + XL", "memory 2K IVF", "memory 2K IVF + XL",
    ]
    assert next(r for r in rows if r["variant"] == "XL only")["ratio_to_xl"] == 1.0


def test_memory_use_benchmark_quick(tmp_path):
    memory_use.main(["--quick", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "memory_use-quick.json").read_text())["rows"]
    assert [(r["dtype"], r["backend"]) for r in rows] == [
        ("float32", "exact"), ("float32", "faiss_ivf"), ("bfloat16", "exact"), ("bfloat16", "faiss_ivf"),
    ]
    # A memory can never take less than its keys and values, nor peak below what stays resident.
    assert all(r["bytes_per_token"] >= r["store_bytes_per_token"] for r in rows)
    assert all(r["peak_bytes"] >= r["resident_bytes"] for r in rows)


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
    def step(variant, ratio, tokens):
        return {"variant": variant, "ratio_to_xl": ratio, "tokens_per_s": tokens, "seconds": 0.6 * ratio}

    (tmp_path / "train_step.json").write_text(json.dumps({"batch_size": 4, "configs": {"reference": {
        "config": {"n_heads": 4, "segment_length": 256, "head_dim": 64},
        "rows": [step("XL only", 1.0, 1700), step("memory 8K", 1.10, 1500), step("memory 64K", 2.50, 600),
                 step("memory 64K IVF", 1.20, 1600)],
    }}}))
    (tmp_path / "search.json").write_text(json.dumps({
        "exact": [{"memory_size": 65536, "matmul_gflops": 40.0},
                  {"memory_size": 262144, "speedup_vs_faiss_flat": 2.0, "fraction_of_matmul": 0.75}],
        "approximate": [
            {"data": "model keys (code)", "memory_size": 65536, "recall_at_k": 0.99, "speedup": 2.0},
            {"data": "model keys (code)", "memory_size": 262144, "recall_at_k": 0.85, "speedup": 9.0},
        ],
    }))
    (tmp_path / "long_stream.json").write_text(json.dumps({
        "tokens": 1052672, "memory_fill": 1 << 20, "config": {"memory_size": 1 << 20},
        "by_fill": [{"median_s": 0.2, "ratio_to_xl": 1.5}],
    }))
    targets.main(["--out", str(tmp_path)])
    met = {line.split(" | ")[0].strip("| "): line.rstrip(" |").split(" | ")[-1] for line in (tmp_path / "targets.md").read_text().splitlines() if line.startswith("| ") and "goal" not in line}
    assert met["step, memory 8K exact / XL only"] == "yes"
    floor_row = next(line for line in (tmp_path / "targets.md").read_text().splitlines() if "memory 64K exact" in line)
    assert "34 GFLOP at 40 GFLOP/s, puts the floor at 2.43x" in floor_row  # (0.6 + 34.36 / 40) / 0.6
    assert floor_row.endswith("| no |")
    assert met["IVF search at 262K / exact, recall@32 on model keys"] == "no"  # fast, but recall 0.85 < 0.9
    assert met["tokens/s at 64K (IVF) / popular implementation"] == "yes"  # 1600 / 980


def test_fault_script_quick(tmp_path):
    from benchmarks import faults

    results = faults.main(["--quick", "--out", str(tmp_path)])
    assert all(row["same_losses"] for row in results["rows"] if "skipped" not in row)
    kills = results["rows"][0]["kills"]
    assert len(kills) == 2 and kills[1] == "inside a checkpoint write"
