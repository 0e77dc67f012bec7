"""Attention: packed variable-length attention (vision frames) and attention through the paged KV cache (text).

The text decoder never sees a contiguous K/V tensor: each layer writes the new tokens' K/V into cache slots, then
attends over every cached token of the sequence by reading its pages through the block table. Prefill (many new
tokens, causal) and decode (one new token) are the same operation with different query lengths.
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


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k, v [T, kv_heads, D] into the caches [pages, page_size, kv_heads, D] at the given flat slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of the new queries q [T, heads, D] over each sequence's cached keys/values.

    The new token i of a sequence with n cached tokens and L new ones sits at position n - L + i and sees keys
    0 .. n - L + i. Grouped-query: query head h reads kv head h // (heads / kv_heads).
    """
    out = torch.empty_like(q)
    page_size = k_cache.shape[1]
    cu = meta.cu_query_lens.tolist()
    for b, n in enumerate(meta.seq_lens.tolist()):
        start, end = cu[b], cu[b + 1]
        pages = meta.block_tables[b, : -(-n // page_size)].long()
        k = k_cache[pages].flatten(0, 1)[:n]
        v = v_cache[pages].flatten(0, 1)[:n]
        new = end - start
        query_pos = torch.arange(n - new, n, device=q.device)
        mask = torch.arange(n, device=q.device)[None, :] <= query_pos[:, None]
        out[start:end] = _sdpa(q[start:end], k, v, mask, scale)
    return out


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], scale: float) -> torch.Tensor:
    """Bidirectional attention within each packed segment [cu[i], cu[i+1]) of q, k, v [T, heads, D] (vision frames)."""
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        out[start:end] = _sdpa(q[start:end], k[start:end], v[start:end], None, scale)
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [L, H, D], k/v [S, Hkv, D] -> [L, H, D]; softmax(q k^T * scale + mask) v with GQA head sharing."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(0, 1)
