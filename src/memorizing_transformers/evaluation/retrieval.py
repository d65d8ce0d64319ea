"""What a memory layer finds, against what it could have found.

For each query (the token at t, predicting the token at t + 1) and each head, the entries the
search returned are checked against the document: an entry at position j *holds the answer*
when the token at j is the token at t + 1 (its value can carry it), and *continues the query*
when, besides, the token before j is the token at t (the match an induction head makes: the
answer followed the current token before). Two more kinds say what the search matches instead:
entries of the query's own token, and entries right after an earlier occurrence of it (where an
induction head looks). Each rate is set beside two references: whether the
memory held such an entry at all, and the chance that as many entries drawn at random from the
memory would include one. A search that finds answers no more often than chance gives the
model nothing to read, whatever it learns; one that finds them often, while its readout stays
a uniform average, points at the readout.

Data in: a document's ids and what `mt inspect` reports of it (evaluation/inspect.py), for a
model trained here or a Hugging Face model with `add_memory`.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import torch

# The kinds of entry counted, for the query at t: an entry at position j is one when
KINDS = (
    "answer",  # the token at j is the token at t + 1: its value can carry the answer
    "continuation",  # that, and the token before j is the token at t: the answer once followed this token
    "same token",  # the token at j is the token at t (what a search matching tokens finds)
    "after the same token",  # the token before j is the token at t (what an induction head's search finds)
)


# What is reported of each kind (see `retrieval_hits`).
FIELDS = ("in_memory", "found", "chance", "share", "base_rate", "best", "weight")


def chance_of_any(entries: int, matching: int, drawn: int) -> float:
    """The probability that `drawn` of `entries` entries taken at random (without replacement)
    include at least one of the `matching` ones."""
    if drawn > entries:
        raise ValueError(f"cannot draw {drawn} of {entries} entries")
    miss = 1.0
    for i in range(drawn):
        miss *= max(0, entries - matching - i) / (entries - i)
    return 1.0 - miss


def is_kind(ids: list[int], j: int, key: tuple) -> bool:
    """Whether position j of `ids` is what `key` names: ("token", x), ("after", x) or ("pair", x, y)."""
    if key[0] == "token":
        return ids[j] == key[1]
    if j == 0:
        return False
    return ids[j - 1] == key[1] if key[0] == "after" else (ids[j - 1], ids[j]) == key[1:]


def retrieval_hits(ids: torch.Tensor, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per head of the report's memory layer, for each kind of entry (KINDS): over the queries with a
    non-empty memory, the share whose memory held one (`in_memory`); over those, the mean of: whether
    the entries found include one (`found`) against the chance that as many random entries would
    (`chance`); their share of the entries found (`share`) against their share of the memory
    (`base_rate`: a random draw's expected share); whether the best-scored entry is one (`best`: above
    `share`, the scores rank them first more often than a uniform pick, and a sharper readout would
    weigh them more); and the weight the head's readout, a softmax over the entries' scores, puts on
    them (`weight`; a uniform readout's would be `share`)."""
    ids = ids.tolist()
    capacity, heads = report["memory_size"], report["heads"]
    # Positions, ascending, by what stands at them: ("token", x), ("after", x) (x just before), ("pair", x, y).
    where: dict[tuple, list[int]] = {}
    for j, token in enumerate(ids):
        where.setdefault(("token", token), []).append(j)
        if j:
            where.setdefault(("after", ids[j - 1]), []).append(j)
            where.setdefault(("pair", ids[j - 1], token), []).append(j)

    def held(key: tuple, first: int, before: int) -> int:
        positions = where.get(key, [])
        return bisect.bisect_left(positions, before) - bisect.bisect_left(positions, first)

    zero = dict.fromkeys(FIELDS, 0.0)
    totals = [{"queries": 0, **{kind: dict(zero) for kind in KINDS}} for _ in range(heads)]
    queries = zip(report["retrieved"][: len(ids) - 1], report["written_before"])  # the last token predicts nothing
    for t, (entries_by_head, before) in enumerate(queries):
        if before == 0:
            continue
        first = max(0, before - capacity)  # the memory holds positions [first, before)
        target, current = ids[t + 1], ids[t]
        keys = {
            "answer": ("token", target),
            "continuation": ("pair", current, target),
            "same token": ("token", current),
            "after the same token": ("after", current),
        }
        # Per kind: how many entries of it the memory holds, and its key in `where`.
        matching = {kind: (held(key, first, before), key) for kind, key in keys.items()}
        for h, entries in enumerate(entries_by_head):
            total = totals[h]
            total["queries"] += 1
            positions = [int(p) for p, _ in entries]
            weights = torch.softmax(torch.tensor([s for _, s in entries], dtype=torch.float64), 0).tolist()
            for kind, (count, key) in matching.items():
                if not count:
                    continue
                counts = total[kind]
                counts["in_memory"] += 1
                counts["chance"] += chance_of_any(before - first, count, len(positions))
                counts["base_rate"] += count / (before - first)
                kind_of = [is_kind(ids, p, key) for p in positions]  # best-scored entry first
                hits = [w for w, hit in zip(weights, kind_of) if hit]
                counts["found"] += bool(hits)
                counts["best"] += bool(kind_of) and kind_of[0]
                counts["share"] += len(hits) / max(1, len(positions))
                counts["weight"] += sum(hits)
    result = []
    for h, total in enumerate(totals):
        row: dict[str, Any] = {"head": h, "queries": total["queries"]}
        for kind in KINDS:
            counts, with_kind = total[kind], total[kind]["in_memory"]
            row[kind] = {
                "in_memory": with_kind / total["queries"] if total["queries"] else math.nan,
                **{
                    field: counts[field] / with_kind if with_kind else math.nan
                    for field in zero
                    if field != "in_memory"
                },
            }
        result.append(row)
    return result
