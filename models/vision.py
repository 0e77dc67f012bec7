"""Qwen3-VL vision encoder: patch embedding, resampled position table, 2-D RoPE blocks, merger and DeepStack mergers.

Input patches arrive in 2x2 merge-block order (see tandem.models.image): the four patches that merge into one
LLM token are consecutive, so the mergers only reshape [4N, D] -> [N, 4D].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tandem.kernels import apply_rotary, rotary_cos_sin, rotary_inv_freq, varlen_attention
from tandem.models.config import VisionConfig


@dataclass
class Frames:
    """Patch offsets of every frame, packed one after another: vision attention never crosses a frame."""

    cu_seqlens: torch.Tensor  # [frames + 1] int32 on the device
    max_seqlen: int

    @classmethod
    def of(cls, grid_thw: list[tuple[int, int, int]], device: torch.device) -> "Frames":
        sizes = [h * w for t, h, w in grid_thw for _ in range(t)]
        cu = torch.tensor([0] + sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return cls(cu.to(device), max(sizes))


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frames: Frames) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, -1).unbind(1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = varlen_attention(q, k, v, frames.cu_seqlens, frames.max_seqlen, scale=q.shape[-1] ** -0.5)
        return self.proj(out.flatten(1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frames: Frames) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, frames)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Groups each 2x2 block of patches into one LLM token and projects it to the text width.

    The final merger LayerNorms each patch over D before grouping; the DeepStack mergers group first and
    LayerNorm over 4D (`norm_after_grouping`). Both use exact (erf) GELU, unlike the blocks' tanh GELU.
    """

    def __init__(self, config: VisionConfig, norm_after_grouping: bool):
        super().__init__()
        grouped = config.hidden_size * config.spatial_merge_size**2
        self.grouped = grouped
        self.norm_after_grouping = norm_after_grouping
        self.norm = nn.LayerNorm(grouped if norm_after_grouping else config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(grouped, grouped)
        self.linear_fc2 = nn.Linear(grouped, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_after_grouping:
            x = self.norm(x.view(-1, self.grouped))
        else:
            x = self.norm(x).view(-1, self.grouped)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = nn.Module()
        # A Conv3d whose stride equals its kernel is a linear map of each flattened patch; the weight keeps the
        # checkpoint's conv shape [D, C, T, P, P] so it loads as is.
        c = config
        self.patch_embed.proj = nn.Conv3d(
            c.in_channels, c.hidden_size, (c.temporal_patch_size, c.patch_size, c.patch_size),
            stride=(c.temporal_patch_size, c.patch_size, c.patch_size),
        )
        self.pos_embed = nn.Embedding(c.num_position_embeddings, c.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.depth))
        self.merger = PatchMerger(c, norm_after_grouping=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(c, norm_after_grouping=True) for _ in c.deepstack_visual_indexes
        )
        # 2-D RoPE over half the head dim per axis: rows take the first half of the frequencies, columns the second.
        with torch.device("cpu"):  # real values even when the model is built on the meta device for loading
            inv_freq = rotary_inv_freq(c.head_dim // 2, c.rope_theta)
            axes = torch.arange(2).repeat_interleave(len(inv_freq))
        self.register_buffer("rotary_inv_freq", torch.cat((inv_freq, inv_freq)), persistent=False)
        self.register_buffer("rotary_axes", axes, persistent=False)

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values [patches, C*T*P*P] in merge-block order -> (image embeds [patches/4, out], DeepStack features)."""
        proj = self.patch_embed.proj
        x = F.linear(pixel_values.to(proj.weight.dtype), proj.weight.flatten(1), proj.bias)
        rows_cols = _patch_rows_cols(grid_thw, self.config.spatial_merge_size, x.device)
        x = x + self._position_table(rows_cols, grid_thw).to(x.dtype)
        cos, sin = rotary_cos_sin(rows_cols, self.rotary_inv_freq, self.rotary_axes)
        frames = Frames.of(grid_thw, x.device)

        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames)
            if i in self.config.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.config.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack

    def _position_table(self, rows_cols: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """The learned side x side position table, resampled bilinearly (align_corners=True) to each image's grid,
        at the patches' rows and columns [2, patches]."""
        side = int(self.config.num_position_embeddings**0.5)
        device = rows_cols.device
        sizes = torch.cat([torch.tensor([[h], [w]], device=device).expand(2, t * h * w) for t, h, w in grid_thw], dim=1)
        # align_corners=True: the first and last patch map onto the table's first and last entry.
        src = rows_cols.float() * (side - 1) / (sizes - 1).clamp(min=1)
        floor = src.floor()
        # Two taps per axis with hat weights 1 - |src - tap|; the upper tap is clamped to the table's edge.
        taps = [(floor.long() + i).clamp(max=side - 1) for i in (0, 1)]
        weights = [(1 - (src - floor - i).abs()).clamp(min=0) for i in (0, 1)]
        table = self.pos_embed.weight
        out = 0
        for r, wr in zip(taps, weights):
            for c, wc in zip(taps, weights):
                out = out + table[r[0] * side + c[1]] * (wr[0] * wc[1])[:, None]
        return out


def _patch_rows_cols(grid_thw: list[tuple[int, int, int]], merge: int, device: torch.device) -> torch.Tensor:
    """[2, patches]: the row and column of every patch, listed in merge-block order, frames repeated."""
    out = []
    for t, h, w in grid_thw:
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        blocks = (h // merge, merge, w // merge, merge)
        rc = torch.stack([rows.reshape(blocks).transpose(1, 2).flatten(), cols.reshape(blocks).transpose(1, 2).flatten()])
        out.append(rc.repeat(1, t))
    return torch.cat(out, dim=1)


