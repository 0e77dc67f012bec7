"""Triton attention (spec: tandem.kernels.attention): packed varlen (vision), paged prefill and paged decode.

All kernels keep the softmax in the log2 domain (scores are pre-multiplied by scale * log2(e), so exp2 replaces
exp) and accumulate in float32 whatever the input dtype; probabilities are cast to V's dtype only as the operand
of the P @ V product, as flash-attention does. Head dims that are not powers of two (72, the vision tower's) are
padded to the next one with masked loads, because tl.arange and tl.dot need power-of-two extents of at least 16.
Masked K/V loads return 0, never the cache's contents: a stale or NaN slot times a zero probability is still NaN.

- `_attention_kernel`: one program per (query block, sequence, query head), online softmax over the keys. PAGED
  reads K/V through the block table (text prefill, causal, possibly on top of a cached prefix); otherwise K/V are
  the rows of the same packed segment (vision, bidirectional).
- decode (flash-decoding): one query row per sequence gives too little parallelism to keep a GPU busy on long
  contexts, so `_decode_split_kernel` splits each context into chunks, one program per (sequence, kv head, chunk)
  handling the whole GQA group so the group's query heads share each K/V load; `_decode_combine_kernel` merges the
  chunks with their log-sum-exps; `_key_mass_kernel` then recomputes q.k per key block against the final
  log-sum-exp to add each key's probability, summed over heads, to key_mass.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
MIN_SPLIT_TOKENS = 128  # fewer keys per decode split and the combine costs more than the split saves
MAX_SPLITS = 256  # bounds the combine's vector of per-split log-sum-exps


@triton.jit
def _kv_offsets(bt_row_ptr, cols, col_ok, kv_head, row_start, stride_row, stride_slot, stride_head,
                PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Element offsets of keys `cols` of one sequence: through its block table, or rows from row_start on."""
    if PAGED:
        # int64: page * page stride overflows int32 in a large pool.
        page = tl.load(bt_row_ptr + cols // PAGE_SIZE, mask=col_ok, other=0).to(tl.int64)
        rows = page * stride_row + (cols % PAGE_SIZE) * stride_slot
    else:
        rows = (row_start + cols).to(tl.int64) * stride_row
    return rows + kv_head * stride_head


@triton.jit
def _softmax_step(q, k, v, valid, m_i, l_i, acc, qk_scale):
    """One online-softmax update of (running max, running sum, unnormalised output) with a block of keys.

    Every row has a valid key in its first block (the first key of the range is visible to every query, padding
    rows included), so m_i is finite after the first step and exp2(m_i - m_new) never sees -inf - -inf."""
    # ieee: float32 inputs must not silently drop to TF32 on a GPU; 16-bit inputs ignore it.
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, seq_lens_ptr, cu_q_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_k_row, stride_k_slot, stride_kh, stride_v_row, stride_v_slot, stride_vh,
    qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGED: tl.constexpr, CAUSAL: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    m_block, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:  # the grid is sized for the longest sequence
        return
    kv_len = tl.load(seq_lens_ptr + seq) if PAGED else q_len
    kv_head = head // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=(offs_m < q_len)[:, None] & d_ok[None, :], other=0.0)

    # New token i of L sits at position kv_len - L + i (the first kv_len - L keys are a cached prefix).
    q_pos = kv_len - q_len + offs_m
    hi = tl.minimum(kv_len, kv_len - q_len + (m_block + 1) * BLOCK_M) if CAUSAL else kv_len
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + seq * stride_bt
    for start in range(0, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < kv_len
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k_off = _kv_offsets(bt_row, cols, col_ok, kv_head, q_start, stride_k_row, stride_k_slot, stride_kh,
                            PAGED, PAGE_SIZE)
        v_off = _kv_offsets(bt_row, cols, col_ok, kv_head, q_start, stride_v_row, stride_v_slot, stride_vh,
                            PAGED, PAGE_SIZE)
        k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        valid = col_ok[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= q_pos[:, None])
        m_i, l_i, acc = _softmax_step(q, k, v, valid, m_i, l_i, acc, qk_scale)

    out = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(offs_m < q_len)[:, None] & d_ok[None, :])


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, part_out_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_bt, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    qk_scale, split_len,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * split_len
    if start >= seq_len:  # splits are sized for the longest context; the combine skips these
        return
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_G)  # the GQA group's query heads, padded to tl.dot's minimum of 16 rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + seq * stride_bt
    for block_start in range(start, end, BLOCK_N):
        cols = block_start + offs_n
        col_ok = cols < end
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k_off = _kv_offsets(bt_row, cols, col_ok, kv_head, 0, stride_kp, stride_ks, stride_kh, True, PAGE_SIZE)
        v_off = _kv_offsets(bt_row, cols, col_ok, kv_head, 0, stride_vp, stride_vs, stride_vh, True, PAGE_SIZE)
        k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _softmax_step(q, k, v, col_ok[None, :], m_i, l_i, acc, qk_scale)

    # Normalised partial output + its log2-sum-exp2: the combine weighs each split by exp2(lse - max lse).
    part = part_out_ptr + seq * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :]
    tl.store(part, acc / l_i[:, None], mask=g_ok[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + seq * stride_lb + heads * stride_lh + split, m_i + tl.log2(l_i), mask=g_ok)


@triton.jit
def _decode_combine_kernel(
    part_out_ptr, part_lse_ptr, seq_lens_ptr, out_ptr, lse_ptr, split_len,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, stride_fb, stride_fh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq, head = tl.program_id(0), tl.program_id(1)
    num_splits = tl.cdiv(tl.load(seq_lens_ptr + seq), split_len)  # only these were written
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse_row = part_lse_ptr + seq * stride_lb + head * stride_lh
    lse = tl.load(lse_row + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    total = tl.sum(tl.exp2(lse - lse_max), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    part_row = part_out_ptr + seq * stride_pb + head * stride_ph
    for split in range(0, num_splits):
        weight = tl.exp2(tl.load(lse_row + split) - lse_max)
        acc += weight * tl.load(part_row + split * stride_ps + offs_d, mask=d_ok, other=0.0)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d,
             (acc / total).to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + seq * stride_fb + head * stride_fh, lse_max + tl.log2(total))


@triton.jit
def _key_mass_kernel(
    q_ptr, k_ptr, bt_ptr, seq_lens_ptr, lse_ptr, mass_ptr, mass_cols,
    stride_qb, stride_qh, stride_bt, stride_lb, stride_lh, stride_mb, stride_kp, stride_ks, stride_kh,
    qk_scale, num_kv_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program owns one key block of one sequence across every head, so it can read-add-write key_mass
    # without atomics (and the sum over heads happens in registers).
    seq, block = tl.program_id(0), tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    if block * BLOCK_N >= seq_len:
        return
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = (cols < seq_len) & (cols < mass_cols)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    bt_row = bt_ptr + seq * stride_bt
    mass = tl.zeros([BLOCK_N], tl.float32)
    for kv_head in range(0, num_kv_heads):
        heads = kv_head * GROUP + offs_g
        q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(lse_ptr + seq * stride_lb + heads * stride_lh, mask=g_ok, other=0.0)
        k_off = _kv_offsets(bt_row, cols, col_ok, kv_head, 0, stride_kp, stride_ks, stride_kh, True, PAGE_SIZE)
        k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        p = tl.where(g_ok[:, None] & col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        mass += tl.sum(p, 0)
    mass_ptrs = mass_ptr + seq.to(tl.int64) * stride_mb + cols
    tl.store(mass_ptrs, tl.load(mass_ptrs, mask=col_ok, other=0.0) + mass, mask=col_ok)


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, cu_query_lens: torch.Tensor, max_query_len: int, scale: float,
) -> torch.Tensor:
    """Causal attention of new queries q [T, H, D] over each sequence's paged keys/values (prefix + new)."""
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0 or max_query_len == 0:
        return out
    q = _rows_of_vectors(q)
    _check_cache(k_cache, v_cache, head_dim, num_heads)
    block_m, block_n, block_d, warps, stages = _attention_config(head_dim, q.element_size())
    _attention_kernel[(triton.cdiv(max_query_len, block_m), num_seqs, num_heads)](
        q, k_cache, v_cache, out, block_tables, seq_lens, cu_query_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), scale * LOG2E,
        GROUP=num_heads // k_cache.shape[2], HEAD_DIM=head_dim, PAGED=True, CAUSAL=True,
        PAGE_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=warps, num_stages=stages,
    )
    return out


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """Bidirectional attention within each packed segment [cu[i], cu[i+1]) of q, k, v [T, heads, D]."""
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_segments = cu_seqlens.shape[0] - 1
    if num_tokens == 0 or num_segments <= 0 or max_seqlen == 0:
        return out
    if head_dim > MAX_HEAD_DIM or num_heads % k.shape[1]:
        raise ValueError(f"varlen_attention: head_dim {head_dim} > {MAX_HEAD_DIM} or {num_heads} query heads "
                         f"not a multiple of {k.shape[1]} kv heads")
    q, k, v = _rows_of_vectors(q), _rows_of_vectors(k), _rows_of_vectors(v)
    block_m, block_n, block_d, warps, stages = _attention_config(head_dim, q.element_size())
    # Not paged: the block-table / seq-len arguments are never read, cu_seqlens stands in for them.
    _attention_kernel[(triton.cdiv(max_seqlen, block_m), num_segments, num_heads)](
        q, k, v, out, cu_seqlens, cu_seqlens, cu_seqlens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), 0,
        k.stride(0), 0, k.stride(1), v.stride(0), 0, v.stride(1), scale * LOG2E,
        GROUP=num_heads // k.shape[1], HEAD_DIM=head_dim, PAGED=False, CAUSAL=False,
        PAGE_SIZE=1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )
    return out


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, key_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence, q [B, H, D], over its seq_lens[b] paged keys; optionally adds to key_mass."""
    batch, num_heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    q = _rows_of_vectors(q)
    _check_cache(k_cache, v_cache, head_dim, num_heads)
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_d = _block_d(head_dim)
    block_g = max(16, triton.next_power_of_2(group))
    block_n = _block_n(block_d, q.element_size())
    # The block table is as wide as the longest sequence's pages: a host-side bound of the longest context,
    # known without reading seq_lens back from the device.
    max_context = max(1, block_tables.shape[1] * page_size)
    num_splits, split_len = _decode_splits(batch, num_kv_heads, max_context, block_n, q.device)

    part_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)  # splits: unit stride
    lse = torch.empty(batch, num_heads, dtype=torch.float32, device=q.device)
    qk_scale = scale * LOG2E
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part_out, part_lse,
        q.stride(0), q.stride(1), block_tables.stride(0), *part_out.stride()[:3], *part_lse.stride()[:2],
        *k_cache.stride()[:3], *v_cache.stride()[:3], qk_scale, split_len,
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=4, num_stages=2,
    )
    _decode_combine_kernel[(batch, num_heads)](
        part_out, part_lse, seq_lens, out, lse, split_len,
        *part_out.stride()[:3], *part_lse.stride()[:2], out.stride(0), out.stride(1), *lse.stride(),
        HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=4,
    )
    if key_mass is not None:
        if key_mass.dtype != torch.float32 or key_mass.dim() != 2 or key_mass.shape[0] != batch:
            raise ValueError(f"key_mass must be float32 [{batch}, >= max seq_len], got "
                             f"{key_mass.dtype} {tuple(key_mass.shape)}")
        if key_mass.stride(1) != 1:
            raise ValueError("key_mass must be contiguous along its key dimension")
        _key_mass_kernel[(batch, triton.cdiv(max_context, block_n))](
            q, k_cache, block_tables, seq_lens, lse, key_mass, key_mass.shape[1],
            q.stride(0), q.stride(1), block_tables.stride(0), *lse.stride(), key_mass.stride(0),
            *k_cache.stride()[:3], qk_scale, num_kv_heads,
            GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_G=block_g, BLOCK_N=block_n,
            BLOCK_D=block_d, num_warps=4,
        )
    return out


def _decode_splits(batch: int, num_kv_heads: int, max_context: int, block_n: int,
                   device: torch.device) -> tuple[int, int]:
    """(number of splits, keys per split) for a decode whose longest context is at most max_context.

    Enough splits that batch * kv_heads * splits programs make ~4 waves over the SMs, but no split shorter than
    MIN_SPLIT_TOKENS; each split is a whole number of key blocks, so only a sequence's last block is partial."""
    wanted = triton.cdiv(4 * _sm_count(device), batch * num_kv_heads)
    splits = max(1, min(triton.cdiv(max_context, MIN_SPLIT_TOKENS), wanted, MAX_SPLITS))
    split_len = triton.cdiv(triton.cdiv(max_context, splits), block_n) * block_n
    return max(1, triton.cdiv(max_context, split_len)), split_len


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: behave like an H100 so tests see the same split counts


def _attention_config(head_dim: int, elem_size: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) of `_attention_kernel`."""
    block_d = _block_d(head_dim)
    # 16-bit inputs up to D=128 run on tensor cores and afford 128 queries per program. float32 (IEEE, so no
    # tensor cores: operands live in registers) and D=256 halve it to keep the tiles out of local memory.
    block_m = 128 if elem_size <= 2 and block_d <= 128 else 64
    block_n = _block_n(block_d, elem_size)
    if head_dim < block_d and elem_size <= 2:
        # A padded head dim (the 8B vision tower's 72 as a 128-wide tile) needs masked loads and more registers:
        # at 128 x 64 tiles it spilled on sm_90 (bench/compile_check.py); 64 x 32 compiles without spilling.
        block_m, block_n = 64, min(block_n, 32)
    return block_m, block_n, block_d, 8 if block_d >= 128 else 4, 2


def _block_d(head_dim: int) -> int:
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim {head_dim} exceeds {MAX_HEAD_DIM}")
    return max(16, triton.next_power_of_2(head_dim))


def _block_n(block_d: int, elem_size: int) -> int:
    # One K (or V) tile of at most 16 KiB, so K and V double-buffered stay within 64 KiB of shared memory.
    return max(16, min(64, 16384 // (block_d * elem_size)))


def _rows_of_vectors(x: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] with unit stride along D (the kernels take the other strides as given): views of a fused
    projection pass through uncopied."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, head_dim: int, num_heads: int) -> None:
    if k_cache.shape[-1] != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"attention: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not match "
                         f"head_dim {head_dim}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("attention: the KV caches must be contiguous along head_dim")
    if num_heads % k_cache.shape[2]:
        raise ValueError(f"attention: {num_heads} query heads not a multiple of {k_cache.shape[2]} kv heads")
    _block_d(head_dim)
