"""What a memory finds against what it could: the counts of evaluation/retrieval.py on made-up reports."""

import itertools
import math

import pytest
import torch

from memorizing_transformers.evaluation.retrieval import chance_of_any, retrieval_hits


@pytest.mark.parametrize("entries, matching, drawn", [(6, 2, 3), (5, 0, 2), (4, 4, 1), (7, 3, 7), (3, 1, 0)])
def test_chance_of_any_equals_counting_every_draw(entries, matching, drawn):
    draws = list(itertools.combinations(range(entries), drawn))
    hits = sum(any(i < matching for i in draw) for draw in draws)
    assert chance_of_any(entries, matching, drawn) == pytest.approx(hits / len(draws))


def test_chance_of_any_refuses_more_draws_than_entries():
    with pytest.raises(ValueError, match="cannot draw 3 of 2"):
        chance_of_any(2, 1, 3)


def test_hits_by_kind_with_their_chance_and_weights():
    #        0  1  2  3  4  5  6  7
    ids = torch.tensor([5, 7, 5, 7, 9, 5, 7, 1])
    # Query 5 (token 5, predicting 7) with positions 0..4 in memory: 7 is at 1 and 3, both after a 5.
    # Query 6 (token 7, predicting 1): no 1 in memory. Query 3 (token 7, predicting 9), memory 0..1.
    report = {
        "memory_size": 5,
        "heads": 2,
        "written_before": [0, 0, 0, 2, 2, 5, 5],
        "retrieved": [
            [[], []],
            [[], []],
            [[], []],
            [[[0, 0.0], [1, 0.0]], [[1, 0.0]]],
            [[[0, 0.0]], [[1, 0.0]]],
            [[[1, math.log(3.0)], [4, 0.0]], [[0, 0.0], [2, 0.0]]],  # head 0 finds position 1; head 1 none
            [[[3, 0.0]], [[4, 0.0]]],
        ],
    }
    head0, head1 = retrieval_hits(ids, report)
    assert head0["queries"] == head1["queries"] == 4  # queries 3 to 6: the ones with a non-empty memory
    # The answer is in memory for query 4 (predicting 5: position 0 of 0..1) and query 5 (7: positions 1 and 3
    # of 0..4). Head 0 finds it both times: at query 4 its one entry, at query 5 one of two entries, which its
    # readout weighs 3 to 1. Head 1 never finds it.
    answer0, answer1 = head0["answer"], head1["answer"]
    assert answer0["in_memory"] == 0.5
    assert answer0["found"] == 1.0 and answer1["found"] == 0.0
    # Chance of one in as many random entries: 1/2 at query 4, 1 - (3/5)(2/4) = 0.7 at query 5.
    assert answer0["chance"] == answer1["chance"] == pytest.approx((0.5 + 0.7) / 2)
    assert answer0["base_rate"] == pytest.approx((1 / 2 + 2 / 5) / 2)
    assert answer0["share"] == pytest.approx((1.0 + 0.5) / 2) and answer1["share"] == 0.0
    assert answer0["weight"] == pytest.approx((1.0 + 0.75) / 2) and answer1["weight"] == 0.0
    assert answer0["best"] == 1.0 and answer1["best"] == 0.0  # head 0's best-scored entry held it both times
    # Continuations (a 7 after a 5, at query 5 whose token is 5): positions 1 and 3; query 4 (token 9) has none.
    assert head0["continuation"]["in_memory"] == 0.25
    assert head0["continuation"]["found"] == 1.0 and head0["continuation"]["chance"] == pytest.approx(0.7)
    # The query's own token: query 3 (a 7; memory 0..1) holds it at 1, query 5 (a 5) at 0 and 2, query 6 (a 7) at
    # 1 and 3, query 4 (a 9) nowhere. Head 1 found position 1, then 0 and 2, then position 4: a miss.
    same = head1["same token"]
    assert same["in_memory"] == 0.75 and same["found"] == pytest.approx(2 / 3)
    assert same["share"] == pytest.approx((1.0 + 1.0 + 0.0) / 3) and same["best"] == pytest.approx(2 / 3)
    # Right after the query's token: for query 5 (a 5) positions 1 and 3, for query 6 (a 7) positions 2 and 4.
    # Head 0 found position 1 at query 5, and at query 6 only position 3 (after a 5): one of two.
    assert head0["after the same token"]["in_memory"] == 0.5 and head0["after the same token"]["found"] == 0.5
