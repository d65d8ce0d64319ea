import pytest
import torch

from memorizing_transformers.data.streaming import StreamingBatcher, TokenizedDocument


def documents(lengths, seed=0):
    """Random documents; the first token (1000 + i) tells them apart."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, 1000, (n,), generator=g)
        ids[:1] = 1000 + i
        docs.append(TokenizedDocument(f"doc{i}", ids))
    return docs


def replay(batcher):
    """Reassemble, per document, the inputs and targets each row streamed, checking row pinning and flags."""
    streamed: dict[int, dict] = {}
    current = [None] * batcher.batch_size
    for batch in batcher:
        assert batch.input_ids.shape == (batcher.batch_size, batcher.segment_length)
        assert (batch.input_ids[~batch.attention_mask] == 0).all()
        assert (batch.targets[~batch.attention_mask] == -100).all()
        for row in range(batcher.batch_size):
            n = int(batch.attention_mask[row].sum())
            assert batch.attention_mask[row, :n].all()  # padding only at the end
            if batch.start_of_document[row]:
                current[row] = None
            if n == 0:
                assert batch.document_index[row] == -1
                continue
            ids = batch.input_ids[row, :n]
            if current[row] is None:
                matches = [i for i, d in enumerate(batcher.documents) if d.ids[0] == ids[0]]
                assert batch.start_of_document[row] and len(matches) == 1 and matches[0] not in streamed
                current[row] = matches[0]
                streamed[current[row]] = {"inputs": [], "targets": [], "positions": [], "row": row}
            else:
                assert not batch.start_of_document[row]
            assert batch.document_index[row] == current[row]
            record = streamed[current[row]]
            assert record["row"] == row  # a document never changes rows
            record["inputs"].append(ids)
            record["targets"].append(batch.targets[row, :n])
            record["positions"].append(batch.positions[row, :n])
    return streamed


@pytest.mark.parametrize("batch_size", [1, 3])
def test_every_token_once_in_order_in_one_row(batch_size):
    docs = documents([50, 7, 2, 33, 16, 17, 1, 90])
    batcher = StreamingBatcher(docs, batch_size=batch_size, segment_length=16, seed=3)
    streamed = replay(batcher)
    kept = [d for d in docs if d.ids.numel() >= 2]
    assert len(streamed) == len(kept)
    for index, record in streamed.items():
        doc = batcher.documents[index]
        assert torch.equal(torch.cat(record["inputs"]), doc.ids[:-1])
        assert torch.equal(torch.cat(record["targets"]), doc.ids[1:])
        assert torch.equal(torch.cat(record["positions"]), torch.arange(1, doc.ids.numel()))


def test_loss_mask_hides_targets():
    ids = torch.arange(1, 21)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[5, 11, 19]] = True
    batch = next(StreamingBatcher([TokenizedDocument("d", ids, mask)], 1, 32))
    scored = batch.targets[batch.targets != -100]
    assert scored.tolist() == [6, 12, 20]
    assert batch.num_targets == 3


def test_shuffle_is_seeded_and_epochs_reshuffle():
    docs = documents([20] * 12)

    def first_tokens(seed, epochs):
        batcher = StreamingBatcher(docs, 1, 32, seed=seed, epochs=epochs)
        return [int(b.input_ids[0, 0]) for b in batcher]

    assert first_tokens(1, 1) == first_tokens(1, 1)
    assert first_tokens(1, 1) != first_tokens(2, 1)
    two = first_tokens(1, 2)
    assert len(two) == 24 and sorted(two[:12]) == sorted(two[12:]) and two[:12] != two[12:]


def test_resume_continues_the_exact_stream():
    docs = documents([45, 13, 70, 22, 9, 31])
    reference = StreamingBatcher(docs, 2, 8, seed=5, epochs=None)
    expected = [next(reference) for _ in range(40)]
    batcher = StreamingBatcher(docs, 2, 8, seed=5, epochs=None)
    for _ in range(17):
        next(batcher)
    saved = batcher.state_dict()
    resumed = StreamingBatcher(docs, 2, 8, seed=5, epochs=None)
    resumed.load_state_dict(saved)
    for want in expected[17:]:
        got = next(resumed)
        for field in ("input_ids", "targets", "attention_mask", "positions", "start_of_document"):
            assert torch.equal(getattr(got, field), getattr(want, field))


def test_bad_input():
    with pytest.raises(ValueError, match="nothing to stream"):
        StreamingBatcher(documents([1, 0]), 1, 8)
    with pytest.raises(ValueError, match="loss_mask shape"):
        TokenizedDocument("d", torch.arange(5), torch.ones(4, dtype=torch.bool))
    batcher = StreamingBatcher(documents([10]), 1, 8, seed=0)
    with pytest.raises(ValueError, match="different seed or batch size"):
        StreamingBatcher(documents([10]), 1, 8, seed=1).load_state_dict(batcher.state_dict())
