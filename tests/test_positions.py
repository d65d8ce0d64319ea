import pytest
import torch
from transformers.models.t5.modeling_t5 import T5Attention

from memorizing_transformers import MemorizingConfig, MemorizingTransformer, relative_position_bucket
from memorizing_transformers.model.positions import RelativePositionBias, segment_distances, segment_relative_positions


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (8, 20)])
def test_bucket_equals_hugging_face_t5(causal, num_buckets, max_distance):
    relative = torch.arange(-600, 601)[None, :] - torch.arange(0, 5)[:, None]
    ours = relative_position_bucket(relative, causal=causal, num_buckets=num_buckets, max_distance=max_distance)
    reference = T5Attention._relative_position_bucket(
        relative, bidirectional=not causal, num_buckets=num_buckets, max_distance=max_distance
    )
    assert torch.equal(ours, reference)


def test_causal_buckets_by_distance():
    distance = torch.arange(0, 300)
    buckets = relative_position_bucket(-distance)
    assert buckets[:16].tolist() == list(range(16))  # exact small distances
    assert buckets[128:].eq(31).all()  # beyond max_distance: the last bucket
    assert (buckets[1:] >= buckets[:-1]).all()  # monotone in distance
    assert relative_position_bucket(torch.arange(1, 10)).eq(0).all()  # the future carries no information


def test_queries_are_aligned_with_the_last_keys():
    relative = segment_relative_positions(query_length=3, cache_length=4)
    assert relative.shape == (3, 7)
    # Query i sits at absolute position 4 + i; key j at position j.
    for i in range(3):
        for j in range(7):
            assert relative[i, j] == j - (4 + i)
    assert relative.diagonal(offset=4).eq(0).all()


@pytest.mark.parametrize("query_length,cache_length", [(8, 0), (8, 8), (5, 12), (1, 7)])
def test_segment_bias_is_the_lookup_of_every_query_key_bucket(query_length, cache_length):
    torch.manual_seed(0)
    bias = RelativePositionBias(n_heads=3, num_buckets=16, max_distance=20)
    torch.nn.init.normal_(bias.embedding.weight)
    distances = relative_position_bucket(segment_distances(query_length, cache_length), True, 16, 20)
    laid = bias.segment(distances, query_length)
    looked_up = bias(relative_position_bucket(segment_relative_positions(query_length, cache_length), True, 16, 20))
    assert torch.equal(laid, looked_up)
    grad = torch.randn_like(laid)
    (first,) = torch.autograd.grad(laid, bias.embedding.weight, grad)
    (second,) = torch.autograd.grad(looked_up, bias.embedding.weight, grad)
    torch.testing.assert_close(first, second)


def test_model_uses_aligned_buckets_with_an_xl_cache():
    config = MemorizingConfig.preset("tiny", segment_length=8, xl_length=8)
    model = MemorizingTransformer(config).eval()
    bias = model.blocks[0].attn.position_bias
    with torch.no_grad():
        bias.embedding.weight.copy_(torch.arange(float(config.num_buckets))[:, None])  # the bias is the bucket
    seen = []
    bias.embedding.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    ids = torch.randint(0, config.vocab_size, (1, 16))
    model(ids)  # two segments: the second one has a cache of 8
    first, second = seen
    assert first.shape == (8 + 7,) and second.shape == (16 + 7,)
    laid = bias.segment(second, 8)[0]  # (8 queries, 16 keys)
    for i in range(8):
        for j in range(16):
            assert laid[i, j] == relative_position_bucket(torch.tensor(j - (8 + i)))
    # The buggy alignment (queries with the first keys) would put the whole cache in bucket 0.
    assert laid[:, :8].ne(0).all()
