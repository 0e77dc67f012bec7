"""Every Triton kernel compiles for the H100 / H200 (sm_90) at the real Qwen3-VL sizes, on a machine with no GPU.

tandem.bench.compile_check calls each op's Triton wrapper with a stand-in driver that makes launches compile only
(see its docstring); Triton lowers each kernel to PTX and ptxas assembles it. This catches what Triton's CPU
interpreter lets through (shape rules of tl.dot, layouts, types) and tiles that need more shared memory than the
device has, before a GPU run spends its time on them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
nvidia = pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")


def launched_kernels() -> set[str]:
    """Names of the @triton.jit functions that kernels/*_triton.py launch (`name[grid](...)`), read from source."""
    names = set()
    for path in (ROOT / "kernels").glob("*_triton.py"):
        source = path.read_text()
        jitted = set(re.findall(r"@triton\.jit\s+def (\w+)", source))
        names |= jitted & set(re.findall(r"(\w+)\[", source))
    return names


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tandem.bench.compile_check", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_each_model_size_and_dtype(report):
    assert report["failures"] == [] and report["arch"] == 90
    expected = launched_kernels()
    assert len(expected) >= 9
    for preset in ("qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b"):
        for dtype in ("bfloat16", "float16", "float32"):
            got = {row["kernel"] for row in report["kernels"] if row["preset"] == preset and row["dtype"] == dtype}
            assert got == expected, (preset, dtype, expected ^ got)


def test_shared_memory_fits_and_no_16_bit_kernel_spills(report):
    """Every kernel fits sm_90's 227 KiB of shared memory per block; in bfloat16 and float16 (the GPU's dtypes)
    every kernel keeps its tiles in registers (no stack: nothing spilled to local memory), the padded head dim of
    the 8B vision tower (72 as a 128-wide tile) included. float32 is a test-only dtype there and may spill."""
    for row in report["kernels"]:
        assert 0 <= row["shared"] <= 227 * 1024, row
        assert row["registers"] is not None and row["registers"] <= 255, row
        if row["dtype"] != "float32":
            assert row["stack"] == 0, row
