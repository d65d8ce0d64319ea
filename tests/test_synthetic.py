import pytest
import torch

from memorizing_transformers.data.synthetic import (
    DISTANCE_CATEGORIES,
    RecallTask,
    accuracy_by_category,
    distance_categories,
)


def bound_values(task: RecallTask, ids: torch.Tensor) -> dict[int, int]:
    """The value each name takes at its first occurrence (its binding)."""
    values: dict[int, int] = {}
    for name, value in ids.view(-1, 2).tolist():
        if name != task.filler_id:
            values.setdefault(name, value)
    return values


def test_same_seed_same_document_and_different_seeds_differ():
    task = RecallTask(document_length=256)
    a, b, c = task.generate(7), task.generate(7), task.generate(8)
    assert torch.equal(a.document.ids, b.document.ids)
    assert torch.equal(a.document.loss_mask, b.document.loss_mask)
    assert torch.equal(a.source_positions, b.source_positions)
    assert not torch.equal(a.document.ids, c.document.ids)


def test_tokens_are_names_then_values_in_the_task_vocabulary():
    task = RecallTask(num_names=32, num_values=8, document_length=128)
    ids = task.generate(0).document.ids
    assert ids.shape == (128,) and ids.dtype == torch.long
    names, values = ids[0::2], ids[1::2]
    assert ((names < task.num_names) | (names == task.filler_id)).all()
    assert ((values >= task.num_names) & (values < task.num_names + task.num_values) | (values == task.filler_id)).all()
    assert int(ids.max()) < task.vocab_size


@pytest.mark.parametrize("seed", range(5))
def test_every_answer_is_the_value_bound_to_its_name(seed):
    task = RecallTask(num_names=48, num_values=8, document_length=512)
    doc = task.generate(seed)
    ids = doc.document.ids
    values = bound_values(task, ids)
    assert len(doc.answer_positions) > 100  # dense questions
    for answer, source in zip(doc.answer_positions.tolist(), doc.source_positions.tolist()):
        name = int(ids[answer - 1])
        assert ids[answer] == values[name] == ids[source]
        assert ids[source - 1] == name
        # The source is the name's most recent earlier occurrence.
        assert source % 2 == answer % 2 == 1
        assert name not in ids[source + 1 : answer - 1 : 2].tolist()  # names of the pairs in between


def test_loss_mask_marks_exactly_the_answers_and_never_a_binding():
    task = RecallTask(document_length=512)
    doc = task.generate(3)
    ids, mask = doc.document.ids, doc.document.loss_mask
    assert mask.dtype == torch.bool and mask.shape == ids.shape
    assert torch.equal(mask.nonzero().squeeze(1), doc.answer_positions)
    first_seen = set()
    for slot, name in enumerate(ids[0::2].tolist()):
        if name not in first_seen:
            first_seen.add(name)
            assert not mask[2 * slot + 1]  # a binding's value cannot be predicted


@pytest.mark.parametrize("min_distance,max_distance", [(2, 16), (40, 120), (200, 500)])
def test_distances_stay_in_the_requested_range(min_distance, max_distance):
    task = RecallTask(num_names=128, document_length=1024, min_distance=min_distance, max_distance=max_distance)
    distances = torch.cat([task.generate(seed).distances for seed in range(4)])
    assert len(distances) > 200
    assert distances.min() >= min_distance and distances.max() <= max_distance
    assert (distances % 2 == 0).all()


def test_distances_spread_log_uniformly_over_the_range():
    task = RecallTask(document_length=2048, num_names=256, min_distance=2, max_distance=1024)
    distances = torch.cat([task.generate(seed).distances for seed in range(4)]).float()
    # Roughly equal counts per octave, short and long alike.
    per_octave = torch.histc(distances.log2(), bins=9, min=1, max=10)
    assert per_octave.min() > 0.3 * per_octave.mean()


def test_distance_categories_follow_the_segment_layout():
    # Segments of 8, XL window of 8: the query is the token before the answer.
    answers = torch.tensor([10, 17, 17, 17, 16])
    sources = torch.tensor([9, 8, 7, 0, 5])
    # answer 10 -> query 9 in segment [8, 16): source 9 is local.
    # answer 17 -> query 16 in segment [16, 24): sources 8 and 7 are in / before the XL window [8, 16).
    # answer 16 -> query 15 in segment [8, 16): source 5 is in the XL window [0, 8).
    assert distance_categories(answers, sources, segment_length=8, xl_length=8).tolist() == [0, 1, 2, 2, 1]


def test_accuracy_by_category_counts_each_category():
    correct = torch.tensor([True, False, True, True])
    categories = torch.tensor([0, 0, 2, 2])
    result = accuracy_by_category(correct, categories)
    assert list(result) == list(DISTANCE_CATEGORIES)
    assert result["segment"] == {"accuracy": 0.5, "count": 2}
    assert result["memory"] == {"accuracy": 1.0, "count": 2}
    assert result["xl"]["count"] == 0


def test_invalid_parameters_are_refused():
    with pytest.raises(ValueError, match="min_distance"):
        RecallTask(min_distance=100, max_distance=50)
    with pytest.raises(ValueError, match="even"):
        RecallTask(document_length=101)
