"""The Triton attention kernels against their torch references (tandem.kernels.attention).

Without CUDA they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), in float32 and with small
shapes; with CUDA the same tests run compiled on DEVICE (the kernels' dots use input_precision="ieee", so the
float32 tolerances hold there too), and the @pytest.mark.gpu tests repeat the comparisons in float16/bfloat16 at
larger sizes against the reference computed in float32 from the same inputs. Everything a kernel must not read
is poisoned with NaN: cache pages in no block table, block-table entries past a sequence's pages, slots past
seq_len in a last page, and the columns of q's fused projection buffer that are not q. A read outside the
intended region turns the output into NaN.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tandem.kernels import attention as reference
from tandem.kernels import attention_triton as kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")
FP32_TOL = dict(atol=2e-5, rtol=1e-4)
GPU_TOL = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
# key_mass sums float32 probabilities of scores whose products are exact even for 16-bit inputs.
MASS_TOL = dict(atol=1e-4, rtol=1e-4)

# (query heads, kv heads, head_dim, page_size): GQA ratios 1, 2, 4, 8; head dims 64, 72 (not a power of two), 128.
CONFIGS = [(4, 4, 64, 16), (4, 2, 72, 4), (8, 2, 128, 16), (8, 1, 64, 4)]
CONFIG_IDS = [f"h{h}-kv{kv}-d{d}-page{p}" for h, kv, d, p in CONFIGS]


def fused_view(rows: int, heads: int, head_dim: int, dtype, device, gen) -> torch.Tensor:
    """[rows, heads, head_dim] of random values, the middle columns of a NaN-filled [rows, (heads + 2) * D]
    buffer, like q in the output of a fused qkv projection (row stride != heads * head_dim)."""
    buf = torch.full((rows, (heads + 2) * head_dim), NAN, dtype=dtype, device=device)
    x = buf[:, head_dim : (heads + 1) * head_dim].view(rows, heads, head_dim)
    x.copy_(torch.randn(rows, heads, head_dim, generator=gen).to(dtype))
    return x


def paged_cache(seq_lens: list[int], kv_heads: int, head_dim: int, page_size: int, dtype, device, gen):
    """(k_cache, v_cache, block_tables): random K/V for each sequence's tokens on scrambled pages, NaN elsewhere.

    The block table is as wide as the longest sequence's pages (as the runtime builds it); entries past a
    sequence's pages point at a spare, NaN-filled page."""
    pages_per_seq = [-(-n // page_size) for n in seq_lens]
    num_pages = sum(pages_per_seq) + 3
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_cache = torch.full(shape, NAN, dtype=dtype, device=device)
    v_cache = torch.full(shape, NAN, dtype=dtype, device=device)
    order = torch.randperm(num_pages, generator=gen).tolist()
    block_tables = torch.full((len(seq_lens), max(pages_per_seq, default=0) or 1), order[-1], dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        for i in range(pages_per_seq[b]):
            page = order.pop(0)
            block_tables[b, i] = page
            used = min(page_size, n - i * page_size)
            k_cache[page, :used] = torch.randn(used, kv_heads, head_dim, generator=gen).to(dtype)
            v_cache[page, :used] = torch.randn(used, kv_heads, head_dim, generator=gen).to(dtype)
    return k_cache, v_cache, block_tables.to(device)


def int32(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def cumulative(lengths: list[int], device) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return int32(out, device)


def to_float(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() for t in tensors]


# ------------------------------------------------------------------------------------------------ prefill


def run_prefill(seq_lens, query_lens, config, dtype, device, seed=0):
    heads, kv_heads, head_dim, page_size = config
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, block_tables = paged_cache(seq_lens, kv_heads, head_dim, page_size, dtype, device, gen)
    q = fused_view(sum(query_lens), heads, head_dim, dtype, device, gen)
    lens, cu, scale = int32(seq_lens, device), cumulative(query_lens, device), head_dim**-0.5
    out = kernels.prefill_attention(q, k_cache, v_cache, block_tables, lens, cu, max(query_lens, default=0), scale)
    expected = reference.prefill_attention(*to_float(q, k_cache, v_cache), block_tables, lens, cu,
                                           max(query_lens, default=0), scale)
    assert out.shape == q.shape and out.dtype == dtype
    return out, expected


PREFILL_CASES = {
    # Whole prompts of odd lengths next to a 5-token suffix on a 32-token cached prefix and a single token.
    "mixed": ([17, 70, 37, 1], [17, 70, 5, 1]),
    # A short query block on a longer cached prefix: the causal offset rule with n > L, crossing pages.
    "suffix": ([70], [3]),
}


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_matches_reference(case, config):
    out, expected = run_prefill(*PREFILL_CASES[case], config, torch.float32, DEVICE)
    torch.testing.assert_close(out, expected, **FP32_TOL)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1]], ids=CONFIG_IDS[:2])
def test_prefill_several_query_blocks_on_a_prefix(config):
    # More new tokens than one query block (64 rows in float32), on top of a 61-token prefix.
    out, expected = run_prefill([211, 9], [150, 9], config, torch.float32, DEVICE)
    torch.testing.assert_close(out, expected, **FP32_TOL)


def test_prefill_single_token():
    out, expected = run_prefill([1], [1], CONFIGS[1], torch.float32, DEVICE)
    torch.testing.assert_close(out, expected, **FP32_TOL)


def test_prefill_float16():
    out, expected = run_prefill([17, 37], [17, 5], CONFIGS[2], torch.float16, DEVICE)
    torch.testing.assert_close(out.float(), expected, **GPU_TOL[torch.float16])


@pytest.mark.parametrize("seq_lens", [[], [5, 3]], ids=["no-sequences", "no-new-tokens"])
def test_prefill_empty(seq_lens):
    out, expected = run_prefill(seq_lens, [0] * len(seq_lens), CONFIGS[0], torch.float32, DEVICE)
    assert out.shape == expected.shape == (0, 4, 64)


# ------------------------------------------------------------------------------------------------ decode


def run_decode(seq_lens, config, dtype, device, with_mass, seed=0):
    """(out, expected, mass added, expected mass added, untouched-entries check) of one decode step."""
    heads, kv_heads, head_dim, page_size = config
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, block_tables = paged_cache(seq_lens, kv_heads, head_dim, page_size, dtype, device, gen)
    q = fused_view(len(seq_lens), heads, head_dim, dtype, device, gen)
    lens, scale = int32(seq_lens, device), head_dim**-0.5
    width = max(seq_lens, default=0) + 5  # wider than any sequence: entries past seq_len must stay as they are
    base = (torch.rand(len(seq_lens), width, generator=gen) * 3).to(device)
    mass = base.clone() if with_mass else None
    expected_mass = base.clone() if with_mass else None
    out = kernels.decode_attention(q, k_cache, v_cache, block_tables, lens, scale, mass)
    expected = reference.decode_attention(*to_float(q, k_cache, v_cache), block_tables, lens, scale, expected_mass)
    assert out.shape == q.shape and out.dtype == dtype
    if with_mass:
        for b, n in enumerate(seq_lens):
            assert torch.equal(mass[b, n:], base[b, n:]), "key_mass written past seq_len"
        mass, expected_mass = mass - base, expected_mass - base
    return out, expected, mass, expected_mass


DECODE_LENS = [1, 300, 37, 16]  # 300: several splits; 16: ends exactly on a page boundary


def test_decode_lens_use_several_splits():
    # The block table of DECODE_LENS is 300 tokens wide: the split kernel must really split it.
    for _, kv_heads, head_dim, page_size in CONFIGS:
        max_context = -(-300 // page_size) * page_size
        block_n = kernels._block_n(kernels._block_d(head_dim), 4)
        num_splits, split_len = kernels._decode_splits(len(DECODE_LENS), kv_heads, max_context, block_n,
                                                       torch.device(DEVICE))
        assert num_splits >= 3 and split_len % block_n == 0 and num_splits * split_len >= max_context


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("with_mass", [False, True], ids=["no-mass", "key-mass"])
def test_decode_matches_reference(with_mass, config):
    out, expected, mass, expected_mass = run_decode(DECODE_LENS, config, torch.float32, DEVICE, with_mass)
    torch.testing.assert_close(out, expected, **FP32_TOL)
    if with_mass:
        torch.testing.assert_close(mass, expected_mass, **MASS_TOL)
        # Each query head's probabilities sum to 1 over its keys.
        torch.testing.assert_close(mass.sum(1), torch.full((len(DECODE_LENS),), float(config[0])))


def test_decode_key_mass_accumulates_over_calls():
    heads, kv_heads, head_dim, page_size = CONFIGS[1]
    gen = torch.Generator().manual_seed(3)
    seq_lens = [37, 5]
    k_cache, v_cache, block_tables = paged_cache(seq_lens, kv_heads, head_dim, page_size, torch.float32, DEVICE, gen)
    q = fused_view(2, heads, head_dim, torch.float32, DEVICE, gen)
    lens = int32(seq_lens, DEVICE)
    mass, expected = torch.zeros(2, 40, device=DEVICE), torch.zeros(2, 40, device=DEVICE)
    for _ in range(2):  # two layers
        kernels.decode_attention(q, k_cache, v_cache, block_tables, lens, 0.1, mass)
        reference.decode_attention(q, k_cache, v_cache, block_tables, lens, 0.1, expected)
    torch.testing.assert_close(mass, expected, **MASS_TOL)


def test_decode_single_token_context():
    out, expected, mass, expected_mass = run_decode([1], CONFIGS[3], torch.float32, DEVICE, True)
    torch.testing.assert_close(out, expected, **FP32_TOL)
    torch.testing.assert_close(mass, expected_mass, **MASS_TOL)


def test_decode_float16():
    out, expected, mass, expected_mass = run_decode([300, 9], CONFIGS[2], torch.float16, DEVICE, True)
    torch.testing.assert_close(out.float(), expected, **GPU_TOL[torch.float16])
    torch.testing.assert_close(mass, expected_mass, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_reference_decode_is_prefill_of_one_token(config):
    # The reference decode pads every row to the longest sequence; its per-sequence prefill does not.
    heads, kv_heads, head_dim, page_size = config
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, block_tables = paged_cache(DECODE_LENS, kv_heads, head_dim, page_size, torch.float32, "cpu", gen)
    q = fused_view(len(DECODE_LENS), heads, head_dim, torch.float32, "cpu", gen)
    lens, scale = int32(DECODE_LENS, "cpu"), head_dim**-0.5
    out = reference.decode_attention(q, k_cache, v_cache, block_tables, lens, scale)
    one_each = int32(list(range(len(DECODE_LENS) + 1)), "cpu")
    expected = reference.prefill_attention(q, k_cache, v_cache, block_tables, lens, one_each, 1, scale)
    torch.testing.assert_close(out, expected, **FP32_TOL)


def test_decode_empty():
    out, expected, mass, expected_mass = run_decode([], CONFIGS[0], torch.float32, DEVICE, True)
    assert out.shape == expected.shape == (0, 4, 64) and mass.numel() == 0


# ------------------------------------------------------------------------------------------------ varlen


def run_varlen(lengths, heads, kv_heads, head_dim, dtype, device, seed=0):
    """q, k, v are views of one fused [T, (heads + 2 * kv_heads) * D] projection, as in the vision tower."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    qkv = torch.randn(total, heads + 2 * kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    cu, scale = cumulative(lengths, device), head_dim**-0.5
    out = kernels.varlen_attention(q, k, v, cu, max(lengths, default=0), scale)
    expected = reference.varlen_attention(*to_float(q, k, v), cu, max(lengths, default=0), scale)
    assert out.shape == q.shape and out.dtype == dtype
    return out, expected


VARLEN_HEADS = [(4, 4, 72), (4, 2, 64), (2, 2, 128), (8, 1, 64)]


@pytest.mark.parametrize("heads", VARLEN_HEADS, ids=[f"h{h}-kv{kv}-d{d}" for h, kv, d in VARLEN_HEADS])
def test_varlen_matches_reference(heads):
    out, expected = run_varlen([1, 17, 70, 3], *heads, torch.float32, DEVICE)
    torch.testing.assert_close(out, expected, **FP32_TOL)


def test_varlen_segment_longer_than_a_block():
    out, expected = run_varlen([150, 37], 2, 2, 72, torch.float32, DEVICE)
    torch.testing.assert_close(out, expected, **FP32_TOL)


def test_varlen_single_token():
    out, expected = run_varlen([1], 4, 4, 72, torch.float32, DEVICE)
    torch.testing.assert_close(out, expected, **FP32_TOL)


def test_varlen_float16():
    out, expected = run_varlen([70, 37], 4, 4, 72, torch.float16, DEVICE)
    torch.testing.assert_close(out.float(), expected, **GPU_TOL[torch.float16])


def test_varlen_empty():
    out, expected = run_varlen([], 4, 4, 72, torch.float32, DEVICE)
    assert out.shape == expected.shape == (0, 4, 72)


# ------------------------------------------------------------------------------------------------ CUDA

GPU_DTYPES = [torch.bfloat16, torch.float16]
GPU_DTYPE_IDS = ["bf16", "fp16"]
LARGE = (32, 8, 128, 16)  # GQA 4, head_dim 128, page 16


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=GPU_DTYPE_IDS)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_cuda(case, config, dtype):
    out, expected = run_prefill(*PREFILL_CASES[case], config, dtype, "cuda")
    torch.testing.assert_close(out.float(), expected, **GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=GPU_DTYPE_IDS)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_decode_cuda(config, dtype):
    out, expected, mass, expected_mass = run_decode(DECODE_LENS, config, dtype, "cuda", True)
    torch.testing.assert_close(out.float(), expected, **GPU_TOL[dtype])
    torch.testing.assert_close(mass, expected_mass, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=GPU_DTYPE_IDS)
@pytest.mark.parametrize("heads", VARLEN_HEADS, ids=[f"h{h}-kv{kv}-d{d}" for h, kv, d in VARLEN_HEADS])
def test_varlen_cuda(heads, dtype):
    out, expected = run_varlen([1, 17, 70, 3], *heads, dtype, "cuda")
    torch.testing.assert_close(out.float(), expected, **GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=GPU_DTYPE_IDS)
@pytest.mark.parametrize("query_lens", [[1000] * 4, [1000, 600, 1, 250]], ids=["whole", "suffixes"])
def test_prefill_cuda_large(query_lens, dtype):
    out, expected = run_prefill([1000] * 4, query_lens, LARGE, dtype, "cuda")
    torch.testing.assert_close(out.float(), expected, **GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=GPU_DTYPE_IDS)
def test_decode_cuda_large(dtype):
    out, expected, mass, expected_mass = run_decode([1000, 999, 1, 640], LARGE, dtype, "cuda", True)
    torch.testing.assert_close(out.float(), expected, **GPU_TOL[dtype])
    torch.testing.assert_close(mass, expected_mass, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=GPU_DTYPE_IDS)
@pytest.mark.parametrize("heads", [(32, 8, 128), (16, 16, 72)], ids=["h32-kv8-d128", "h16-kv16-d72"])
def test_varlen_cuda_large(heads, dtype):
    out, expected = run_varlen([1000] * 4, *heads, dtype, "cuda")
    torch.testing.assert_close(out.float(), expected, **GPU_TOL[dtype])


def test_dispatcher_runs_these_kernels(monkeypatch):
    import tandem.kernels as ops
    from tandem.kernels import backend

    loaded = []
    load = backend._load
    monkeypatch.setattr(backend, "_load", lambda path: loaded.append(load(path)) or loaded[-1])
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, block_tables = paged_cache([5], 2, 36, 4, torch.float32, DEVICE, gen)
    q = torch.randn(5, 4, 36, generator=gen).to(DEVICE)
    lens = int32([5], DEVICE)
    with ops.use_backend("triton"):
        ops.prefill_attention(q, k_cache, v_cache, block_tables, lens, cumulative([5], DEVICE), 5, 0.2)
        ops.decode_attention(q[:1], k_cache, v_cache, block_tables, lens, 0.2)
        ops.varlen_attention(q, q, q, cumulative([2, 3], DEVICE), 3, 0.2)
    assert loaded == [kernels.prefill_attention, kernels.decode_attention, kernels.varlen_attention]


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=GPU_DTYPE_IDS)
def test_flash_attn_varlen_matches_reference(dtype):
    from tandem.kernels import attention_flash

    frames, heads, dim = [37, 256, 1], 16, 72
    cu = torch.tensor([0, 37, 293, 294], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(frames), heads, dim, device="cuda", dtype=dtype) for _ in range(3))
    expected = reference.varlen_attention(q.float(), k.float(), v.float(), cu, max(frames), dim**-0.5)
    got = attention_flash.varlen_attention(q, k, v, cu, max(frames), dim**-0.5)
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
