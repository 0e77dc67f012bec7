"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * x / rms(x) over the last dim, normalised in float32 and cast back before the weight (as Qwen3 does).

    With `residual`, first forms s = x + residual and returns (rms_norm(s), s): the sum is the next residual.
    """
    if residual is not None:
        x = x + residual
    out = x.float()
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * out.to(x.dtype)
    return out if residual is None else (out, x)
