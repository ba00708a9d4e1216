"""Sampling in tensor ops (graphfix.engine.sampling): masks, the exponential race, the counter-based noise."""

from __future__ import annotations

import math

import pytest
import torch

from graphfix.engine.sampling import SamplingParams, filter_logits, hash32, sample, uniform_noise

PROBS = [0.5, 0.2, 0.15, 0.1, 0.05]


def _logits(probs=PROBS) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])


def _kept(top_k: int, top_p: float, logits: torch.Tensor | None = None) -> list[int]:
    logits = _logits() if logits is None else logits
    out = filter_logits(logits, torch.tensor([top_k]), torch.tensor([top_p]))
    return torch.isfinite(out[0]).nonzero().flatten().tolist()


@pytest.mark.parametrize("top_k,top_p,kept", [
    (0, 1.0, [0, 1, 2, 3, 4]),   # both off
    (2, 1.0, [0, 1]),
    (0, 0.7, [0, 1]),            # 0.5 + 0.2 reaches 0.7: the third is not needed
    (0, 0.71, [0, 1, 2]),
    (0, 0.3, [0]),               # the most likely token always stays
    (3, 0.9, [0, 1, 2]),         # top-p on the renormalized top-3: [.588, .235, .176]
    (3, 0.8, [0, 1]),            # .588 + .235 = .824 >= .8
])
def test_top_k_top_p_masks_on_a_hand_made_distribution(top_k, top_p, kept):
    assert _kept(top_k, top_p) == kept


def test_masks_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for k, p in [(5, 1.0), (0, 0.8), (10, 0.5), (50, 0.95)]:
        ref = logits.clone()
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1.0:
            ref = TopPLogitsWarper(p)(None, ref)
        mine = filter_logits(logits, torch.full((4,), k), torch.full((4,), p))
        assert torch.equal(torch.isfinite(mine), torch.isfinite(ref)), (k, p)


def test_per_row_parameters():
    logits = _logits().repeat(2, 1)
    out = filter_logits(logits, torch.tensor([1, 0]), torch.tensor([1.0, 0.71]))
    assert torch.isfinite(out).sum(-1).tolist() == [1, 3]


def _draw(mode: str, logits: torch.Tensor, seeds, step: int, temperature=1.0, top_k=0, top_p=1.0) -> torch.Tensor:
    b = logits.shape[0]
    return sample(logits, mode, torch.as_tensor(seeds), torch.tensor([step]), torch.full((b,), temperature),
                  torch.full((b,), top_k), torch.full((b,), top_p))


def test_greedy_and_top_k1_equal_argmax():
    torch.manual_seed(1)
    logits = torch.randn(8, 300)
    seeds = torch.arange(8)
    assert torch.equal(_draw("greedy", logits, seeds, 0), logits.argmax(-1))
    for step in range(5):
        assert torch.equal(_draw("filtered", logits, seeds, step, top_k=1), logits.argmax(-1))


def test_exponential_race_follows_the_distribution():
    logits = _logits().repeat(4000, 1)
    draws = _draw("sample", logits, torch.arange(4000), step=3)
    freq = torch.bincount(draws, minlength=5).float() / 4000
    assert (freq - torch.tensor(PROBS)).abs().max() < 0.03
    # temperature flattens: at T=1e3 the five tokens are nearly uniform
    draws = _draw("sample", logits, torch.arange(4000), step=3, temperature=1e3)
    assert (torch.bincount(draws, minlength=5).float() / 4000 - 0.2).abs().max() < 0.03


def test_noise_is_a_pure_function_of_seed_step_and_token():
    a = uniform_noise(torch.tensor([1, 2]), torch.tensor([5]), 1000)
    assert torch.equal(a, uniform_noise(torch.tensor([1, 2]), torch.tensor([5]), 1000))
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, uniform_noise(torch.tensor([1, 2]), torch.tensor([6]), 1000))
    assert 0 < a.min() and a.max() < 1 and abs(a.mean().item() - 0.5) < 0.02
    x = torch.tensor([0, 1, 2**32 - 1, 123456789])  # 32-bit arithmetic in int64: no overflow, stays in range
    h = hash32(x)
    assert h.min() >= 0 and h.max() < 2**32 and len(set(h.tolist())) == 4


def test_compiled_sampling_draws_the_same_tokens():
    torch.manual_seed(2)
    logits = torch.randn(3, 200)

    def draw(logits, seeds, step, temperature, top_k, top_p):
        return sample(logits, "filtered", seeds, step, temperature, top_k, top_p)

    args = (logits, torch.tensor([4, 5, 6]), torch.tensor([2]), torch.full((3,), 0.8), torch.tensor([20, 0, 5]),
            torch.tensor([0.9, 0.5, 1.0]))
    compiled = torch.compile(draw, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*args), draw(*args))


def test_sampling_params_mode_and_validation():
    assert SamplingParams().mode == "greedy"
    assert SamplingParams(temperature=0.7).mode == "sample"
    assert SamplingParams(temperature=0.7, top_p=0.9).mode == "filtered"
    assert SamplingParams(temperature=0.7, top_k=40).mode == "filtered"
    assert SamplingParams(temperature=0.7, top_p=1.0, top_k=0).mode == "sample"
    for bad in ({"temperature": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
