"""Sampling: per-row parameters, per-request generators, top-k / top-p, logprobs."""
from __future__ import annotations

import pytest
import torch

from server.sampler import sample
from server.sampling import ParamError, SamplingParams


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0, logprobs=3)] * 3
    res = sample(logits, params, gens(3))
    assert res.token_ids == logits.argmax(-1).tolist()
    lp = logits.log_softmax(-1)
    for i, entry in enumerate(res.logprobs):
        assert entry.token_id == res.token_ids[i]
        assert entry.logprob == pytest.approx(lp[i, entry.token_id].item(), abs=1e-6)
        top_ids = [t for t, _ in entry.top]
        assert top_ids == lp[i].topk(3).indices.tolist()


def test_seeded_row_does_not_depend_on_batch_neighbours():
    torch.manual_seed(1)
    logits = torch.randn(4, 100)
    p = SamplingParams(temperature=1.0, seed=5)
    alone = sample(logits[2:3], [p], [torch.Generator().manual_seed(5)]).token_ids[0]
    mixed_params = [SamplingParams(temperature=0.7), SamplingParams(temperature=0.0), p, SamplingParams(top_k=3)]
    mixed_gens = gens(4, 100)
    mixed_gens[2] = torch.Generator().manual_seed(5)
    assert sample(logits, mixed_params, mixed_gens).token_ids[2] == alone


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0, -10.0]]).repeat(200, 1)
    top_k = sample(logits, [SamplingParams(temperature=2.0, top_k=2)] * 200, gens(200)).token_ids
    assert set(top_k) == {0, 1}
    # probabilities at temperature 1: ~0.665, 0.245, 0.090: top_p=0.7 keeps the first two only
    top_p = sample(logits, [SamplingParams(temperature=1.0, top_p=0.7)] * 200, gens(200)).token_ids
    assert set(top_p) == {0, 1}
    top_p_small = sample(logits, [SamplingParams(temperature=1.0, top_p=0.1)] * 50, gens(50)).token_ids
    assert set(top_p_small) == {0}


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(3000, 1)
    ids = torch.tensor(sample(logits, [SamplingParams(temperature=1.0)] * 3000, gens(3000)).token_ids)
    freq = torch.bincount(ids, minlength=3).float() / 3000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04, rtol=0)


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"top_k": -2}, "top_k"), ({"stop": [""]}, "stop"), ({"logprobs": 50}, "logprobs"),
])
def test_bad_params_name_the_field(kwargs, param):
    with pytest.raises(ParamError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-38, 9e-6])
def test_tiny_temperature_is_greedy(temperature):
    """#11 B: logits / 1e-300 overflow to inf and multinomial raised; any temperature below MIN_TEMPERATURE
    samples the argmax instead, and its logprobs are still the model's."""
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(3)) * 30
    params = [SamplingParams(temperature=temperature, logprobs=2), SamplingParams(temperature=0.7),
              SamplingParams(temperature=temperature, top_p=0.5)]
    res = sample(logits, params, gens(3))
    assert [res.token_ids[0], res.token_ids[2]] == [logits[0].argmax().item(), logits[2].argmax().item()]
    assert res.logprobs[0].logprob == pytest.approx(logits[0].log_softmax(-1).max().item(), abs=1e-5)
