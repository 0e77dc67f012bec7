"""The sampler against plain-Python references of temperature, top-k and top-p, and SamplingParams checks."""

from __future__ import annotations

import json

import pytest
import torch

from tandem.models.errors import InputError
from tandem.runtime.sampling import SamplingParams, checkpoint_defaults, sample


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


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (5, 1.0), (3, 0.9), (0, 0.999), (1, 1.0)])
def test_draws_stay_in_the_reference_support(top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 37, generator=gen) * 2
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    draws = {int(sample(logits, params, gen)) for _ in range(400)}
    support = reference_support(logits[0].tolist(), top_k, top_p)
    assert draws <= support
    assert len(draws) >= min(len(support), 2)  # it really samples when more than one token is allowed


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.3, 8, 1.0), (1.0, 12, 0.7)])
def test_draws_follow_the_filtered_softmax(temperature, top_k, top_p):
    """A chi-square goodness-of-fit test with fixed seeds: 40,000 draws (rows of one call, each drawn on its own)
    against the softmax of the temperature-scaled logits over the reference support, computed in float64."""
    vocab, draws = 50, 40_000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(3)) * 1.5
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    tokens = sample(logits.expand(draws, vocab).contiguous(), params, torch.Generator().manual_seed(11))
    counts = torch.bincount(tokens, minlength=vocab).double()
    scaled = logits[0].double() / temperature
    support = sorted(reference_support(scaled.tolist(), top_k, top_p))
    assert set(counts.nonzero().flatten().tolist()) <= set(support)
    expected = scaled[support].softmax(dim=0) * draws
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    dof = torch.tensor(len(support) - 1, dtype=torch.float64)
    p_value = torch.special.gammaincc(dof / 2, statistic / 2).item()  # the chi-square survival function
    assert len(support) > 3 and p_value > 1e-3, (len(support), statistic.item(), p_value)


def test_greedy_is_argmax_and_seeded_sampling_repeats():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0), None), logits.argmax(-1))
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20)
    a = sample(logits, params, torch.Generator().manual_seed(7))
    b = sample(logits, params, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_temperature_sharpens_towards_argmax():
    logits = torch.tensor([[1.0, 2.0, 1.5]])
    gen = torch.Generator().manual_seed(0)
    draws = [int(sample(logits, SamplingParams(temperature=0.05, top_k=0, top_p=1.0), gen)) for _ in range(200)]
    assert draws.count(1) >= 195


@pytest.mark.parametrize("temperature", [1e-40, 1e-6])
def test_a_temperature_too_small_for_float32_decodes_greedily(temperature):
    """logits / 1e-40 overflows float32 (torch's multinomial then refuses inf); under 1e-5 the draw is the argmax."""
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(2)) * 5
    params = SamplingParams(temperature=temperature, top_p=0.9).resolve(SamplingParams(temperature=1.0, top_p=1.0, top_k=0))
    assert params.temperature == 0.0
    assert torch.equal(sample(logits, params, torch.Generator().manual_seed(0)), logits.argmax(-1))


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
