"""What the memory helps: the per-token gain (loss with the memory off minus loss with it),
grouped by kind of token, by how often the token occurs in training, and by how far back
the same token last occurred in its document; and the tokens that gain most.

The paper finds that few tokens gain, mostly rare ones (names, citations, lemma names)
whose earlier occurrence lies far back; these tables say whether that holds here.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from typing import Any

import torch

from ..data.streaming import TokenizedDocument

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NUMBER = re.compile(r"[0-9][0-9_.]*")
# Training frequency, occurrences per million training tokens: (upper bound, name).
FREQUENCY_BINS = (
    (10, "rare (< 10 per M)"),
    (100, "10-100 per M"),
    (1000, "100-1,000 per M"),
    (float("inf"), "frequent (> 1,000 per M)"),
)


def token_kind(text: str) -> str:
    """identifier / keyword / number / whitespace / punctuation, by the token's text."""
    word = text.strip()
    if not word:
        return "whitespace"
    if keyword.iskeyword(word) or keyword.issoftkeyword(word):
        return "keyword"
    if IDENTIFIER.fullmatch(word):
        return "identifier"
    if NUMBER.fullmatch(word):
        return "number"
    return "punctuation"


def distance_bins(segment_length: int, xl_length: int) -> list[tuple[float, str]]:
    """(upper bound, name) of the distance back to the token's previous occurrence."""
    reach = segment_length + xl_length
    return [
        (segment_length, f"1-{segment_length} (in the segment)"),
        *([(reach, f"{segment_length + 1}-{reach} (in the XL cache)")] if xl_length else []),
        (4 * reach, f"{reach + 1}-{4 * reach}"),
        (32 * reach, f"{4 * reach + 1}-{32 * reach}"),
        (float("inf"), f"> {32 * reach}"),
    ]


def previous_occurrence_distance(ids: torch.Tensor) -> torch.Tensor:
    """(n,) distance from each token back to the last earlier occurrence of the same id; 0 for a first one."""
    last: dict[int, int] = {}
    out = torch.zeros(ids.numel(), dtype=torch.long)
    for position, token in enumerate(ids.tolist()):
        if token in last:
            out[position] = position - last[token]
        last[token] = position
    return out


def token_gain(
    documents: list[TokenizedDocument],
    with_memory: list[torch.Tensor],
    without: list[torch.Tensor],
    tokenizer: Any,
    train_counts: torch.Tensor,
    segment_length: int,
    xl_length: int,
    top: int = 25,
) -> dict:
    """Gains grouped three ways, and the `top` tokens by total gain. `with_memory`/`without`:
    per document, each token's loss (NaN where not scored), as `evaluate(..., token_losses=True)`
    returns them; `train_counts`: (vocab,) occurrences of each id in the training split."""
    ids = torch.cat([d.ids for d in documents])
    gain = torch.cat(without) - torch.cat(with_memory)
    scored = ~gain.isnan()
    ids, gain = ids[scored], gain[scored]
    distance = torch.cat([previous_occurrence_distance(d.ids) for d in documents])[scored]
    per_million = train_counts.double() * 1e6 / max(1, int(train_counts.sum()))
    texts = {i: tokenizer.decode([i]) for i in ids.unique().tolist()}
    kinds = [token_kind(texts[i]) for i in ids.tolist()]
    total = float(gain.sum())

    def group(labels: list[str], order: list[str]) -> list[dict[str, Any]]:
        rows = []
        for name in order:
            pick = torch.tensor([label == name for label in labels], dtype=torch.bool)
            if pick.any():
                rows.append(
                    {
                        "group": name,
                        "tokens": int(pick.sum()),
                        "share_of_tokens": float(pick.float().mean()),
                        "mean_gain": float(gain[pick].mean()),
                        "share_of_gain": float(gain[pick].sum()) / total if total else 0.0,
                    }
                )
        return rows

    def binned(values: torch.Tensor, bins: list[tuple[float, str]], zero: str | None = None) -> list[str]:
        names = []
        for v in values.tolist():
            names.append(zero if zero is not None and v == 0 else next(name for bound, name in bins if v <= bound))
        return names

    frequency_bins = list(FREQUENCY_BINS)
    distances = distance_bins(segment_length, xl_length)
    by_token: dict[int, list[float]] = {}
    for token, g in zip(ids.tolist(), gain.tolist()):
        by_token.setdefault(token, []).append(g)
    best = sorted(by_token.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "tokens": int(scored.sum()),
        "mean_gain": float(gain.mean()),
        "total_gain": total,
        "share_of_tokens_gaining_over_0.5_nats": float((gain > 0.5).float().mean()),
        "by_kind": group(kinds, ["identifier", "keyword", "number", "punctuation", "whitespace"]),
        "by_training_frequency": group(binned(per_million[ids], frequency_bins), [name for _, name in frequency_bins]),
        "by_distance_to_previous_occurrence": group(
            binned(distance, distances, zero="first in the document"),
            ["first in the document"] + [name for _, name in distances],
        ),
        "top_tokens": [
            {
                "token": texts[token],
                "id": token,
                "kind": token_kind(texts[token]),
                "count": len(gains),
                "total_gain": sum(gains),
                "mean_gain": sum(gains) / len(gains),
                "training_per_million": float(per_million[token]),
            }
            for token, gains in best
        ],
    }


def _cell(token: str) -> str:
    """A token as a Markdown table cell: its repr in code, the table's bar escaped."""
    return "`" + repr(token).replace("|", "\\|").replace("`", "'") + "`"


def gain_tables(result: dict[str, Any]) -> str:
    """The groups of `token_gain` as Markdown tables."""
    parts = [
        f"{result['tokens']:,} scored tokens; mean gain {result['mean_gain']:.4f} nats; "
        f"{result['share_of_tokens_gaining_over_0.5_nats']:.1%} of tokens gain more than 0.5 nats."
    ]
    for key, title in (
        ("by_kind", "kind of token"),
        ("by_training_frequency", "training frequency"),
        ("by_distance_to_previous_occurrence", "distance back to the same token's previous occurrence"),
    ):
        parts.append(
            f"\n| {title} | tokens | share of tokens | mean gain (nats) | share of the total gain |\n"
            "|---|---:|---:|---:|---:|"
        )
        parts += [
            f"| {r['group']} | {r['tokens']:,} | {r['share_of_tokens']:.1%} | {r['mean_gain']:.4f} | "
            f"{r['share_of_gain']:.1%} |"
            for r in result[key]
        ]
    parts.append(
        "\n| top tokens by total gain | kind | count | mean gain | total gain | training per M |\n"
        "|---|---|---:|---:|---:|---:|"
    )
    parts += [
        f"| {_cell(t['token'])} | {t['kind']} | {t['count']:,} | {t['mean_gain']:.3f} | {t['total_gain']:.1f} | "
        f"{t['training_per_million']:.1f} |"
        for t in result["top_tokens"]
    ]
    return "\n".join(parts)


def plot_gain(results: dict[str, dict], path: Path) -> None:
    """One panel per grouping (kind, training frequency, distance back): each group's share of
    the tokens and of the total gain, for each run in `results` (label -> `token_gain` output)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import write_atomically

    keys = [
        ("by_kind", "kind of token"),
        ("by_training_frequency", "training frequency"),
        ("by_distance_to_previous_occurrence", "distance back to the previous occurrence"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, title) in zip(axes, keys):
        groups = [g["group"] for g in next(iter(results.values()))[key]]
        width = 0.8 / (len(results) + 1)
        first = next(iter(results.values()))[key]
        ax.bar(
            [i - 0.4 + width / 2 for i in range(len(groups))],
            [g["share_of_tokens"] for g in first],
            width,
            color="lightgrey",
            label="share of tokens",
        )
        for n, (label, result) in enumerate(results.items(), start=1):
            shares = {g["group"]: g["share_of_gain"] for g in result[key]}
            ax.bar(
                [i - 0.4 + width * (n + 0.5) for i in range(len(groups))],
                [shares.get(g, 0.0) for g in groups],
                width,
                label=f"share of the gain: {label}",
            )
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
