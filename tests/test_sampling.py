import pytest
import torch

from qoq.sampling import SamplingParamError, SamplingParams, filter_logits, filter_logits_rows, sample


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(stop=[""]), "stop"),
    (dict(stop=["x"], detokenize=False), "detokenize"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(max_tokens=2**31), "max_tokens"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=1e6), "temperature"),
    (dict(top_k=2**63), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(seed=2**64), "seed"),
    (dict(seed=-(2**63) - 1), "seed"),
    (dict(seed=True), "seed"),
    (dict(stop=["x"] * 17), "at most 16"),
    (dict(stop=["x" * 257]), "at most 256"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=[2**40]), "stop_token_ids"),
    (dict(stop_token_ids=list(range(257))), "stop_token_ids"),
])
def test_bad_params_rejected(kwargs, message):
    with pytest.raises(SamplingParamError, match=message) as err:
        SamplingParams(**kwargs)
    assert err.value.param == next(iter(kwargs)) or err.value.param == "stop"


def test_the_edges_of_every_range_are_accepted():
    for seed in (-(2**63), 2**64 - 1):
        params = SamplingParams(temperature=1.0, seed=seed)
        torch.Generator().manual_seed(params.seed)
    SamplingParams(max_tokens=2**31 - 1, temperature=2.0, top_k=2**31 - 1, top_p=1e-300,
                   stop=["x" * 256] * 16, stop_token_ids=list(range(256)))


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 4.9e-324, 1e-5])
def test_tiny_temperatures_give_the_greedy_token_not_nan(temperature):
    logits = torch.randn(3, 100) * 30
    params = SamplingParams(temperature=temperature, seed=0)
    assert torch.equal(sample(logits, params, torch.Generator().manual_seed(0)), logits.argmax(-1))


def test_top_p_that_rounds_to_zero_keeps_the_top_token():
    logits = torch.randn(2, 50)
    out = filter_logits(logits, top_k=0, top_p=1e-300)
    assert torch.isfinite(out).sum(-1).tolist() == [1, 1]
    assert torch.equal(out.argmax(-1), logits.argmax(-1))


def test_top_k_beyond_the_vocabulary_keeps_everything():
    logits = torch.randn(2, 50)
    rows = filter_logits_rows(logits, torch.tensor([2**31 - 1, 50]), torch.tensor([1.0, 1.0]))
    assert torch.equal(rows, logits)


def test_top_k_keeps_k_largest():
    logits = torch.randn(3, 50)
    out = filter_logits(logits, top_k=5, top_p=1.0)
    kept = torch.isfinite(out)
    assert kept.sum(-1).tolist() == [5, 5, 5]
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(5).indices, True))


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_logits(probs.log(), top_k=0, top_p=0.75)
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    out = filter_logits(probs.log()[:, [3, 1, 0, 2]], top_k=0, top_p=0.5)  # order must not matter
    assert torch.isfinite(out).tolist() == [[False, False, True, False]]


def test_greedy_and_seeded_sampling():
    logits = torch.randn(4, 100)
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
    a = sample(logits, params, torch.Generator().manual_seed(7))
    b = sample(logits, params, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_temperature_sampling_follows_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(20000, 1)
    draws = sample(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.02)


def _filter_one_row(logits, top_k, top_p):
    """An independent oracle: torch.topk for top-k, then the nucleus over what is left."""
    if top_k and top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        sorted_logits = sorted_logits.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def test_per_row_filters_equal_the_scalar_filter():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 50, generator=gen) * 3
    settings = [(0, 1.0), (5, 1.0), (0, 0.7), (10, 0.5), (50, 0.9), (1, 1.0), (3, 0.01)]
    top_k = torch.tensor([k for k, _ in settings])
    top_p = torch.tensor([p for _, p in settings])
    batched = filter_logits_rows(logits, top_k, top_p)
    for row, (k, p) in enumerate(settings):
        assert torch.equal(batched[row], _filter_one_row(logits[row], k, p)), (k, p)
        assert torch.equal(batched[row], filter_logits(logits[row : row + 1], k, p)[0]), (k, p)


def test_engine_batched_sampling_follows_each_rows_distribution():
    """Unseeded sampling rows are drawn together; each still follows its own filtered distribution."""
    from qoq.engine.sampler import sample_tokens
    from qoq.engine.sequence import Sequence

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 3)
    seqs = [Sequence("a", [1], SamplingParams(temperature=1.0, top_k=2)),
            Sequence("b", [1], SamplingParams(temperature=0.0)),
            Sequence("c", [1], SamplingParams(temperature=1.0, top_p=0.7))]
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_tokens(logits, seqs, gen) for _ in range(4000)])
    assert set(draws[:, 0].tolist()) == {0, 1}  # top-k 2
    assert abs((draws[:, 0] == 0).float().mean().item() - 1 / (1 + torch.e**-1)) < 0.03
    assert set(draws[:, 1].tolist()) == {0}  # greedy
    assert set(draws[:, 2].tolist()) == {0, 1}  # p = 0.64, 0.24, ...: the nucleus of 0.7 is {0, 1}
    assert abs((draws[:, 2] == 0).float().mean().item() - 0.644 / 0.881) < 0.03


def test_engine_batched_sampling_without_filters_reaches_every_token():
    from qoq.engine.sampler import sample_tokens
    from qoq.engine.sequence import Sequence

    logits = torch.tensor([[0.5, 0.0, -0.5, 0.2]] * 2)
    seqs = [Sequence(s, [1], SamplingParams(temperature=2.0)) for s in "ab"]
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_tokens(logits, seqs, gen) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1, 2, 3}


def test_two_pass_argmax_is_the_first_maximal_index():
    """The chunked argmax of small greedy batches picks what torch.argmax picks: the first maximal
    index, with ties inside a chunk and across chunks, rows of -inf, and large negative values."""
    from qoq.sampling import _argmax_chunks, argmax_two_pass

    gen = torch.Generator().manual_seed(0)
    v = 128256
    assert _argmax_chunks(v) == 256 and _argmax_chunks(32000) == 256 and _argmax_chunks(1009) == 1
    x = torch.randn(5, v, generator=gen)
    x[1, 700] = x[1, 9000] = x[1, 9001] = 50.0  # ties across chunks and inside one
    x[2] = float("-inf")
    x[3, :] = -3.0e38
    x[4, v - 1] = 60.0  # the last element
    for chunks in (256, 16, 501):
        assert torch.equal(argmax_two_pass(x, chunks), x.argmax(dim=-1))
    assert argmax_two_pass(x, 256)[1] == 700
