"""The sampler against plain-Python references of temperature, top-k and top-p, and SamplingParams checks."""

from __future__ import annotations

import json

import pytest
import torch

from tandem.models.errors import InputError
from tandem.runtime.sampling import (SamplingParams, SamplingRows, checkpoint_defaults, filtered_probs, gumbel_noise,
                                     sample, seed_key)


def reference_support(logits: list[float], top_k: int, top_p: float) -> set[int]:
    """Token ids that may be drawn: the top_k most likely, then the smallest prefix of them reaching top_p."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])[: top_k or len(logits)]
    weights = [torch.tensor(logits[i]).exp().item() for i in order]
    kept, mass, total = [], 0.0, sum(weights)
    for i, w in zip(order, weights):
        if mass >= top_p * total:
            break
        kept.append(i)
        mass += w
    return set(kept)


def draw(logits: torch.Tensor, params: SamplingParams | list[SamplingParams], seeds=0, steps=0) -> torch.Tensor:
    """One draw per row of logits [B, vocab]; params, seeds and steps: one for every row, or one per row."""
    rows = logits.shape[0]
    params = params if isinstance(params, list) else [params] * rows
    seeds = seeds if isinstance(seeds, list) else [seeds] * rows
    steps = steps if isinstance(steps, list) else [steps] * rows
    return sample(logits, SamplingRows.of(params, [seed_key(s) for s in seeds], steps, logits.shape[1],
                                          logits.device))


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (5, 1.0), (3, 0.9), (0, 0.999), (1, 1.0)])
def test_draws_stay_in_the_reference_support(top_k, top_p):
    logits = torch.randn(1, 37, generator=torch.Generator().manual_seed(0)) * 2
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    draws = set(draw(logits.expand(400, 37), params, steps=list(range(400))).tolist())
    support = reference_support(logits[0].tolist(), top_k, top_p)
    assert draws <= support
    assert len(draws) >= min(len(support), 2)  # it really samples when more than one token is allowed


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.3, 8, 1.0), (1.0, 12, 0.7)])
def test_draws_follow_the_filtered_softmax(temperature, top_k, top_p):
    """A chi-square goodness-of-fit test with fixed seeds: 40,000 draws (one request's steps 0..39,999) against
    the softmax of the temperature-scaled logits over the reference support, computed in float64."""
    vocab, draws = 50, 40_000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(3)) * 1.5
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    tokens = draw(logits.expand(draws, vocab), params, seeds=11, steps=list(range(draws)))
    counts = torch.bincount(tokens, minlength=vocab).double()
    scaled = logits[0].double() / temperature
    support = sorted(reference_support(scaled.tolist(), top_k, top_p))
    assert set(counts.nonzero().flatten().tolist()) <= set(support)
    expected = scaled[support].softmax(dim=0) * draws
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    dof = torch.tensor(len(support) - 1, dtype=torch.float64)
    p_value = torch.special.gammaincc(dof / 2, statistic / 2).item()  # the chi-square survival function
    assert len(support) > 3 and p_value > 1e-3, (len(support), statistic.item(), p_value)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.3, 8, 1.0), (1.0, 12, 0.7)])
def test_filtered_probs_are_the_softmax_over_the_reference_support(temperature, top_k, top_p):
    """The distribution speculative sampling reasons with is the one `sample` draws from."""
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(5)) * 1.5
    probs = filtered_probs(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    for row in range(2):
        scaled = logits[row].double() / temperature
        support = sorted(reference_support(scaled.tolist(), top_k, top_p))
        expected = torch.zeros(50, dtype=torch.float64)
        expected[support] = scaled[support].softmax(dim=0)
        torch.testing.assert_close(probs[row], expected, atol=1e-6, rtol=1e-5)


def test_a_row_draws_the_same_alone_or_in_any_batch():
    """Each row's noise and filters are its own: a seeded request draws the same token at the same step whatever
    else is in the batch (greedy rows, other filters, other seeds, the whole-row top-p path)."""
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(4)) * 2
    params = [SamplingParams(temperature=0.0, top_k=0, top_p=1.0), SamplingParams(temperature=1.0, top_k=5, top_p=0.9),
              SamplingParams(temperature=0.7, top_k=0, top_p=0.8), SamplingParams(temperature=1.3, top_k=0, top_p=1.0),
              SamplingParams(temperature=0.9, top_k=40, top_p=1.0), SamplingParams(temperature=1.0, top_k=2, top_p=0.5)]
    for step in range(20):
        together = draw(logits, params, seeds=list(range(6)), steps=step)
        alone = [draw(logits[i : i + 1], params[i], seeds=i, steps=step).item() for i in range(6)]
        assert together.tolist() == alone
        assert together[0] == logits[0].argmax()


def test_greedy_is_argmax_and_seeded_sampling_repeats():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(draw(logits, SamplingParams(temperature=0.0, top_k=0, top_p=1.0)), logits.argmax(-1))
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20)
    a = draw(logits, params, seeds=7, steps=[0, 1, 2, 3])
    assert torch.equal(a, draw(logits, params, seeds=7, steps=[0, 1, 2, 3]))
    others = [draw(logits, params, seeds=seed, steps=[0, 1, 2, 3]) for seed in range(8, 16)]
    assert any(not torch.equal(a, b) for b in others)  # another seed, other draws


def test_temperature_sharpens_towards_argmax():
    logits = torch.tensor([[1.0, 2.0, 1.5]])
    draws = draw(logits.expand(200, 3), SamplingParams(temperature=0.05, top_k=0, top_p=1.0), steps=list(range(200)))
    assert draws.tolist().count(1) >= 195


@pytest.mark.parametrize("temperature", [1e-40, 1e-6])
def test_a_temperature_too_small_for_float32_decodes_greedily(temperature):
    """logits / 1e-40 overflows float32; under 1e-5 the draw is the argmax."""
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(2)) * 5
    params = SamplingParams(temperature=temperature, top_p=0.9).resolve(SamplingParams(temperature=1.0, top_p=1.0, top_k=0))
    assert params.temperature == 0.0
    assert torch.equal(draw(logits, params), logits.argmax(-1))


def test_the_noise_is_uniform_enough_for_its_gumbel():
    """The counter-based noise behind every draw: its 24-bit uniforms spread evenly over (0, 1) (a chi-square over
    64 bins), and neighbouring token ids and steps are uncorrelated."""
    ids = torch.arange(100_000).expand(2, -1)
    noise = gumbel_noise(torch.tensor([seed_key(1), seed_key(2)]), torch.tensor([0, 0]), ids)
    uniform = torch.exp(-torch.exp(-noise.double()))  # the Gumbel's CDF gives the uniform back
    counts = torch.histc(uniform[0], bins=64, min=0, max=1)
    expected = uniform.shape[1] / 64
    statistic = ((counts.double() - expected) ** 2 / expected).sum()
    assert torch.special.gammaincc(torch.tensor(31.5, dtype=torch.float64), statistic / 2) > 1e-3
    assert abs(torch.corrcoef(uniform)[0, 1]) < 0.02  # two seeds
    assert abs(torch.corrcoef(torch.stack([uniform[0, :-1], uniform[0, 1:]]))[0, 1]) < 0.02  # neighbouring ids


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -1.0), ("temperature", float("nan")),
                                         ("temperature", float("inf")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2)])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(InputError, match=rf"SamplingParams\.{field}"):
        SamplingParams(**{field: value}).resolve(SamplingParams(temperature=1.0, top_p=1.0, top_k=0))


def test_defaults_come_from_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "eos_token_id": [151645, 151643]}))
    defaults, eos = checkpoint_defaults(tmp_path)
    assert eos == (151645, 151643)
    params = SamplingParams(top_k=5).resolve(defaults)
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.8, 5)


def test_do_sample_false_means_greedy(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": 2}))
    defaults, eos = checkpoint_defaults(tmp_path)
    assert defaults.temperature == 0.0 and eos == (2,)
