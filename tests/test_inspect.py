"""mt inspect: the data behind the page, and the page itself in a real headless browser."""

import json
import re
import shutil
import subprocess

import pytest
import torch
from tiny_models import tiny_llama as shared_tiny_llama

from memorizing_transformers import MemorizingConfig, MemorizingTransformer
from memorizing_transformers.cli import main
from memorizing_transformers.data.tokenizer import load_tokenizer
from memorizing_transformers.evaluation.inspect import inspect_document, inspect_pretrained
from memorizing_transformers.hf.retrofit import add_memory

TEXT = "alpha beta gamma delta. " * 40 + "The key is 7391 </script> <b>not bold</b>. " + "epsilon zeta eta. " * 20


@pytest.fixture(scope="module")
def model() -> MemorizingTransformer:
    torch.manual_seed(0)
    return MemorizingTransformer(MemorizingConfig.preset("tiny", vocab_size=50257, memory_size=64)).eval()


@pytest.mark.parametrize("combine", ["gate", "joint"])
def test_report_data(combine):
    torch.manual_seed(0)
    model = MemorizingTransformer(
        MemorizingConfig.preset("tiny", vocab_size=50257, memory_size=64, memory_combine=combine)
    ).eval()
    report = inspect_document(model, TEXT, top=3)
    n = len(report["tokens"])
    assert n == len(model.tokenizer(TEXT)["input_ids"]) and "".join(report["tokens"]) == TEXT
    assert len(report["loss_with_memory"]) == len(report["loss_without_memory"]) == n
    assert len(report["retrieved"]) == n - 1  # every query but the last token's
    length = model.config.segment_length
    for i, heads in enumerate(report["retrieved"]):
        segment_start = i - i % length
        assert report["written_before"][i] == segment_start  # every earlier segment was written
        for h, entries in enumerate(heads):
            positions = [p for p, _ in entries]
            # Only tokens of earlier segments, and only those still in the FIFO memory.
            assert all(max(0, segment_start - 64) <= p < segment_start for p in positions)
            assert len(entries) == min(3, segment_start, 64)
            assert [s for _, s in entries] == sorted((s for _, s in entries), reverse=True)
            assert 0.0 <= report["memory_share"][i][h] <= 1.0
            assert (report["memory_share"][i][h] == 0.0) == (segment_start == 0)
    # The first segment has nothing in memory: with or without it, the same losses.
    assert report["loss_with_memory"][: length - 1] == report["loss_without_memory"][: length - 1]


def test_retrieved_positions_point_at_the_tokens_whose_keys_were_found(model):
    report = inspect_document(model, TEXT, top=1)
    ids = torch.tensor([model.tokenizer(TEXT)["input_ids"]])
    layer = model.config.memory_layer_indices[0]
    with torch.no_grad():
        state = model(ids[:, : 3 * 16]).state  # three segments stored
    memory = state.memories[layer]
    for position in {entries[0][0] for entries in report["retrieved"][3 * 16]}:
        # Memory of 64 holds positions 0..47 in slots 0..47: a retrieved position is its slot.
        assert memory.valid[0, position]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_in_headless_chromium(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "doc.txt").write_text(TEXT)
    main(
        [
            "inspect",
            str(tmp_path / "model"),
            str(tmp_path / "doc.txt"),
            "--out",
            str(tmp_path / "report.html"),
            "--top",
            "3",
        ]
    )
    n = len(model.tokenizer(TEXT)["input_ids"])
    selected = 3 * 16 + 5  # a token of the fourth segment: its queries found earlier tokens
    dom = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            f"file://{tmp_path / 'report.html'}#{selected}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert len(re.findall(r'<span class="token[^"]*" id="t\d+"', dom)) == n  # the script built every token
    assert f'id="t{selected}"' in dom and 'class="token selected"' in dom
    panel = dom.split('<aside id="panel">')[1].split("</aside>")[0]  # as the script filled it
    assert f'<h2 id="selected-token">token {selected}:' in panel
    assert panel.count("<h3>head ") == model.config.n_heads
    assert panel.count('<tr class="hit">') == 3 * model.config.n_heads
    assert "<b>not bold</b>" not in dom  # document text is shown as text, never as markup


def tiny_llama():
    """A tiny Llama with the GPT-2 tokenizer's vocabulary."""
    return shared_tiny_llama(vocab_size=50257, num_hidden_layers=2, max_position_embeddings=2048)


@pytest.mark.parametrize("combine", ["joint", "gate"])
def test_report_data_for_a_hugging_face_model(combine):
    model, tokenizer = tiny_llama(), load_tokenizer()
    window, stride, capacity = 16, 8, 24  # the memory wraps around: positions are not slots
    handle = add_memory(model, knn_layers=[0, 1], memory_size=capacity, knn_k=4, memory_combine=combine)
    report = inspect_pretrained(handle, tokenizer, TEXT, window=window, stride=stride, layer=1, top=3)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    assert len(report["tokens"]) == len(report["loss_with_memory"]) == len(report["retrieved"]) == n
    with torch.no_grad():
        expected = handle.stream(ids, window, stride, losses=True)[0]
        handle.reset()
        with handle.disabled():
            alone = handle.stream(ids, window, stride, losses=True)[0]
    torch.testing.assert_close(torch.tensor(report["loss_with_memory"][:-1]), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(report["loss_without_memory"][:-1]), alone, atol=1e-4, rtol=0)
    for i, heads in enumerate(report["retrieved"]):
        # Token i is read by the call starting at `start`; memory holds the last `capacity` before it.
        start = 0 if i < window else (i - window) // stride * stride + stride
        assert report["written_before"][i] == start
        for h, entries in enumerate(heads):
            assert all(max(0, start - capacity) <= p < start for p, _ in entries), (i, start, entries)
            assert len(entries) == min(3, start)
            assert [s for _, s in entries] == sorted((s for _, s in entries), reverse=True)
            assert 0.0 <= report["memory_share"][i][h] <= 1.0
            assert (report["memory_share"][i][h] == 0.0) == (start == 0)


def test_inspect_command_with_a_hugging_face_model(tmp_path, cli_error):
    tiny_llama().save_pretrained(tmp_path / "llama")
    load_tokenizer().save_pretrained(tmp_path / "llama")
    (tmp_path / "doc.txt").write_text(TEXT)
    main(
        [
            "inspect",
            str(tmp_path / "llama"),
            str(tmp_path / "doc.txt"),
            "--out",
            str(tmp_path / "report.html"),
            "--knn-layers",
            "0,1",
            "--layer",
            "1",
            "--window",
            "16",
            "--stride",
            "8",
            "--top",
            "2",
        ]
    )
    page = (tmp_path / "report.html").read_text()
    data = json.loads(
        page.split('<script id="data" type="application/json">')[1].split("</script>")[0].replace("<\\/", "</")
    )
    assert (data["layer"], data["heads"], data["segment_length"]) == (1, 4, 16)
    assert "".join(data["tokens"]) == TEXT
    message = cli_error(
        ["inspect", tmp_path / "llama", tmp_path / "doc.txt", "--out", tmp_path / "r.html", "--layer", "5"]
    )
    assert "layer 5 has no memory; the memory layers are [0, 1]" in message
