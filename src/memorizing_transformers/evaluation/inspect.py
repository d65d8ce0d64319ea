"""`mt inspect`: a self-contained HTML page showing what the memory did for each token.

A document is streamed twice through the model: as it is, and with its memory layers
removed (the same weights otherwise). Each token of the page is coloured by how much the
memory lowered the loss of the prediction made at it (of the next token); hovering or
clicking it shows, per head of one memory layer, the share of the head's output
that came from memory and the earlier tokens it retrieved, with their positions and
scores. The page carries its data as JSON and needs no network. Our models are streamed
segment by segment; a Hugging Face model with `add_memory` through its sliding window.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_atomically
from ..data.streaming import TokenizedDocument
from ..hf.handle import MemoryHandle
from ..pretrained import MemorizingTransformer
from .perplexity import evaluate


@torch.no_grad()
def _token_losses(model: MemorizingTransformer, ids: torch.Tensor) -> torch.Tensor:
    """Next-token losses (n - 1,) of one document streamed segment by segment."""
    return evaluate(model, [TokenizedDocument("document", ids)], token_losses=True).token_losses[0][1:]


@torch.no_grad()
def inspect_document(model: MemorizingTransformer, text: str, top: int = 5) -> dict[str, Any]:
    """Stream `text` with and without memory; return the per-token data the page shows."""
    return inspect_ids(model, torch.tensor(model.tokenizer(text)["input_ids"]), top)


@torch.no_grad()
def inspect_ids(model: MemorizingTransformer, ids: torch.Tensor, top: int = 5) -> dict[str, Any]:
    """`inspect_document` of a document given as token ids (n,)."""
    if not model.config.memory_layer_indices:
        raise ValueError("this model has no memory layer: there is nothing to inspect")
    if ids.numel() < 2:
        raise ValueError("the document holds fewer than two tokens")
    model.eval()
    layer = model.config.memory_layer_indices[0]
    with model.blocks[layer].attn.retrieved.record() as trace:
        with_memory = _token_losses(model, ids)
    without_memory = _token_losses(model.without_memory().eval(), ids)

    length = model.config.segment_length
    # Segment i's queries are tokens i * length onwards; tokens before them are in memory.
    calls = [(record, index * length, 0) for index, record in enumerate(trace)]
    return _report(
        ids,
        model.tokenizer,
        with_memory,
        without_memory,
        calls,
        top,
        ids.numel() - 1,  # the last token is no query: it predicts nothing
        layer=layer,
        heads=model.config.n_heads,
        segment_length=length,
        memory_size=model.config.memory_size,
    )


@torch.no_grad()
def inspect_pretrained(
    handle: MemoryHandle,
    tokenizer,
    text: str,
    window: int = 512,
    stride: int | None = None,
    layer: int | None = None,
    top: int = 5,
) -> dict[str, Any]:
    """The same data for a Hugging Face model with `add_memory`: the document is streamed
    (`MemoryHandle.stream`) with its memory and with the memory disabled; the page shows
    memory layer `layer` (default: the first)."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    return inspect_pretrained_ids(handle, tokenizer, ids, window, stride, layer, top)


@torch.no_grad()
def inspect_pretrained_ids(
    handle: MemoryHandle,
    tokenizer,
    ids: torch.Tensor,
    window: int = 512,
    stride: int | None = None,
    layer: int | None = None,
    top: int = 5,
) -> dict[str, Any]:
    """`inspect_pretrained` of a document given as token ids (n,)."""
    layer = min(handle.layers) if layer is None else layer
    if layer not in handle.layers:
        raise ValueError(f"layer {layer} has no memory; the memory layers are {sorted(handle.layers)}")
    if ids.numel() < 2:
        raise ValueError("the document holds fewer than two tokens")
    stride = window if stride is None else stride
    device = next(handle.model.parameters()).device
    handle.reset()
    with handle.layers[layer].retrieved.record() as trace:
        with_memory = handle.stream(ids[None].to(device), window, stride, losses=True)[0].cpu()
    handle.reset()
    with handle.disabled():
        without_memory = handle.stream(ids[None].to(device), window, stride, losses=True)[0].cpu()
    handle.reset()
    # Call c reads tokens c * stride onwards, all earlier ones in memory; it scores those
    # the previous call did not (from window - stride on).
    calls = [(record, c * stride, 0 if c == 0 else window - stride) for c, record in enumerate(trace)]
    return _report(
        ids,
        tokenizer,
        with_memory,
        without_memory,
        calls,
        top,
        ids.numel(),
        layer=layer,
        heads=handle.model.config.num_attention_heads,
        segment_length=window,
        memory_size=handle.layers[layer].capacity,
    )


def _report(
    ids: torch.Tensor,
    tokenizer,
    with_memory: torch.Tensor,
    without_memory: torch.Tensor,
    calls: list[tuple[dict[str, torch.Tensor], int, int]],
    top: int,
    queries: int,
    **about: Any,
) -> dict[str, Any]:
    """The page's data. `calls`: per forward call, the memory layer's record, the number of
    tokens written to memory before it (in order, from slot 0, so slot = position mod
    capacity), and its first query that is the document's next token; the first `queries`
    tokens were queries (the calls' later columns are padding)."""
    capacity = about["memory_size"]
    retrieved: list[list[list[list[float]]]] = []  # [token][head] -> [[position, score], ...]
    share: list[list[float]] = []  # [token][head]
    written: list[int] = []  # [token]: tokens written to memory before its call (it holds the last `capacity`)
    for record, before, first in calls:
        written += [before] * (record["slots"].shape[2] - first)
        keep = min(top, record["slots"].shape[-1])
        positions = before - 1 - (before - 1 - record["slots"][0, :, :, :keep]) % capacity  # (heads, seq, keep)
        for t in range(first, record["slots"].shape[2]):
            retrieved.append(
                [
                    [
                        [int(p), round(float(s), 3)]
                        for p, s, v in zip(
                            positions[h, t], record["logits"][0, h, t, :keep], record["valid"][0, h, t, :keep]
                        )
                        if v
                    ]
                    for h in range(positions.shape[0])
                ]
            )
            share.append([round(float(x), 4) for x in record["share"][0, :, t]])
    return {
        "tokens": [tokenizer.decode([i]) for i in ids.tolist()],
        "loss_with_memory": [round(float(x), 4) for x in with_memory] + [None],
        "loss_without_memory": [round(float(x), 4) for x in without_memory] + [None],
        "retrieved": retrieved[:queries],
        "memory_share": share[:queries],
        "written_before": written[:queries],
        **about,
    }


_STYLE = """
body { font-family: sans-serif; margin: 0; display: flex; height: 100vh; }
#doc { flex: 3; overflow-y: auto; padding: 1em; white-space: pre-wrap; font-family: monospace; line-height: 1.6; }
#doc h1, #doc p { white-space: normal; font-family: sans-serif; }
#panel { flex: 2; overflow-y: auto; padding: 1em; border-left: 1px solid #ccc; background: #fafafa; }
.token { cursor: pointer; border-radius: 2px; }
.token.selected { outline: 2px solid #333; }
table { border-collapse: collapse; } td, th { padding: 0 0.5em; text-align: right; }
.legend span { padding: 0 0.4em; }
"""

_SCRIPT = """
const data = JSON.parse(document.getElementById('data').textContent);
const doc = document.getElementById('doc'), panel = document.getElementById('panel');
function colour(i) {
  const a = data.loss_with_memory[i], b = data.loss_without_memory[i];
  if (a === null) return 'transparent';
  const gain = Math.max(-1, Math.min(1, (b - a) / 2));  // positive: memory lowered the loss
  return gain >= 0 ? `rgba(40,160,60,${gain})` : `rgba(200,40,40,${-gain})`;
}
function quote(i) { return JSON.stringify(data.tokens[i]); }
function show(i) {
  document.querySelectorAll('.token.selected').forEach(e => e.classList.remove('selected'));
  document.getElementById('t' + i).classList.add('selected');
  const a = data.loss_with_memory[i], b = data.loss_without_memory[i];
  let out = `<h2 id="selected-token">token ${i}: ${quote(i).replace(/</g, '&lt;')}</h2>`;
  if (a !== null) out += `<p>loss of the next token: ${a.toFixed(3)} with memory, ${b.toFixed(3)} without</p>`;
  (data.retrieved[i] || []).forEach((entries, h) => {
    out += `<h3>head ${h}: memory share ${(100 * data.memory_share[i][h]).toFixed(1)}%</h3>`;
    out += '<table class="retrieved"><tr><th>position</th><th>score</th><th>token</th></tr>';
    entries.forEach(([p, s]) => {
      out += `<tr class="hit"><td><a href="#${p}">${p}</a></td><td>${s.toFixed(3)}</td>`;
      out += `<td>${quote(p).replace(/</g, '&lt;')}</td></tr>`;
    });
    out += '</table>';
  });
  panel.innerHTML = out;
}
data.tokens.forEach((text, i) => {
  const span = document.createElement('span');
  span.className = 'token'; span.id = 't' + i; span.textContent = text;
  span.style.background = colour(i);
  span.addEventListener('mouseenter', () => show(i));
  span.addEventListener('click', () => show(i));
  doc.appendChild(span);
});
const start = parseInt(location.hash.slice(1));
if (!isNaN(start) && start >= 0 && start < data.tokens.length) show(start);
window.addEventListener('hashchange', () => { const i = parseInt(location.hash.slice(1)); if (!isNaN(i)) show(i); });
"""


def render_html(report: dict[str, Any], title: str) -> str:
    """The page: tokens coloured by the memory's gain, a side panel for the selected token."""
    payload = json.dumps(report).replace("</", "<\\/")  # never closes the script element early
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<div id="doc"><h1>{html.escape(title)}</h1>
<p class="legend">Memory layer {report["layer"]}, {report["heads"]} heads, memory of {report["memory_size"]:,} tokens.
Colour: <span style="background:rgba(40,160,60,.6)">memory lowered the loss</span>
<span style="background:rgba(200,40,40,.6)">memory raised it</span>
(of the next token). Hover or click a token.</p>
</div>
<aside id="panel"><p>Hover or click a token to see what its query retrieved.</p></aside>
<script id="data" type="application/json">{payload}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_report(report: dict[str, Any], document: str | Path, out: str | Path) -> Path:
    """Write the page of `report` (made from the file `document`) to `out`, atomically."""
    page = render_html(report, f"Memory inspection: {Path(document).name}")
    out = Path(out)
    write_atomically(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return out
