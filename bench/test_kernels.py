"""Micro-benchmarks: each Triton kernel (and CUDA C++ op) beside the torch code it replaces, on CUDA at real sizes.

    python -m pytest bench/test_kernels.py --benchmark-json=bench.json
    python -m tandem.bench.kernels_report bench.json

Every case records the bytes it must move at least (inputs read once, outputs written once), so the report can
give achieved bandwidth against the device's measured copy bandwidth (test_device_copy). Calls are timed in
batches of CALLS inside a CUDA graph (see `run`), so a small kernel's figure is not the host's launch cost.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import activation, attention, gather, norm, rotary, use_backend
from tandem.kernels.csrc import load_sampling_op, sampling_op_error
from tandem.models.config import parse_config
from tandem.models.tiny import PRESETS
from tandem.runtime.sampling import SamplingParams, sample
import tandem.kernels as ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA device")

DTYPE = torch.bfloat16
PAGE = 16


CALLS = 20  # calls of fn per timed round: one device sync per round, not per call


def run(benchmark, fn, bytes_moved: int, graph: bool = True) -> None:
    """Time CALLS calls of fn per round, the device synchronised once per round; the report divides the median round
    by CALLS. With graph (the default) the calls are captured in a CUDA graph and each round replays it: kernels
    then follow each other with a graph's launch gaps, as in Tandem's decode step, so a small kernel's time is its
    own and not the host's launch cost. graph=False (or an fn that cannot be captured) times eager launches: what
    code outside the graph, like the sampler, costs."""
    fn()  # compiles the Triton kernels and builds the op, never inside a capture
    torch.cuda.synchronize()
    timed = "eager"
    body = lambda: [fn() for _ in range(CALLS)]  # noqa: E731
    if graph:
        try:
            replayed = torch.cuda.CUDAGraph()
            with torch.cuda.graph(replayed):
                body()
            body, timed = replayed.replay, "cuda graph"
        except RuntimeError:  # an op that cannot be captured: timed eagerly, and said so
            torch.cuda.synchronize()

    def call():
        body()
        torch.cuda.synchronize()

    benchmark.extra_info.update(bytes=bytes_moved, calls=CALLS, timed=timed)
    benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=3)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def triton(fn):
    """fn run with the Triton kernels forced, whatever TANDEM_KERNEL_BACKEND says."""

    def wrapped():
        with use_backend("triton"):
            return fn()

    return wrapped


def test_device_copy(benchmark):
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    run(benchmark, lambda: dst.copy_(src), 2 * src.numel())


def _decode_projections(preset: str) -> dict[str, tuple[int, int]]:
    """(out, in) features of each matmul of a decode step (fused as Tandem loads them) and of the output head."""
    t = parse_config(PRESETS[preset]).text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    return {"qkv": (q + 2 * kv, t.hidden_size), "o": (t.hidden_size, q), "gate_up": (2 * t.intermediate_size, t.hidden_size),
            "down": (t.hidden_size, t.intermediate_size), "lm_head": (t.vocab_size, t.hidden_size)}


@pytest.mark.parametrize("preset", ["qwen3-vl-8b", "qwen3-vl-2b"])
@pytest.mark.parametrize("name", ["qkv", "o", "gate_up", "down", "lm_head"])
def test_decode_linear(benchmark, preset, name):
    """A decode step's matmuls at batch 1 (cuBLAS through F.linear): how close each gets to the copy bandwidth is
    what the decode floor assumes. Calls rotate over enough weight copies (>= 1 GiB) that none is served from L2,
    as in a real step, where every layer reads other weights."""
    out_features, in_features = _decode_projections(preset)[name]
    x = torch.randn(1, in_features, device="cuda", dtype=DTYPE)
    copies = max(2, -(-(1 << 30) // (out_features * in_features * 2)))
    weights = [torch.randn(out_features, in_features, device="cuda", dtype=DTYPE) for _ in range(copies)]
    turn = itertools.count()
    run(benchmark, lambda: F.linear(x, weights[next(turn) % copies]), nbytes(x, weights[0]) + out_features * 2)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("tokens", [1, 4096])
def test_rms_norm_residual(benchmark, impl, tokens):
    x = torch.randn(tokens, 4096, device="cuda", dtype=DTYPE)
    res, w = torch.randn_like(x), torch.randn(4096, device="cuda", dtype=DTYPE)
    fn = (lambda: norm.rms_norm(x, w, 1e-6, res)) if impl == "torch" else triton(lambda: ops.rms_norm(x, w, 1e-6, res))
    run(benchmark, fn, nbytes(x, res, w) + 2 * nbytes(x))


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("tokens", [1, 4096])
def test_silu_and_mul(benchmark, impl, tokens):
    gate_up = torch.randn(tokens, 2 * 12288, device="cuda", dtype=DTYPE)
    fn = (lambda: activation.silu_and_mul(gate_up)) if impl == "torch" else triton(lambda: ops.silu_and_mul(gate_up))
    run(benchmark, fn, nbytes(gate_up) * 3 // 2)


def _qkv(tokens: int, heads: int = 32, kv_heads: int = 8, dim: int = 128):
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device="cuda", dtype=DTYPE)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("tokens", [1, 4096])
def test_qk_norm_rope_store(benchmark, impl, tokens):
    q, k, v = _qkv(tokens)
    pages = -(-tokens // PAGE) + 1
    k_cache = torch.empty(pages, PAGE, 8, 128, device="cuda", dtype=DTYPE)
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(pages * PAGE, device="cuda")[:tokens]
    wq, wk = torch.randn(128, device="cuda", dtype=DTYPE), torch.randn(128, device="cuda", dtype=DTYPE)
    cos, sin = torch.randn(tokens, 128, device="cuda"), torch.randn(tokens, 128, device="cuda")
    args = (q, k, v, wq, wk, 1e-6, cos, sin, k_cache, v_cache, slots)
    fn = (lambda: rotary.qk_norm_rope_store(*args)) if impl == "torch" else triton(lambda: ops.qk_norm_rope_store(*args))
    run(benchmark, fn, 2 * nbytes(q) + 2 * nbytes(k) + 2 * nbytes(v) + nbytes(cos, sin))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_vision_rotary(benchmark, impl):
    x = torch.randn(4096, 16, 72, device="cuda", dtype=DTYPE)
    cos, sin = torch.randn(4096, 72, device="cuda"), torch.randn(4096, 72, device="cuda")
    fn = (lambda: rotary.apply_rotary(x, cos, sin)) if impl == "torch" else triton(lambda: ops.apply_rotary(x, cos, sin))
    run(benchmark, fn, 2 * nbytes(x) + nbytes(cos, sin))


def _paged(k: torch.Tensor, v: torch.Tensor):
    """k, v [n, Hkv, D] laid into a scrambled paged cache -> (k_cache, v_cache, block_table [1, pages])."""
    n = k.shape[0]
    pages = -(-n // PAGE)
    order = torch.randperm(pages, device="cuda")
    k_cache = torch.zeros(pages, PAGE, *k.shape[1:], device="cuda", dtype=k.dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = (order[torch.arange(n, device="cuda") // PAGE] * PAGE + torch.arange(n, device="cuda") % PAGE)
    k_cache.view(-1, *k.shape[1:])[slots] = k
    v_cache.view(-1, *v.shape[1:])[slots] = v
    return k_cache, v_cache, order.int()[None]


@pytest.mark.parametrize("impl", ["triton", "sdpa"])
def test_prefill_attention(benchmark, impl):
    n, heads, kv_heads, dim = 4096, 32, 8, 128
    q = torch.randn(n, heads, dim, device="cuda", dtype=DTYPE)
    k, v = torch.randn(n, kv_heads, dim, device="cuda", dtype=DTYPE), torch.randn(n, kv_heads, dim, device="cuda", dtype=DTYPE)
    k_cache, v_cache, table = _paged(k, v)
    lens = torch.tensor([n], device="cuda", dtype=torch.int32)
    cu = torch.tensor([0, n], device="cuda", dtype=torch.int32)
    if impl == "sdpa":  # what an unpaged engine runs: contiguous K/V, causal; 4-D, so SDPA can pick a fused kernel
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        fn = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    else:
        fn = triton(lambda: ops.prefill_attention(q, k_cache, v_cache, table, lens, cu, n, dim**-0.5))
    run(benchmark, fn, 2 * nbytes(q) + nbytes(k, v))


@pytest.mark.parametrize("impl", ["triton", "sdpa"])
@pytest.mark.parametrize("context", [4096, 32768])
def test_decode_attention(benchmark, impl, context):
    heads, kv_heads, dim = 32, 8, 128
    q = torch.randn(1, heads, dim, device="cuda", dtype=DTYPE)
    k = torch.randn(context, kv_heads, dim, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    k_cache, v_cache, table = _paged(k, v)
    lens = torch.tensor([context], device="cuda", dtype=torch.int32)
    if impl == "sdpa":
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        fn = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
    else:
        fn = triton(lambda: ops.decode_attention(q, k_cache, v_cache, table, lens, dim**-0.5))
    run(benchmark, fn, 2 * nbytes(q) + nbytes(k, v))


@pytest.mark.parametrize("impl", ["triton", "sdpa"])
def test_vision_attention(benchmark, impl):
    frames, patches, heads, dim = 4, 1024, 16, 72
    q, k, v = (torch.randn(frames * patches, heads, dim, device="cuda", dtype=DTYPE) for _ in range(3))
    cu = torch.arange(0, frames * patches + 1, patches, device="cuda", dtype=torch.int32)
    if impl == "sdpa":  # transformers' path without flash-attn: one SDPA call per frame
        fn = lambda: attention.varlen_attention(q, k, v, cu, patches, dim**-0.5)
    else:
        fn = triton(lambda: ops.varlen_attention(q, k, v, cu, patches, dim**-0.5))
    run(benchmark, fn, 2 * nbytes(q) + nbytes(k, v))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gather_tokens(benchmark, impl):
    src = torch.randint(0, 151936, (1024,), device="cuda")
    keep = torch.rand(1024, device="cuda") < 0.3
    prefix, suffix = torch.randint(0, 151936, (12,), device="cuda"), torch.randint(0, 151936, (9,), device="cuda")
    args = (src, keep, prefix, suffix, 700)
    fn = (lambda: gather.gather_tokens(*args)) if impl == "torch" else triton(lambda: ops.gather_tokens(*args))
    run(benchmark, fn, nbytes(src, keep, prefix, suffix) + 2 * 8 * 330)


SAMPLING = {  # Qwen3-VL's defaults, and nucleus sampling alone, at temperature 0.7
    "k20-p0.8-peaked": (20, 0.8, "peaked"),
    "k0-p0.95-peaked": (0, 0.95, "peaked"),
    "k0-p0.95-flat": (0, 0.95, "flat"),
}


def _sampling_logits(batch: int, shape: str) -> torch.Tensor:
    """float32 [batch, 151936]. peaked: a few dozen likely tokens over a low floor, like a confident language model
    (the op's candidate path); flat: randn, where top_p 0.95 keeps a third of the vocabulary (its full-row path)."""
    x = torch.randn(batch, 151936, device="cuda")
    if shape == "peaked":
        x *= 2
        boost = torch.empty(batch, 32, device="cuda").uniform_(8, 16)
        x.scatter_add_(1, torch.randint(0, 151936, (batch, 32), device="cuda"), boost)
    return x


@pytest.mark.parametrize("impl", ["cuda", "torch"])
@pytest.mark.parametrize("case", list(SAMPLING))
@pytest.mark.parametrize("batch", [1, 8])
def test_sampling(benchmark, impl, case, batch):
    top_k, top_p, shape = SAMPLING[case]
    logits = _sampling_logits(batch, shape)
    if impl == "torch":
        params, gen = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p), torch.Generator("cuda").manual_seed(0)
        fn = lambda: sample(logits, params, gen)
    else:
        op = load_sampling_op()
        if op is None:
            pytest.skip(f"the CUDA sampling op did not load: {sampling_op_error()}")
        fn = lambda: op.sample(logits, 0.7, top_k, top_p, 1234, 0)
    run(benchmark, fn, nbytes(logits) + 8 * batch, graph=False)  # the engine samples outside its graph
