"""tandem.kernels: every hot op of the runtime.

Each op is defined by a torch reference (kernels/<op>.py: the spec, and the CPU path) and has a Triton kernel
(kernels/<op>_triton.py) that must match it; `dispatch` picks one per call (see tandem.kernels.backend).
"""

from tandem.kernels import activation, attention, gather, norm, rotary
from tandem.kernels.attention import AttentionMetadata
from tandem.kernels.backend import BACKENDS, dispatch, use_backend
from tandem.kernels.rotary import mrope_axes, rotary_cos_sin, rotary_inv_freq

rms_norm = dispatch(norm.rms_norm, "tandem.kernels.norm_triton:rms_norm")
silu_and_mul = dispatch(activation.silu_and_mul, "tandem.kernels.activation_triton:silu_and_mul")
apply_rotary = dispatch(rotary.apply_rotary, "tandem.kernels.rotary_triton:apply_rotary")
qk_norm_rope_store = dispatch(rotary.qk_norm_rope_store, "tandem.kernels.rotary_triton:qk_norm_rope_store")
prefill_attention = dispatch(attention.prefill_attention, "tandem.kernels.attention_triton:prefill_attention")
decode_attention = dispatch(attention.decode_attention, "tandem.kernels.attention_triton:decode_attention")
varlen_attention = dispatch(
    attention.varlen_attention, "tandem.kernels.attention_triton:varlen_attention",
    flash="tandem.kernels.attention_flash:varlen_attention",
)
gather_tokens = dispatch(gather.gather_tokens, "tandem.kernels.gather_triton:gather_tokens")

__all__ = [
    "BACKENDS",
    "AttentionMetadata",
    "apply_rotary",
    "decode_attention",
    "gather_tokens",
    "mrope_axes",
    "prefill_attention",
    "qk_norm_rope_store",
    "rms_norm",
    "rotary_cos_sin",
    "rotary_inv_freq",
    "silu_and_mul",
    "use_backend",
    "varlen_attention",
]
