"""flash-attn, where installed on CUDA, behind tandem.kernels.varlen_attention (the vision tower's attention).

Only the varlen path uses it: flash-attn's paged KV cache needs pages of a multiple of 256 tokens, while Tandem's
pages are 16, so text prefill and decode stay on the Triton kernels. flash-attn computes in 16-bit only; float32
inputs go to the Triton kernel instead.
"""

from __future__ import annotations

import torch
from flash_attn import flash_attn_varlen_func

from tandem.kernels import attention_triton


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[0] == 0:
        return attention_triton.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=False
    )
