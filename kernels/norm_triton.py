"""Triton RMSNorm (spec: tandem.kernels.norm.rms_norm), optionally fused with the residual add before it.

One program per row holds the whole row in registers, so the sum of squares, the normalisation and the
residual sum cost one read of each input and one write of each output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 65536  # one row must fit in one program's registers


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n_cols, eps,
    stride_x_row, stride_x_col, stride_r_row, stride_r_col, stride_w,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 on long prefills of wide rows
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x_row + cols * stride_x_col, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_r_row + cols * stride_r_col, mask=mask, other=0.0)
        # The sum is rounded to its storage dtype before the norm, as the reference's x + residual is.
        x = (x + res).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    # Qwen3 rounds the normalised row to x's dtype before the weight; the product then promotes like torch's.
    normed = (xf * rstd).to(x.dtype)
    w = tl.load(w_ptr + cols * stride_w, mask=mask, other=0.0)
    tl.store(out_ptr + row * n_cols + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    return min(16, max(1, block // 512))


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * x / rms(x) over the last dim; with `residual`, (rms_norm(x + residual), x + residual)."""
    hidden = x.shape[-1]
    if hidden > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {hidden} exceeds {MAX_HIDDEN}")
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, sum_dtype), device=x.device)
    summed = None if residual is None else torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    if x.numel():
        _launch(x, weight, eps, residual, out, summed)
    return out if residual is None else (out, summed)


def _launch(x, weight, eps, residual, out, summed) -> None:
    hidden = x.shape[-1]
    # reshape keeps strided rows (a view of a wider tensor) as a view whenever the leading dims merge.
    rows = x.reshape(-1, hidden)
    res = rows if residual is None else residual.reshape(-1, hidden)
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, res, weight, out, out if summed is None else summed, hidden, eps,
        rows.stride(0), rows.stride(1), res.stride(0), res.stride(1), weight.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
    )
