"""Qwen3-VL: the vision encoder feeding a Qwen3 text decoder with interleaved M-RoPE and DeepStack.

The decoder works on packed tokens [T, hidden] of any number of sequences and keeps K/V in the paged cache
(tandem.kernels.attention). q/k/v and gate/up are each one fused projection (PackedLinear); the loader fills
them from the checkpoint's separate tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tandem.kernels import (
    AttentionMetadata,
    decode_attention,
    mrope_axes,
    prefill_attention,
    qk_norm_rope_store,
    rms_norm,
    rotary_cos_sin,
    rotary_inv_freq,
    silu_and_mul,
)
from tandem.models.config import ModelConfig, TextConfig
from tandem.models.vision import VisionEncoder


class PackedLinear(nn.Linear):
    """Several bias-free projections of one input stacked into one matmul. `parts` names the checkpoint's separate
    projections (siblings of this module) and their output sizes, in stacking order."""

    def __init__(self, in_features: int, parts: dict[str, int]):
        super().__init__(in_features, sum(parts.values()), bias=False)
        self.parts = parts


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.qkv_proj = PackedLinear(config.hidden_size, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size})
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(tuple(self.qkv_proj.parts.values()), dim=-1)
        # Per-head RMSNorm on q and k, then M-RoPE; k and v go into the paged cache.
        q = qk_norm_rope_store(
            q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim),
            v.view(-1, self.num_kv_heads, self.head_dim), self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
            cos, sin, k_cache, v_cache, meta.slot_mapping,
        )
        scale = self.head_dim**-0.5
        if meta.max_query_len == 1:
            out = decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, meta.key_mass)
        else:
            out = prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.cu_query_lens,
                                    meta.max_query_len, scale)
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = PackedLinear(config.hidden_size, {"gate_proj": size, "up_proj": size})
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, residual, cos, sin, k_cache, v_cache, meta: AttentionMetadata):
        """(x, residual) -> (this layer's MLP output, the residual stream before it); their sum is the layer's
        output. The sum is left to the next layer's first norm, which fuses the add (one kernel fewer per layer)."""
        if residual is None:
            normed, residual = self.input_layernorm(x), x
        else:
            normed, residual = self.input_layernorm(x, residual=residual)
        attn = self.self_attn(normed, cos, sin, k_cache, v_cache, meta)
        normed, residual = self.post_attention_layernorm(attn, residual=residual)
        return self.mlp(normed), residual


@dataclass
class VisualTokens:
    """The vision encoder's output placed in a prompt: where the image tokens are and what DeepStack adds there."""

    mask: torch.Tensor  # [T] bool: rows of the forward pass that hold image tokens
    deepstack: list[torch.Tensor]  # feature k [mask.sum(), hidden] is added after decoder layer k


class TextDecoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        with torch.device("cpu"):  # real values even when the model is built on the meta device for loading
            self.register_buffer("rotary_inv_freq", rotary_inv_freq(config.head_dim, config.rope_theta), persistent=False)
            self.register_buffer("rotary_axes", mrope_axes(config.mrope_section), persistent=False)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
        visual: VisualTokens | None = None,
    ) -> torch.Tensor:
        """x [T, hidden] input embeddings, positions [3, T] M-RoPE ids -> final-normed hidden states [T, hidden].

        kv_cache [layers, 2, pages, page_size, kv_heads, head_dim] receives the new tokens' K/V.
        """
        cos, sin = rotary_cos_sin(positions, self.rotary_inv_freq, self.rotary_axes)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, kv_cache[i, 0], kv_cache[i, 1], meta)
            if visual is not None and i < len(visual.deepstack):
                # DeepStack adds to the layer's output: form it here, in the reference's order of additions.
                x = (residual + x).index_put((visual.mask,), visual.deepstack[i].to(x.dtype), accumulate=True)
                residual = None
        return self.norm(x) if residual is None else self.norm(x, residual=residual)[0]


class Qwen3VL(nn.Module):
    """Parameter names follow the checkpoint's with the leading `model.` dropped (see tandem.models.loader)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.visual = VisionEncoder(config.vision)
        self.language_model = TextDecoder(config.text)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return self.language_model.embed_tokens.weight
        return self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, image_embeds: torch.Tensor | None = None,
                visual: VisualTokens | None = None) -> torch.Tensor:
        """The one forward pass, of prefill chunks, decode steps and their graph captures alike: token ids [T]
        (image pads replaced by `image_embeds`, in order) at M-RoPE positions [3, T] -> final hidden states
        [T, hidden]; their K/V go into `kv_cache` at meta.slot_mapping."""
        return self.language_model(self.embed(input_ids, image_embeds), positions, kv_cache, meta, visual)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [T, hidden] with the image-pad rows replaced by the vision encoder's output, in order."""
        x = self.language_model.embed_tokens(input_ids)
        if image_embeds is not None:
            x = x.index_put((input_ids == self.config.image_token_id,), image_embeds.to(x.dtype))
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32 (sampling wants full precision)."""
        return F.linear(hidden, self.lm_head_weight).float()
