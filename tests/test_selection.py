"""Key-token selection against a direct reading of its rule."""

from __future__ import annotations

import pytest
import torch

from tandem.runtime.selection import select_key_tokens


def reference(scores: list[float], delta: float) -> list[int]:
    """Greedy: take tokens from the highest score down (earlier first on ties) until delta of the mass is in."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    total = 0.0
    for i in ranked:  # summed in the ranking's order, as the running mass below is
        total += scores[i]
    if total <= 0:
        return list(range(len(scores)))
    kept, mass = [], 0.0
    for i in ranked:
        kept.append(i)
        mass += scores[i]
        if mass >= delta * total:
            break
    return sorted(kept)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("delta", [0.5, 0.8, 0.95, 1.0])
def test_matches_the_rule_on_sparse_scores(seed, delta):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(57, generator=gen, dtype=torch.float64) ** 6  # heavy-tailed, like attention mass
    assert select_key_tokens(scores, delta).tolist() == reference(scores.tolist(), delta)


def test_ties_keep_the_earlier_token_and_order_is_original():
    scores = torch.tensor([1.0, 3.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    assert select_key_tokens(scores, 0.6).tolist() == [1, 3]
    assert select_key_tokens(scores, 0.7).tolist() == [1, 3, 4]
    assert select_key_tokens(scores, 0.85).tolist() == [0, 1, 3, 4]


def test_degenerate_inputs():
    assert select_key_tokens(torch.zeros(0), 0.8).tolist() == []
    assert select_key_tokens(torch.zeros(3), 0.8).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="delta must be in"):
        select_key_tokens(torch.ones(3), 0.0)
