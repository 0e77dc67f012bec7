"""The CUDA sampling op (csrc/sampling.cu), a candidate to replace the torch sampler once a GPU measurement says so
(csrc/README.md). Here: it compiles, and its loader says why it is unavailable without CUDA. On a GPU: its kept set
against an independent torch reference, the distribution of its draws, greedy, determinism, every output written,
CUDA-graph capture and input checks."""

from __future__ import annotations

import itertools
import math
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from tandem.kernels.csrc import CSRC, load_sampling_op, sampling_op_error


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    home = Path(cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    return found or (str(home / "bin" / "nvcc") if (home / "bin" / "nvcc").is_file() else None)


def compile_or_fail(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-4000:]}{result.stderr[-4000:]}"


def test_kernels_compile_for_sm90(tmp_path):
    if nvcc() is None:
        pytest.skip("nvcc not found")
    compile_or_fail([nvcc(), "-std=c++17", "-O3", "-gencode=arch=compute_90,code=sm_90", "-c",
                     str(CSRC / "sampling.cu"), "-o", str(tmp_path / "sampling.o")])


def test_binding_compiles_against_torch_headers():
    if nvcc() is None:
        pytest.skip("nvcc not found")
    torch_include, python_include = Path(cpp_extension.include_paths()[0]), Path(sysconfig.get_paths()["include"])
    includes = [*cpp_extension.include_paths(), python_include]
    if not (torch_include / "c10" / "cuda" / "CUDAStream.h").is_file() or not (python_include / "Python.h").is_file():
        pytest.skip("torch's C++ headers or Python's are missing")
    # nvcc compiles the host C++ with its CUDA include path; -fsyntax-only writes nothing. A CPU-only torch lacks one
    # generated header, c10/cuda/impl/cuda_cmake_macros.h, which C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips.
    compile_or_fail([nvcc(), "-std=c++20", "-Xcompiler", "-fsyntax-only", "-c", str(CSRC / "sampling.cpp"),
                     "-o", os.devnull, "-DTORCH_EXTENSION_NAME=tandem_sampling", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
                     *(f"-I{p}" for p in includes)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA fallback")
def test_loader_without_cuda_gives_none_and_a_reason():
    assert load_sampling_op() is None
    assert "CUDA is not available" in sampling_op_error()


# ---- on a GPU ----------------------------------------------------------------------------------------------------

def reference_kept(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, tol: float = 1e-5):
    """(kept, unsure) [B, V] bool, in float64 torch, independent of the op: the temperature, top-k (ties kept) and
    top-p sets of the torch sampler (tandem.runtime.sampling), except that tokens tied with the last token top-p keeps are all
    kept. unsure marks the tokens whose exclusive prefix mass lies within tol (relative) of top_p, where float32
    rounding may decide either way."""
    if temperature == 0:
        kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.argmax(-1, keepdim=True), True)
        return kept, torch.zeros_like(kept)
    z = logits / temperature  # on CUDA: a multiply by the float32 reciprocal, which the op does too
    kept = torch.ones_like(z, dtype=torch.bool)
    if 0 < top_k < z.shape[-1]:
        kept = z >= z.topk(top_k, dim=-1).values[:, -1:]
    unsure = torch.zeros_like(kept)
    if top_p < 1:
        z = z.double()
        w = torch.where(kept, (z - z.max(-1, keepdim=True).values).exp(), 0.0)
        total = w.sum(-1, keepdim=True)
        sorted_z, order = z.sort(-1, descending=True)
        sorted_w = w.gather(-1, order)
        exclusive = sorted_w.cumsum(-1) - sorted_w
        first_of_tie = torch.searchsorted(-sorted_z, -sorted_z, side="left")
        above = exclusive.gather(-1, first_of_tie)  # the mass strictly above each token's value
        kept = kept & torch.empty_like(kept).scatter_(-1, order, above < top_p * total)
        unsure = torch.empty_like(kept).scatter_(-1, order, (above - top_p * total).abs() <= tol * total)
    return kept, unsure


@pytest.fixture(scope="module")
def op():
    module = load_sampling_op()
    if module is None:
        pytest.fail(f"the CUDA sampling op did not load: {sampling_op_error()}")
    return module


def make_logits(batch: int, vocab: int, kind: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=gen) * 3
    if kind == "bf16":  # what a bfloat16 lm_head gives: many ties
        x = x.bfloat16().float()
    if kind == "masked":  # what a constrained decoder hands over: whole chunks of -inf, one row with 50 finite logits
        finite = torch.randperm(vocab, generator=gen)[:50]
        row = torch.full((vocab,), float("-inf"))
        row[finite] = x[0, finite]
        x[:, : vocab // 2] = float("-inf")
        x[0] = row
    return x.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [1000, 151936, 151937])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_kept_set_matches_the_reference(op, batch, vocab):
    grid = itertools.product(["float", "bf16", "masked"], [0.7, 1.0], [1, 20, 1000, 5000, 0], [1.0, 0.8, 0.95, 1e-6])
    for case, (kind, temperature, top_k, top_p) in enumerate(grid):
        logits = make_logits(batch, vocab, kind, seed=case)
        label = f"{kind} T={temperature} top_k={top_k} top_p={top_p}"
        kept = op.kept_mask(logits, temperature, top_k, top_p)
        ref, unsure = reference_kept(logits, temperature, top_k, top_p)
        wrong = (kept != ref) & ~unsure
        sizes = f"kept {kept.sum(-1).tolist()}, reference {ref.sum(-1).tolist()}"
        assert not wrong.any(), f"{label}: {int(wrong.sum())} tokens differ; {sizes}"
        # the set is {z >= a threshold}, and the full-row path finds the same set and draws the same tokens
        z = logits / temperature
        lowest = torch.where(kept, z, float("inf")).min(-1, keepdim=True).values
        assert torch.equal(kept, z >= lowest), label
        assert torch.equal(kept, op.kept_mask(logits, temperature, top_k, top_p, full_row=True)), label
        for offset in range(4):
            tokens = op.sample(logits, temperature, top_k, top_p, 1234, offset)
            assert kept.gather(-1, tokens[:, None]).all(), f"{label}: a token outside the kept set"
            assert torch.equal(tokens, op.sample(logits, temperature, top_k, top_p, 1234, offset, full_row=True)), label


@pytest.mark.gpu
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.8), (0.7, 0, 0.95), (1.3, 5, 1.0)])
def test_draws_follow_the_filtered_softmax(op, temperature, top_k, top_p):
    vocab, rows, calls = 40, 2000, 10  # 20,000 draws: rows of one distribution, each row its own random stream
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 1.5
    logits = logits.cuda().expand(rows, vocab).contiguous()
    kept, _ = reference_kept(logits[:1], temperature, top_k, top_p)
    z = (logits[0] / temperature).double()
    probs = torch.where(kept[0], (z - z.max()).exp(), 0.0)
    probs /= probs.sum()
    counts = sum(torch.bincount(op.sample(logits, temperature, top_k, top_p, 99, offset), minlength=vocab)
                 for offset in range(calls)).double()
    assert counts[probs == 0].sum() == 0
    expected = probs * rows * calls
    small = expected < 5  # pooled into one bin, where the chi-square approximation holds
    counts = torch.cat([counts[~small & (probs > 0)], counts[small].sum()[None]])
    expected = torch.cat([expected[~small & (probs > 0)], expected[small].sum()[None]])
    counts, expected = counts[expected > 0], expected[expected > 0]
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = len(expected) - 1
    assert (chi2 - dof) / math.sqrt(2 * dof) < 6, f"chi-square {chi2:.1f} on {dof} degrees of freedom"


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [1000, 151936, 151937])
def test_temperature_zero_is_argmax(op, vocab):
    logits = make_logits(8, vocab, "bf16", seed=1)
    logits[0, 10:20] = logits[0].max() + 1  # a tie at the top: the lowest index wins, as in torch.argmax
    assert torch.equal(op.sample(logits, 0.0, 20, 0.8, 0, 0), logits.argmax(-1))
    assert torch.equal(op.kept_mask(logits, 0.0, 20, 0.8), reference_kept(logits, 0.0, 0, 1.0)[0])


@pytest.mark.gpu
def test_seed_and_offset_decide_the_draws(op):
    logits = make_logits(8, 151936, "float", seed=2)
    a = op.sample(logits, 1.0, 0, 1.0, 5, 3)
    assert torch.equal(a, op.sample(logits, 1.0, 0, 1.0, 5, 3))
    assert not torch.equal(a, op.sample(logits, 1.0, 0, 1.0, 5, 4))
    assert not torch.equal(a, op.sample(logits, 1.0, 0, 1.0, 6, 3))


@pytest.mark.gpu
def test_every_output_is_written(op):
    logits = make_logits(3, 151937, "bf16", seed=4)
    tokens = torch.full((3,), -5, dtype=torch.long, device="cuda")
    kept = torch.empty(3, 151937, dtype=torch.bool, device="cuda")
    kept.view(torch.uint8).fill_(0x77)
    op.sample(logits, 0.7, 20, 0.8, 1, 0, out=tokens)
    op.kept_mask(logits, 0.7, 20, 0.8, out=kept)
    assert torch.equal(tokens, op.sample(logits, 0.7, 20, 0.8, 1, 0))
    assert kept.view(torch.uint8).max() <= 1
    assert torch.equal(kept, op.kept_mask(logits, 0.7, 20, 0.8))


@pytest.mark.gpu
@pytest.mark.parametrize("scale,top_k,top_p", [(3.0, 20, 0.8), (1.0, 0, 0.95)])  # the candidate path; the full row
def test_cuda_graph_capture_and_replay(op, scale, top_k, top_p):
    logits = torch.randn(8, 151936, device="cuda") * scale
    args = (0.7, top_k, top_p, 11, 2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op.sample(logits, *args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = op.sample(logits, *args)
    for _ in range(2):
        logits.copy_(torch.randn_like(logits) * scale)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(tokens, op.sample(logits, *args))


@pytest.mark.gpu
def test_bad_inputs_are_refused(op):
    logits = torch.randn(2, 100, device="cuda")
    for bad, message in [
        (lambda: op.sample(logits.cpu(), 1.0, 0, 1.0, 0, 0), "CUDA tensor"),
        (lambda: op.sample(logits.half(), 1.0, 0, 1.0, 0, 0), "float32"),
        (lambda: op.sample(logits[None], 1.0, 0, 1.0, 0, 0), "2-D"),
        (lambda: op.sample(logits.t(), 1.0, 0, 1.0, 0, 0), "contiguous"),
        (lambda: op.sample(logits, -1.0, 0, 1.0, 0, 0), "temperature"),
        (lambda: op.sample(logits, 1.0, 0, 0.0, 0, 0), "top_p"),
        (lambda: op.sample(logits, 1.0, -1, 1.0, 0, 0), "top_k"),
        (lambda: op.sample(logits, 1.0, 0, 1.0, 0, 0, out=torch.empty(3, dtype=torch.long, device="cuda")), "out"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            bad()
