"""Rotary position embeddings: one rule for the text decoder's interleaved M-RoPE and the vision tower's 2-D RoPE.

Each frequency j rotates by position[axes[j]] * inv_freq[j]; the angles cover half the head and are repeated
for the other half (the rotate-half layout). Text: axes pick T/H/W per frequency (interleaved M-RoPE); vision:
the first half of the frequencies follow the row, the second half the column.
"""

from __future__ import annotations

import torch

from tandem.kernels.attention import store_kv
from tandem.kernels.norm import rms_norm


def rotary_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """The standard RoPE inverse frequencies, float32, computed exactly as the reference model does."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def mrope_axes(mrope_section: tuple[int, int, int]) -> torch.Tensor:
    """Axis (0=T, 1=H, 2=W) of each of the head_dim/2 frequencies under interleaved M-RoPE.

    Frequency j follows H when j % 3 == 1 and j < 3 * section[1], W when j % 3 == 2 and j < 3 * section[2],
    and T otherwise (Qwen3-VL spreads the three axes over the spectrum instead of giving each a block).
    """
    j = torch.arange(sum(mrope_section))
    axes = torch.zeros_like(j)
    axes[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
    axes[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
    return axes


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, axes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [A, T] int, inv_freq [F] float32, axes [F] in [0, A) -> cos, sin [T, 2F] float32."""
    angles = positions[axes].T.float() * inv_freq.to(positions.device)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by cos/sin [T, D] in the rotate-half layout; computed in float32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def qk_norm_rope_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
    cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """The text attention's input step in one op: per-head RMSNorm of q [T, H, D] and k [T, Hkv, D], rotation of
    both by cos/sin [T, D], and k, v written into the paged caches at slot_mapping [T]. Returns the rotated q."""
    q = apply_rotary(rms_norm(q, q_weight, eps), cos, sin)
    k = apply_rotary(rms_norm(k, k_weight, eps), cos, sin)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q
