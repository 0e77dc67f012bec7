"""Triton token gather for reasoning transfer (spec: tandem.kernels.gather.gather_tokens).

One program walks the output in blocks: the prefix, the kept source ids, the suffix, then the positions. A mask
is compacted with a prefix sum per block plus the running count of earlier blocks; N is at most a few thousand
tokens, so a single program looping is cheaper than a multi-block scan's extra launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _copy(src_ptr, stride, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for i in range(0, n, BLOCK):
        idx = i + offs
        mask = idx < n
        tl.store(dst_ptr + idx, tl.load(src_ptr + idx * stride, mask=mask), mask=mask)


@triton.jit
def _compact(src_ptr, stride_src, keep_ptr, stride_keep, dst_ptr, n_src, BLOCK: tl.constexpr):
    """dst[j] = the j-th src id whose keep flag (uint8) is set."""
    offs = tl.arange(0, BLOCK)
    kept = 0
    for i in range(0, n_src, BLOCK):
        idx = i + offs
        flag = tl.load(keep_ptr + idx * stride_keep, mask=idx < n_src, other=0).to(tl.int32)
        dest = kept + tl.cumsum(flag, axis=0) - 1
        selected = flag != 0
        tl.store(dst_ptr + dest, tl.load(src_ptr + idx * stride_src, mask=selected), mask=selected)
        kept += tl.sum(flag, axis=0)


@triton.jit
def _index(src_ptr, stride_src, index_ptr, stride_index, dst_ptr, n_src, n_keep, BLOCK: tl.constexpr):
    """dst[j] = src[index[j]], negative indices counting from the end as torch indexing does."""
    offs = tl.arange(0, BLOCK)
    for i in range(0, n_keep, BLOCK):
        idx = i + offs
        mask = idx < n_keep
        sel = tl.load(index_ptr + idx * stride_index, mask=mask, other=0).to(tl.int64)
        sel = tl.where(sel < 0, sel + n_src, sel)
        tl.store(dst_ptr + idx, tl.load(src_ptr + sel * stride_src, mask=mask), mask=mask)


@triton.jit
def _gather_tokens_kernel(
    src_ptr, keep_ptr, prefix_ptr, suffix_ptr, ids_ptr, pos_ptr, n_src, n_keep, n_prefix, n_suffix, start,
    stride_src, stride_keep, stride_prefix, stride_suffix, IS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    _copy(prefix_ptr, stride_prefix, ids_ptr, n_prefix, BLOCK)
    if IS_MASK:
        _compact(src_ptr, stride_src, keep_ptr, stride_keep, ids_ptr + n_prefix, n_src, BLOCK)
    else:
        _index(src_ptr, stride_src, keep_ptr, stride_keep, ids_ptr + n_prefix, n_src, n_keep, BLOCK)
    _copy(suffix_ptr, stride_suffix, ids_ptr + n_prefix + n_keep, n_suffix, BLOCK)
    total = n_prefix + n_keep + n_suffix
    offs = tl.arange(0, BLOCK)
    for i in range(0, total, BLOCK):
        idx = i + offs
        tl.store(pos_ptr + idx, idx.to(tl.int64) + start, mask=idx < total)


def _stride(x: torch.Tensor) -> int:
    return x.stride(0) if x.numel() else 1  # empty inputs are never read; 1 keeps one compiled variant


def gather_tokens(
    src_ids: torch.Tensor, keep: torch.Tensor, prefix_ids: torch.Tensor, suffix_ids: torch.Tensor, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """src_ids [N] int64; keep: a bool mask [N] or int64 indices [K] into src_ids; prefix_ids [P], suffix_ids [S]
    int64. -> (ids [P + K + S] = prefix | kept ids | suffix, positions [P + K + S] = start + arange), int64."""
    is_mask = keep.dtype == torch.bool
    # The output length needs K: for a mask that is one host sync (keep.sum()), the only work outside the kernel.
    n_keep = int(keep.sum()) if is_mask else keep.numel()
    total = prefix_ids.numel() + n_keep + suffix_ids.numel()
    ids = torch.empty(total, dtype=torch.int64, device=src_ids.device)
    positions = torch.empty(total, dtype=torch.int64, device=src_ids.device)
    if total == 0:
        return ids, positions
    # The mask's bool storage read as uint8 bytes: plain integers for the prefix sum, without a conversion pass.
    flags = keep.view(torch.uint8) if is_mask else keep
    _gather_tokens_kernel[(1,)](
        src_ids, flags, prefix_ids, suffix_ids, ids, positions,
        src_ids.numel(), n_keep, prefix_ids.numel(), suffix_ids.numel(), start,
        _stride(src_ids), _stride(flags), _stride(prefix_ids), _stride(suffix_ids), IS_MASK=is_mask, BLOCK=BLOCK,
    )
    return ids, positions
