import pytest
import torch

from qoq.sampling import SamplingParams, filter_logits, sample


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(stop=[""]), "stop"),
    (dict(stop=["x"], detokenize=False), "detokenize"),
])
def test_bad_params_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


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
