"""Triton SwiGLU on a fused gate_up projection (spec: tandem.kernels.activation.silu_and_mul)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_MAX = 1024


@triton.jit
def _silu_and_mul_kernel(in_ptr, out_ptr, n_cols, stride_row, stride_col, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 on long prefills of wide MLPs
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    base = in_ptr + row * stride_row
    gate = tl.load(base + cols * stride_col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(base + (cols + n_cols) * stride_col, mask=mask, other=0.0)
    # silu in float32, rounded to the input dtype before the product, as F.silu(gate) * up rounds.
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2*I] laid out as [gate | up] -> silu(gate) * up, [..., I]."""
    inter = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    rows = gate_up.reshape(-1, 2 * inter)  # a view for the usual [T, 2I] input, strided or not
    block = min(BLOCK_MAX, triton.next_power_of_2(inter))
    grid = (rows.shape[0], triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](
        rows, out, inter, rows.stride(0), rows.stride(1), BLOCK=block, num_warps=max(1, min(8, block // 256))
    )
    return out
