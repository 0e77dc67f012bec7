"""The Triton kernels of the non-attention ops against their torch references (the spec).

Without CUDA they run under Triton's interpreter on CPU tensors in float32 (and a little float16), at small odd
sizes; with CUDA the same tests run compiled, and the `gpu` tests add bfloat16/float16 at real model sizes.
Kernels that allocate their output are checked on every element (nothing can hide in an unwritten slot); the
KV caches, which the kernel only partly writes, are pre-filled with NaN that must survive outside the slots.
"""

from __future__ import annotations

import importlib

import pytest
import torch

# conftest.py has switched Triton's interpreter on where there is no CUDA, before these kernels are defined.
from tandem.kernels import activation, gather, norm, rotary, use_backend
from tandem.kernels import activation_triton, gather_triton, norm_triton, rotary_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),  # one bfloat16 ulp is 2**-7 relative
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)


def rows_view(rows: int, cols: int, layout: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[rows, cols] as a contiguous tensor, a slice of wider rows, or every other column."""
    if layout == "contiguous":
        return randn(rows, cols, dtype=dtype)
    if layout == "row_strided":
        return randn(rows, cols + 7, dtype=dtype)[:, 3 : 3 + cols]
    return randn(rows, 2 * cols, dtype=dtype)[:, ::2]


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Every element, dtype and shape; NaN is never accepted (an output slot the kernel forgot would show)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, **TOLERANCE[expected.dtype])


def assert_rounds_like(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Half precision, rounded in the reference's order: all but a few elements (whose float32 intermediates differ
    in the last bit) are bit-equal. Another rounding order stays within tolerance but differs in ~25% of them."""
    assert_matches(actual, expected)
    assert (actual != expected).float().mean() < 0.01


# rms_norm ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [1, 5, 37, 200])
@pytest.mark.parametrize("n_rows", [1, 3, 19])
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "col_strided"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(hidden, n_rows, layout, with_residual):
    x = rows_view(n_rows, hidden, layout)
    weight = randn(hidden)
    residual = rows_view(n_rows, hidden, layout) if with_residual else None
    expected = norm.rms_norm(x, weight, 1e-6, residual)
    actual = norm_triton.rms_norm(x, weight, 1e-6, residual)
    if with_residual:
        assert_matches(actual[0], expected[0])
        assert torch.equal(actual[1], expected[1])  # the sum is one rounding in both
    else:
        assert_matches(actual, expected)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float16, torch.float16), (torch.float16, torch.float32)])
def test_rms_norm_half_precision_rounds_like_the_reference(x_dtype, w_dtype):
    """Rounding to x's dtype before the weight, and the weight's dtype promotion, as the reference does."""
    x, residual, weight = randn(5, 37, dtype=x_dtype), randn(5, 37, dtype=x_dtype), randn(37, dtype=w_dtype)
    expected, expected_sum = norm.rms_norm(x, weight, 1e-6, residual)
    actual, actual_sum = norm_triton.rms_norm(x, weight, 1e-6, residual)
    assert_rounds_like(actual, expected)
    assert torch.equal(actual_sum, expected_sum)


def test_rms_norm_leading_dims_and_empty():
    weight = randn(37)
    for x in (randn(2, 3, 40)[..., :37], randn(3, 2, 37).transpose(0, 1)):  # rows that merge to a view, or not
        assert_matches(norm_triton.rms_norm(x, weight, 1e-5), norm.rms_norm(x, weight, 1e-5))
    empty = randn(0, 37)
    assert norm_triton.rms_norm(empty, weight, 1e-6).shape == (0, 37)
    out, summed = norm_triton.rms_norm(empty, weight, 1e-6, empty)
    assert out.shape == summed.shape == (0, 37)


# silu_and_mul --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inter", [1, 5, 37, 200, 1500])
@pytest.mark.parametrize("n_rows", [1, 3, 19])
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "col_strided"])
def test_silu_and_mul(inter, n_rows, layout):
    gate_up = rows_view(n_rows, 2 * inter, layout) * 4  # * 4: reach silu's saturated tails too
    assert_matches(activation_triton.silu_and_mul(gate_up), activation.silu_and_mul(gate_up))


def test_silu_and_mul_half_precision_leading_dims_and_empty():
    gate_up = randn(2, 3, 74, dtype=torch.float16) * 4
    assert_rounds_like(activation_triton.silu_and_mul(gate_up), activation.silu_and_mul(gate_up))
    assert activation_triton.silu_and_mul(randn(0, 74)).shape == (0, 37)


# apply_rotary --------------------------------------------------------------------------------------------------


def cos_sin(n_tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real rotary tables (both halves equal), perturbed so a kernel reading the wrong half would show."""
    angles = torch.rand(n_tokens, head_dim // 2, device=DEVICE) * 100
    angles = torch.cat((angles, angles + 0.01), dim=-1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("head_dim", [2, 36, 72, 128])
@pytest.mark.parametrize("n_tokens", [1, 3, 19])
@pytest.mark.parametrize("n_heads", [1, 3, 16])
def test_apply_rotary_on_a_fused_qkv_view(head_dim, n_tokens, n_heads):
    q, k, _ = randn(n_tokens, 3 * n_heads * head_dim).view(n_tokens, 3, n_heads, head_dim).unbind(1)
    cos, sin = cos_sin(n_tokens, head_dim)
    for x in (q, k):
        assert_matches(rotary_triton.apply_rotary(x, cos, sin), rotary.apply_rotary(x, cos, sin))


def test_apply_rotary_strided_cos_sin_half_precision_and_empty():
    x = randn(5, 4, 80, dtype=torch.float16).transpose(0, 1).contiguous().transpose(0, 1)  # token stride 80
    cos, sin = (t.repeat(1, 2)[:, ::2] for t in cos_sin(5, 80))  # column stride 2
    assert_rounds_like(rotary_triton.apply_rotary(x, cos, sin), rotary.apply_rotary(x, cos, sin))
    cos, sin = cos_sin(0, 64)
    assert rotary_triton.apply_rotary(randn(0, 4, 64), cos, sin).shape == (0, 4, 64)


# qk_norm_rope_store --------------------------------------------------------------------------------------------


def qkv_views(n_tokens, n_heads, n_kv_heads, head_dim, dtype=torch.float32):
    """q, k, v as the text attention gets them: strided views of one fused projection output."""
    fused = randn(n_tokens, (n_heads + 2 * n_kv_heads) * head_dim, dtype=dtype)
    q, k, v = fused.split((n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim), dim=-1)
    return q.view(-1, n_heads, head_dim), k.view(-1, n_kv_heads, head_dim), v.view(-1, n_kv_heads, head_dim)


def nan_caches(pages, page_size, n_kv_heads, head_dim, dtype=torch.float32):
    return [torch.full((pages, page_size, n_kv_heads, head_dim), float("nan"), device=DEVICE, dtype=dtype)
            for _ in range(4)]


def check_qk_norm_rope_store(n_tokens, n_heads, n_kv_heads, head_dim, page_size, dtype=torch.float32, exact=False):
    q, k, v = qkv_views(n_tokens, n_heads, n_kv_heads, head_dim, dtype)
    q_weight, k_weight = randn(head_dim, dtype=dtype), randn(head_dim, dtype=dtype)
    cos, sin = cos_sin(n_tokens, head_dim)
    pages = 2 * n_tokens // page_size + 3
    # Scattered over all pages, and a strided view: slot_mapping's stride is honoured too.
    slots = torch.randperm(pages * page_size, device=DEVICE)[: 2 * n_tokens : 2]
    k_cache, v_cache, k_ref, v_ref = nan_caches(pages, page_size, n_kv_heads, head_dim, dtype)
    args = (q, k, v, q_weight, k_weight, 1e-6, cos, sin)
    expected = rotary.qk_norm_rope_store(*args, k_ref, v_ref, slots)
    actual = rotary_triton.qk_norm_rope_store(*args, k_cache, v_cache, slots)
    (assert_rounds_like if exact else assert_matches)(actual, expected)
    assert actual.is_contiguous()
    for cache, ref in ((k_cache, k_ref), (v_cache, v_ref)):
        written = torch.zeros(pages * page_size, dtype=torch.bool, device=DEVICE)
        written[slots] = True
        flat, flat_ref = cache.view(pages * page_size, -1), ref.view(pages * page_size, -1)
        assert flat[~written].isnan().all()
        (assert_rounds_like if exact else assert_matches)(flat[written], flat_ref[written])


@pytest.mark.parametrize("head_dim", [36, 72, 128])
@pytest.mark.parametrize("n_tokens", [1, 3, 19])
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4, 8])
def test_qk_norm_rope_store(head_dim, n_tokens, n_kv_heads):
    check_qk_norm_rope_store(n_tokens, 8, n_kv_heads, head_dim, page_size=4)


@pytest.mark.parametrize("n_heads, n_kv_heads, head_dim", [(1, 1, 2), (3, 1, 256), (32, 8, 64)])
def test_qk_norm_rope_store_other_shapes(n_heads, n_kv_heads, head_dim):
    check_qk_norm_rope_store(5, n_heads, n_kv_heads, head_dim, page_size=3)


def test_qk_norm_rope_store_half_precision_rounds_like_the_reference():
    check_qk_norm_rope_store(7, 4, 2, 36, page_size=4, dtype=torch.float16, exact=True)


def test_qk_norm_rope_store_skips_negative_slots():
    """An extension of the reference (which rejects them): slot -1 marks a padding token that writes nothing."""
    q, k, v = qkv_views(4, 2, 1, 8)
    q_weight, k_weight = randn(8), randn(8)
    cos, sin = cos_sin(4, 8)
    k_cache, v_cache, k_ref, v_ref = nan_caches(2, 4, 1, 8)
    slots = torch.tensor([5, -1, 0, -1], device=DEVICE)
    out = rotary_triton.qk_norm_rope_store(q, k, v, q_weight, k_weight, 1e-6, cos, sin, k_cache, v_cache, slots)
    assert_matches(out, rotary.apply_rotary(norm.rms_norm(q, q_weight, 1e-6), cos, sin))
    real = slots >= 0
    rotary.qk_norm_rope_store(q[real], k[real], v[real], q_weight, k_weight, 1e-6, cos[real], sin[real],
                              k_ref, v_ref, slots[real])
    torch.testing.assert_close(k_cache, k_ref, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, equal_nan=True)


def test_qk_norm_rope_store_empty():
    q, k, v = qkv_views(0, 8, 2, 64)
    caches = nan_caches(2, 4, 2, 64)[:2]
    cos, sin = cos_sin(0, 64)
    out = rotary_triton.qk_norm_rope_store(q, k, v, randn(64), randn(64), 1e-6, cos, sin, *caches,
                                           torch.zeros(0, dtype=torch.long, device=DEVICE))
    assert out.shape == (0, 8, 64)
    assert all(cache.isnan().all() for cache in caches)


# gather_tokens -------------------------------------------------------------------------------------------------


def ids(n: int) -> torch.Tensor:
    return torch.randint(0, 150_000, (n,), device=DEVICE)


def check_gather(src, keep, prefix, suffix, start):
    actual = gather_triton.gather_tokens(src, keep, prefix, suffix, start)
    expected = gather.gather_tokens(src, keep, prefix, suffix, start)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype == torch.int64
        assert torch.equal(a, e)


@pytest.mark.parametrize("n_src", [0, 1, 5, 1500, 3000])  # the kernel's block is 1024
@pytest.mark.parametrize("kept", ["none", "all", "some"])
@pytest.mark.parametrize("template", [(0, 0), (3, 0), (0, 2), (4, 7)])
def test_gather_tokens_mask(n_src, kept, template):
    mask = {"none": torch.zeros, "all": torch.ones}.get(kept, lambda n, **kw: torch.rand(n, **kw) < 0.4)
    keep = mask(n_src, device=DEVICE).bool()
    check_gather(ids(n_src), keep, ids(template[0]), ids(template[1]), start=17)


@pytest.mark.parametrize("n_src, n_keep", [(0, 0), (1, 1), (5, 0), (5, 3), (3000, 1100), (3000, 3000)])
@pytest.mark.parametrize("template", [(0, 0), (2, 5)])
def test_gather_tokens_indices(n_src, n_keep, template):
    index = torch.randperm(n_src, device=DEVICE)[:n_keep].sort().values
    check_gather(ids(n_src), index, ids(template[0]), ids(template[1]), start=0)


def test_gather_tokens_strided_inputs_and_start_one():
    src, keep = ids(2400)[::2], (torch.rand(2400, device=DEVICE) < 0.5)[::2]
    check_gather(src, keep, ids(6)[::3], ids(8)[1::2], start=1)
    check_gather(src, torch.arange(0, 1200, 7, device=DEVICE), ids(0), ids(3), start=1)


# dispatch ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "tandem.kernels.norm_triton:rms_norm", "tandem.kernels.activation_triton:silu_and_mul",
    "tandem.kernels.rotary_triton:apply_rotary", "tandem.kernels.rotary_triton:qk_norm_rope_store",
    "tandem.kernels.gather_triton:gather_tokens",
])
def test_dispatch_paths_resolve(path):
    module, _, name = path.partition(":")
    assert callable(getattr(importlib.import_module(module), name))


def test_public_op_runs_the_triton_kernel_when_asked():
    from tandem.kernels import rms_norm

    x, weight = randn(3, 37), randn(37)
    with use_backend("triton"):
        actual = rms_norm(x, weight, 1e-6)
    with use_backend("torch"):
        expected = rms_norm(x, weight, 1e-6)
    assert_matches(actual, expected)


# GPU: half precisions at real sizes ----------------------------------------------------------------------------

HALF_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gpu_rms_norm(dtype):
    x, residual, weight = randn(512, 4096, dtype=dtype), randn(512, 4096, dtype=dtype), randn(4096, dtype=dtype)
    assert_matches(norm_triton.rms_norm(x, weight, 1e-6), norm.rms_norm(x, weight, 1e-6))
    actual, actual_sum = norm_triton.rms_norm(x, weight, 1e-6, residual)
    expected, expected_sum = norm.rms_norm(x, weight, 1e-6, residual)
    assert_matches(actual, expected)
    assert torch.equal(actual_sum, expected_sum)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gpu_silu_and_mul(dtype):
    gate_up = randn(512, 2 * 12288, dtype=dtype) * 4
    assert_matches(activation_triton.silu_and_mul(gate_up), activation.silu_and_mul(gate_up))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 72, 80])
def test_gpu_apply_rotary(dtype, head_dim):
    q, _, _ = randn(512, 3 * 16 * head_dim, dtype=dtype).view(512, 3, 16, head_dim).unbind(1)
    cos, sin = cos_sin(512, head_dim)
    assert_matches(rotary_triton.apply_rotary(q, cos, sin), rotary.apply_rotary(q, cos, sin))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gpu_qk_norm_rope_store(dtype):
    check_qk_norm_rope_store(512, 32, 8, 128, page_size=16, dtype=dtype)


@pytest.mark.gpu
def test_gpu_gather_tokens():
    check_gather(ids(4000), torch.rand(4000, device=DEVICE) < 0.3, ids(12), ids(9), start=321)
