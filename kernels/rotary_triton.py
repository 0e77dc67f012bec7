"""Triton rotary embeddings (spec: tandem.kernels.rotary): apply_rotary for the vision tower and the text
attention's fused input step, qk_norm_rope_store.

A program owns one token and a block of heads. Heads are tiles [heads, D/2] holding the two halves of the
rotate-half layout apart, so the rotation needs no shuffle and cos/sin are loaded once per token for every head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TILE = 512  # elements of one half-tile: heads * D/2 per program, a few registers per thread


@triton.jit
def _load_halves(ptr, heads, d, mask, half, stride_h, stride_d):
    """Both halves [heads, D/2] of the rows ptr[heads, :], in their stored dtype."""
    rows = ptr + heads[:, None] * stride_h
    x1 = tl.load(rows + d[None, :] * stride_d, mask=mask, other=0.0)
    x2 = tl.load(rows + (d[None, :] + half) * stride_d, mask=mask, other=0.0)
    return x1, x2


@triton.jit
def _store_halves(ptr, x1, x2, heads, d, mask, half, stride_h, stride_d):
    rows = ptr + heads[:, None] * stride_h
    tl.store(rows + d[None, :] * stride_d, x1.to(ptr.dtype.element_ty), mask=mask)
    tl.store(rows + (d[None, :] + half) * stride_d, x2.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate(x1, x2, cos_row, sin_row, d, half, stride_cd, stride_sd):
    """(x * cos + rotate_half(x) * sin) in float32; cos/sin halves are read separately, as the reference does."""
    dmask = d < half
    c1 = tl.load(cos_row + d * stride_cd, mask=dmask, other=0.0)[None, :]
    c2 = tl.load(cos_row + (d + half) * stride_cd, mask=dmask, other=0.0)[None, :]
    s1 = tl.load(sin_row + d * stride_sd, mask=dmask, other=0.0)[None, :]
    s2 = tl.load(sin_row + (d + half) * stride_sd, mask=dmask, other=0.0)[None, :]
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit
def _rms_norm_heads(x1, x2, w_ptr, d, half, stride_w, eps):
    """Per-head RMSNorm of [heads, D/2] halves with the reference's rounding: float32 norm, cast to x's dtype,
    then the weight product (promoting as torch does)."""
    xf1, xf2 = x1.to(tl.float32), x2.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf1 * xf1 + xf2 * xf2, axis=1) / (2 * half) + eps)[:, None]
    dmask = d < half
    w1 = tl.load(w_ptr + d * stride_w, mask=dmask, other=0.0)[None, :]
    w2 = tl.load(w_ptr + (d + half) * stride_w, mask=dmask, other=0.0)[None, :]
    return w1 * (xf1 * rstd).to(x1.dtype), w2 * (xf2 * rstd).to(x2.dtype)


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, n_heads, half,
    stride_xt, stride_xh, stride_xd, stride_ct, stride_cd, stride_st, stride_sd,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < n_heads) & (d[None, :] < half)
    x1, x2 = _load_halves(x_ptr + t * stride_xt, heads, d, mask, half, stride_xh, stride_xd)
    r1, r2 = _rotate(x1, x2, cos_ptr + t * stride_ct, sin_ptr + t * stride_st, d, half, stride_cd, stride_sd)
    _store_halves(out_ptr + t * n_heads * 2 * half, r1, r2, heads, d, mask, half, 2 * half, 1)


def _tiles(n_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps) for heads of head_dim split in halves."""
    block_d = triton.next_power_of_2(head_dim // 2)
    block_h = min(triton.next_power_of_2(n_heads), max(1, MAX_TILE // block_d))
    return block_h, block_d, max(1, min(8, block_h * block_d // 128))


def _check_head_dim(head_dim: int) -> None:
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {head_dim}")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] (any strides) rotated by cos/sin [T, D] float32; a new contiguous tensor in x's dtype."""
    _check_head_dim(x.shape[-1])
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    n_tokens, n_heads, head_dim = x.shape
    block_h, block_d, num_warps = _tiles(n_heads, head_dim)
    _rotary_kernel[(n_tokens, triton.cdiv(n_heads, block_h))](
        x, cos, sin, out, n_heads, head_dim // 2, *x.stride(), *cos.stride(), *sin.stride(),
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


@triton.jit
def _qk_norm_rope_store_kernel(
    q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, q_out_ptr,
    n_q_heads, n_kv_heads, half, eps, page_size,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_ct, stride_cd, stride_st, stride_sd, stride_qw, stride_kw,
    stride_kcp, stride_kco, stride_kch, stride_kcd, stride_vcp, stride_vco, stride_vch, stride_vcd, stride_slot,
    q_blocks,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Axis 1 enumerates the q head blocks, then the kv head blocks: one launch covers q, k and v.
    t = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    cos_row, sin_row = cos_ptr + t * stride_ct, sin_ptr + t * stride_st
    if block < q_blocks:
        heads = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        mask = (heads[:, None] < n_q_heads) & (d[None, :] < half)
        x1, x2 = _load_halves(q_ptr + t * stride_qt, heads, d, mask, half, stride_qh, stride_qd)
        n1, n2 = _rms_norm_heads(x1, x2, qw_ptr, d, half, stride_qw, eps)
        r1, r2 = _rotate(n1, n2, cos_row, sin_row, d, half, stride_cd, stride_sd)
        # Rounded to the normed dtype first: the reference's rotation returns that dtype, then it is stored.
        r1, r2 = r1.to(n1.dtype), r2.to(n2.dtype)
        _store_halves(q_out_ptr + t * n_q_heads * 2 * half, r1, r2, heads, d, mask, half, 2 * half, 1)
    else:
        slot = tl.load(slot_ptr + t * stride_slot)
        heads = (block - q_blocks) * BLOCK_KV + tl.arange(0, BLOCK_KV)
        # Negative slots (padding tokens) write nothing: no head is in range for them.
        mask = (heads[:, None] < tl.where(slot >= 0, n_kv_heads, 0)) & (d[None, :] < half)
        page, offset = slot // page_size, slot % page_size
        x1, x2 = _load_halves(k_ptr + t * stride_kt, heads, d, mask, half, stride_kh, stride_kd)
        n1, n2 = _rms_norm_heads(x1, x2, kw_ptr, d, half, stride_kw, eps)
        r1, r2 = _rotate(n1, n2, cos_row, sin_row, d, half, stride_cd, stride_sd)
        r1, r2 = r1.to(n1.dtype), r2.to(n2.dtype)
        k_slot = kc_ptr + page * stride_kcp + offset * stride_kco
        _store_halves(k_slot, r1, r2, heads, d, mask, half, stride_kch, stride_kcd)
        v1, v2 = _load_halves(v_ptr + t * stride_vt, heads, d, mask, half, stride_vh, stride_vd)
        v_slot = vc_ptr + page * stride_vcp + offset * stride_vco
        _store_halves(v_slot, v1, v2, heads, d, mask, half, stride_vch, stride_vcd)


def qk_norm_rope_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
    cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Per-head RMSNorm of q [T, H, D] and k [T, Hkv, D], rotation of both by cos/sin [T, D], k and v written
    into the paged caches [pages, page_size, Hkv, D] at slot_mapping [T]; returns the rotated q [T, H, D]."""
    n_tokens, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    _check_head_dim(head_dim)
    out = torch.empty(q.shape, dtype=torch.promote_types(q_weight.dtype, q.dtype), device=q.device)
    if n_tokens == 0 or head_dim == 0:
        return out
    block_q, block_d, num_warps = _tiles(n_q_heads, head_dim)
    block_kv, _, _ = _tiles(n_kv_heads, head_dim)
    q_blocks = triton.cdiv(n_q_heads, block_q)
    grid = (n_tokens, q_blocks + triton.cdiv(n_kv_heads, block_kv))
    _qk_norm_rope_store_kernel[grid](
        q, k, v, q_weight, k_weight, cos, sin, k_cache, v_cache, slot_mapping, out,
        n_q_heads, n_kv_heads, head_dim // 2, eps, k_cache.shape[1],
        *q.stride(), *k.stride(), *v.stride(), *cos.stride(), *sin.stride(), q_weight.stride(0), k_weight.stride(0),
        *k_cache.stride(), *v_cache.stride(), slot_mapping.stride(0), q_blocks,
        BLOCK_Q=block_q, BLOCK_KV=block_kv, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out
