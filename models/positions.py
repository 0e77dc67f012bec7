"""M-RoPE position ids for a prompt of text and images.

Text advances all three axes (T, H, W) together. An image whose LLM grid is rows x cols, placed when the
running position is c, gets t = c, h = c + row, w = c + col, and the text after it resumes at c + max(rows, cols).
So positions run ahead of or behind token indices; `rope_delta` = (last position + 1) - prompt length, and the
token with index i generated later sits at position i + rope_delta on all three axes.
"""

from __future__ import annotations

import torch


def mrope_positions(
    input_ids: list[int], image_grids: list[tuple[int, int, int]], image_token_id: int, merge_size: int
) -> tuple[torch.Tensor, int]:
    """-> (positions [3, len(input_ids)] int64, rope_delta). image_grids: (t, h, w) in patches, one per image run."""
    chunks: list[torch.Tensor] = []
    pos = 0
    i, n = 0, len(input_ids)
    grids = iter(image_grids)
    while i < n:
        j = i
        is_image = input_ids[i] == image_token_id
        while j < n and (input_ids[j] == image_token_id) == is_image:
            j += 1
        if is_image:
            t, h, w = next(grids)
            rows, cols = h // merge_size, w // merge_size
            # Consecutive images are separate runs only through their grids: split the run by token counts.
            if j - i > t * rows * cols:
                j = i + t * rows * cols
            tt = torch.arange(t).view(t, 1, 1).expand(t, rows, cols)
            hh = torch.arange(rows).view(1, rows, 1).expand(t, rows, cols)
            ww = torch.arange(cols).view(1, 1, cols).expand(t, rows, cols)
            chunks.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
            pos += max(rows, cols)
        else:
            chunks.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
        i = j
    positions = torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)
    rope_delta = int(positions.max()) + 1 - n if n else 0
    return positions, rope_delta
