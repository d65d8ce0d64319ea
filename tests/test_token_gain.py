"""The per-token gain tables: groups add up, distances and kinds are what they say."""

import math

import torch

from memorizing_transformers.data.streaming import TokenizedDocument
from memorizing_transformers.evaluation.token_gain import (
    gain_tables,
    previous_occurrence_distance,
    token_gain,
    token_kind,
)


class Tokens:
    TEXT = {0: " foo", 1: " if", 2: "(", 3: " 42", 4: "\n    ", 5: " bar|x"}

    def decode(self, ids):
        return "".join(self.TEXT[i] for i in ids)


def test_kinds_and_distances():
    assert [token_kind(t) for t in (" foo", " if", "(", " 42", "\n  ", " match")] == [
        "identifier",
        "keyword",
        "punctuation",
        "number",
        "whitespace",
        "keyword",
    ]
    assert previous_occurrence_distance(torch.tensor([7, 8, 7, 7, 9, 8])).tolist() == [0, 0, 2, 1, 0, 4]


def test_gains_are_grouped_and_add_up():
    ids = torch.tensor([0, 1, 2, 0, 3, 4, 0, 5])
    without = torch.tensor([math.nan, 2.0, 1.0, 3.0, 2.0, 0.5, 4.0, 1.0])
    with_memory = torch.tensor([math.nan, 2.0, 1.0, 1.0, 2.0, 0.5, 1.0, 1.0])  # the repeated " foo" gains
    counts = torch.tensor([1, 10**6, 10**6, 10**6, 10**6, 10**6])  # " foo" is rare in training
    result = token_gain(
        [TokenizedDocument("d", ids)], [with_memory], [without], Tokens(), counts, segment_length=2, xl_length=2
    )
    assert result["tokens"] == 7 and result["total_gain"] == 5.0
    kinds = {g["group"]: g for g in result["by_kind"]}
    assert (
        kinds["identifier"]["share_of_gain"] == 1.0 and kinds["identifier"]["tokens"] == 2
    )  # foo, foo (the first unscored)
    assert kinds["punctuation"]["tokens"] == 2  # "(" and " bar|x"
    distance = {g["group"]: g["share_of_gain"] for g in result["by_distance_to_previous_occurrence"]}
    assert distance == {"first in the document": 0.0, "3-4 (in the XL cache)": 1.0}  # foo at 3 and 6: 3 back each
    frequency = {g["group"]: g["share_of_gain"] for g in result["by_training_frequency"]}
    assert frequency == {"rare (< 10 per M)": 1.0, "frequent (> 1,000 per M)": 0.0}
    assert result["top_tokens"][0]["token"] == " foo" and result["top_tokens"][0]["total_gain"] == 5.0
    table = gain_tables(result)
    assert "`' bar\\|x'`" in table and table.count("\n|") > 10
