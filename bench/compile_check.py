"""Compile every Triton kernel for a GPU, without a GPU: what the kernels' first GPU run would compile.

Each op of tandem.kernels is called through its Triton wrapper on CPU tensors shaped like the real Qwen3-VL-2B,
-4B and -8B layers, in bfloat16, float16 and float32. A stand-in driver reports the target (sm_90: H100 / H200)
and every launch only compiles (Triton's warmup path): the wrappers pick block sizes, warps and stages exactly as
they would on the GPU, Triton lowers the kernel to PTX and ptxas assembles it. Nothing runs, so the outputs are
garbage; what is checked is that each kernel compiles, and, from the cubin's resource usage (cuobjdump), its
shared memory fits the device and its registers do not spill.

    python -m tandem.bench.compile_check [--arch 90] [--json out.json]

Runs with TRITON_INTERPRET unset (the kernels must be real JIT functions); tests/test_triton_compile.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90 (after opting in)
PRESETS = ("qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PAGE_SIZE = 16


class CompileOnlyDriver:
    """The parts of Triton's active driver a warmup launch uses, for a machine with no GPU."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def install(arch: int) -> list[tuple[str, object]]:
    """Make every kernel launch compile only; returns the list the compiled kernels are appended to."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(CompileOnlyDriver(arch))
    compiled: list[tuple[str, object]] = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = compile_only
    return compiled


def exercise(preset: str, dtype: torch.dtype) -> None:
    """Call every Triton op the way the model does, at this preset's layer sizes."""
    from tandem.kernels import activation_triton, attention_triton, gather_triton, norm_triton, rotary_triton
    from tandem.models.config import parse_config
    from tandem.models.tiny import PRESETS as CONFIGS

    config = parse_config(CONFIGS[preset])
    text, vision = config.text, config.vision
    T, seqs, pages = 5, 2, 8
    x = torch.randn(T, text.hidden_size, dtype=dtype)
    w = torch.randn(text.hidden_size, dtype=dtype)
    norm_triton.rms_norm(x, w, 1e-6)
    norm_triton.rms_norm(x, w, 1e-6, residual=x.clone())
    activation_triton.silu_and_mul(torch.randn(T, 2 * text.intermediate_size, dtype=dtype))

    H, Hkv, D = text.num_heads, text.num_kv_heads, text.head_dim
    qkv = torch.randn(T, (H + 2 * Hkv) * D, dtype=dtype)  # the fused projection, split into strided views
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
    cos, sin = torch.randn(T, D), torch.randn(T, D)
    cache = torch.zeros(2, pages * seqs + 1, PAGE_SIZE, Hkv, D, dtype=dtype)
    slots = torch.arange(T, dtype=torch.long)
    q = rotary_triton.qk_norm_rope_store(q, k, v, torch.randn(D, dtype=dtype), torch.randn(D, dtype=dtype), 1e-6,
                                         cos, sin, cache[0], cache[1], slots)
    tables = torch.arange(seqs * pages, dtype=torch.int32).view(seqs, pages)
    attention_triton.prefill_attention(q, cache[0], cache[1], tables, torch.tensor([3, 40], dtype=torch.int32),
                                       torch.tensor([0, 3, T], dtype=torch.int32), 3, D**-0.5)
    one = torch.randn(seqs, H, D, dtype=dtype)
    lens = torch.tensor([40, 100], dtype=torch.int32)
    attention_triton.decode_attention(one, cache[0], cache[1], tables, lens, D**-0.5)
    attention_triton.decode_attention(one, cache[0], cache[1], tables, lens, D**-0.5,
                                      key_mass=torch.zeros(seqs, pages * PAGE_SIZE))

    Hv, Dv = vision.num_heads, vision.head_dim
    patches = torch.randn(T, 3 * vision.hidden_size, dtype=dtype)
    vq, vk, vv = (t.view(T, Hv, Dv) for t in patches.split(vision.hidden_size, dim=-1))
    vcos, vsin = torch.randn(T, Dv), torch.randn(T, Dv)
    vq, vk = rotary_triton.apply_rotary(vq, vcos, vsin), rotary_triton.apply_rotary(vk, vcos, vsin)
    attention_triton.varlen_attention(vq, vk, vv, torch.tensor([0, 2, T], dtype=torch.int32), 3, Dv**-0.5)

    ids = torch.arange(30, dtype=torch.long)
    gather_triton.gather_tokens(ids, ids % 3 == 0, ids[:4], ids[:5], 17)
    gather_triton.gather_tokens(ids, torch.tensor([1, 4, 9]), ids[:4], ids[:5], 17)


def resource_usage(kernel) -> dict:
    """Registers, stack (spills land there) and shared memory of a compiled kernel, from its cubin."""
    from triton.backends.nvidia import __file__ as nvidia

    usage = {"shared": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps,
             "num_stages": kernel.metadata.num_stages}
    cuobjdump = Path(nvidia).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    for key, name in (("REG", "registers"), ("STACK", "stack")):
        found = re.search(rf"\b{key}:(\d+)", out)
        usage[name] = int(found.group(1)) if found else None
    return usage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100 / H200)")
    parser.add_argument("--json", type=Path, help="write the per-kernel report here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    compiled = install(args.arch)
    report, failures = [], []
    for preset in PRESETS:
        for dtype in DTYPES:
            start = len(compiled)
            try:
                exercise(preset, dtype)
            except Exception as e:  # noqa: BLE001 - a kernel that does not compile is the finding, reported below
                failures.append(f"{preset} {dtype}: {type(e).__name__}: {str(e).strip()[:2000]}")
            for name, kernel in compiled[start:]:
                usage = resource_usage(kernel)
                report.append({"preset": preset, "dtype": str(dtype).removeprefix("torch."), "kernel": name, **usage})
                if usage["shared"] > SHARED_LIMIT:
                    failures.append(f"{preset} {dtype} {name}: {usage['shared']} bytes of shared memory > {SHARED_LIMIT}")
    for row in report:
        print(f"{row['preset']:12} {row['dtype']:9} {row['kernel']:28} regs {row['registers']!s:>4} "
              f"stack {row['stack']!s:>5} shared {row['shared']:>6} warps {row['num_warps']} stages {row['num_stages']}")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "kernels": report, "failures": failures}, indent=1))
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
