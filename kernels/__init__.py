"""tandem.kernels: every hot op of the runtime. Each op is defined by its torch reference (the spec, and the CPU path)."""

from tandem.kernels.activation import silu_and_mul
from tandem.kernels.attention import AttentionMetadata, paged_attention, store_kv, varlen_attention
from tandem.kernels.norm import rms_norm
from tandem.kernels.rotary import apply_rotary, mrope_axes, rotary_cos_sin, rotary_inv_freq

__all__ = [
    "AttentionMetadata",
    "apply_rotary",
    "mrope_axes",
    "paged_attention",
    "rms_norm",
    "rotary_cos_sin",
    "rotary_inv_freq",
    "silu_and_mul",
    "store_kv",
    "varlen_attention",
]
