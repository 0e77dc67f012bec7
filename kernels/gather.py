"""Token gather for reasoning transfer: build a model's suffix ids from another model's output ids on the device.

The destination is [prefix ids | the kept source ids, in order | suffix ids], and every destination token gets
the position start + its index (text positions advance all three M-RoPE axes together, so one number each).
"""

from __future__ import annotations

import torch


def gather_tokens(
    src_ids: torch.Tensor, keep: torch.Tensor, prefix_ids: torch.Tensor, suffix_ids: torch.Tensor, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """src_ids [N] int64; keep: a bool mask [N] or int64 indices [K] (ascending) into src_ids; prefix_ids [P] and
    suffix_ids [S] int64 template ids. -> (ids [P + K + S] int64, positions [P + K + S] int64 = start + arange)."""
    kept = src_ids[keep] if keep.dtype == torch.bool else src_ids[keep.long()]
    ids = torch.cat([prefix_ids, kept, suffix_ids])
    return ids, torch.arange(start, start + len(ids), device=ids.device)
