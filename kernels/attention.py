"""Attention: packed variable-length attention (vision frames) and attention through the paged KV cache (text).

The text decoder never sees a contiguous K/V tensor: each layer writes the new tokens' K/V into cache slots, then
attends over every cached token of the sequence by reading its pages through the block table. Prefill (many new
tokens per sequence, causal, possibly on top of a cached prefix) and decode (one new token per sequence) are
separate kernels because their shapes want different parallelisations.

These torch functions are the specification; tandem.kernels dispatches to the Triton kernels of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where one forward pass's new tokens sit in the paged KV cache. B sequences, T new tokens in all."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot (page * page_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_pages] int32: each sequence's pages, in order
    seq_lens: torch.Tensor  # [B] int32: tokens in each sequence's cache after this pass (cached + new)
    cu_query_lens: torch.Tensor  # [B + 1] int32: the new tokens of sequence b are rows [cu[b], cu[b+1])
    max_query_len: int  # the most new tokens of any sequence; 1 means a decode step
    key_mass: torch.Tensor | None = None  # [B, max_seq] float32: decode adds the attention each key receives


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k, v [T, kv_heads, D] into the caches [pages, page_size, kv_heads, D] at the given flat slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, cu_query_lens: torch.Tensor, max_query_len: int, scale: float,
) -> torch.Tensor:
    """Causal attention of new queries q [T, heads, D] over each sequence's cached keys/values (prefix + new).

    The new token i of a sequence with n cached tokens and L new ones sits at position n - L + i and sees keys
    0 .. n - L + i. Grouped-query: query head h reads kv head h // (heads / kv_heads). max_query_len bounds
    the launch grid of the kernel; the reference does not need it.
    """
    out = torch.empty_like(q)
    cu = cu_query_lens.tolist()
    for b, n in enumerate(seq_lens.tolist()):
        start, end = cu[b], cu[b + 1]
        k, v = _gather_pages(k_cache, v_cache, block_tables[b], n)
        query_pos = torch.arange(n - (end - start), n, device=q.device)
        mask = torch.arange(n, device=q.device)[None, :] <= query_pos[:, None]
        out[start:end] = _attend(q[start:end], k, v, mask, scale)
    return out


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, key_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new query per sequence, q [B, heads, D], over all seq_lens[b] cached keys of sequence b.

    With key_mass [B, >= max seq_len] float32, also adds to key_mass[b, j] the attention probability key j
    receives, summed over the query heads (called once per layer, it accumulates over layers too).
    """
    if q.shape[0] <= 1:  # nothing to pad
        out = torch.empty_like(q)
        if q.shape[0] == 1:
            n = int(seq_lens[0])
            k, v = _gather_pages(k_cache, v_cache, block_tables[0], n)
            out[:] = _attend(q, k, v, None, scale)
            if key_mass is not None:
                key_mass[0, :n] += _probabilities(q, k, scale).sum(dim=(0, 1))
        return out
    # All rows at once over their pages padded to the longest sequence: a Python loop per row made the CPU
    # engine's batched decode cost nearly as much as B separate steps.
    n_max = int(seq_lens.max())
    pages = block_tables[:, : -(-n_max // k_cache.shape[1])].long().clamp(0, k_cache.shape[0] - 1)
    k = k_cache[pages].flatten(1, 2)[:, :n_max]  # [B, S, kv_heads, D]
    v = v_cache[pages].flatten(1, 2)[:, :n_max]
    valid = torch.arange(n_max, device=q.device)[None, :] < seq_lens[:, None].to(q.device)  # [B, S]
    # Slots past a row's length hold whatever the cache held (NaN in the tests): zero weight times NaN is NaN.
    k = k.masked_fill(~valid[:, :, None, None], 0)
    v = v.masked_fill(~valid[:, :, None, None], 0)
    out = F.scaled_dot_product_attention(
        q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=valid[:, None, None], scale=scale,
        enable_gqa=q.shape[1] != k.shape[2],
    )[:, :, 0]
    if key_mass is not None:
        key_mass[:, :n_max] += _probabilities(q, k, scale, valid).sum(dim=1)
    return out


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """Bidirectional attention within each packed segment [cu[i], cu[i+1]) of q, k, v [T, heads, D] (vision
    frames: a patch sees every patch of its own frame and nothing else)."""
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    for start, end in zip(cu[:-1], cu[1:]):
        out[start:end] = _attend(q[start:end], k[start:end], v[start:end], None, scale)
    return out


def _gather_pages(k_cache, v_cache, block_table: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n cached keys and values of one sequence, [n, kv_heads, D] each, in token order."""
    pages = block_table[: -(-n // k_cache.shape[1])].long()
    return k_cache[pages].flatten(0, 1)[:n], v_cache[pages].flatten(0, 1)[:n]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [L, H, D], k/v [S, Hkv, D] -> [L, H, D]; softmax(q k^T * scale + mask) v with GQA head sharing.
    SDPA gets [1, H, L, D]: its fused kernels take 4-D inputs only (3-D falls back to the unfused math path)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def _probabilities(q: torch.Tensor, k: torch.Tensor, scale: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention probabilities in float32 of q [..., H, D] over k [..., S, Hkv, D] -> [..., H, S], kv heads
    repeated for GQA; keys where valid [..., S] is False get none."""
    k = k.repeat_interleave(q.shape[-2] // k.shape[-2], dim=-2)
    scores = torch.einsum("...hd,...shd->...hs", q.float(), k.float()) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid[..., None, :], float("-inf"))
    return scores.softmax(dim=-1)
