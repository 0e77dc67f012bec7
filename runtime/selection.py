"""Key-token selection for reasoning transfer: which of the small model's reasoning tokens the large model needs.

Attention over reasoning tokens is sparse: a small subset receives most of the attention mass. A token's score
is the attention it received from the later reasoning steps in the small model, summed over heads, layers and
steps (the decode kernels' key-mass output); the kept set is the smallest one whose scores reach a fraction
delta of the total, returned in the original order so the large model reads the tokens as they were written.
"""

from __future__ import annotations

import torch

KEEP_MODES = ("all", "attention")
DEFAULT_DELTA = 0.8


def select_key_tokens(scores: torch.Tensor, delta: float) -> torch.Tensor:
    """scores [N] float -> ascending int64 indices of the fewest tokens whose scores sum to >= delta * total.
    Ties go to the earlier token. With no mass at all (N <= 1: nothing attended yet) every token is kept."""
    if not 0 < delta <= 1:
        raise ValueError(f"delta must be in (0, 1], got {delta}")
    order = torch.argsort(scores, descending=True, stable=True)
    mass = scores[order].cumsum(0)
    # The total is the cumsum's own end: a separately computed sum can round above it and never be reached.
    if scores.numel() == 0 or mass[-1] <= 0:
        return torch.arange(scores.numel(), device=scores.device)
    count = int((mass >= delta * mass[-1]).int().argmax()) + 1  # the first prefix of the ranking that reaches delta
    return order[:count].sort().values
