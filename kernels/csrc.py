"""The CUDA C++ ops of csrc/, JIT-built with torch.utils.cpp_extension on first use (see csrc/README.md).

`load_sampling_op()` builds csrc/sampling.{cu,cpp} for the current device's compute capability into the user
cache (once per torch / CUDA / architecture; later processes load the built module) and returns the module, with
`sample` and `kept_mask`. It returns None where CUDA is unavailable or the build fails, and `sampling_op_error()`
then says why: callers fall back to the torch sampler. Nothing is built or imported at import time.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

from tandem.kernels import env

CSRC = Path(__file__).resolve().parent.parent / "csrc"
_sampling_error: str | None = None


def sampling_op_error() -> str | None:
    """Why `load_sampling_op()` returned None (None before the first call and after a successful one)."""
    return _sampling_error


@functools.cache
def load_sampling_op() -> ModuleType | None:
    """The sampling extension (see csrc/sampling.h for its semantics), built on the first call; None if it cannot be."""
    global _sampling_error
    if not torch.cuda.is_available():
        _sampling_error = f"CUDA is not available (torch {torch.__version__})"
        return None
    major, minor = torch.cuda.get_device_capability()
    if major < 8:  # __reduce_add_sync
        _sampling_error = f"needs compute capability 8.0 or later, the device has {major}.{minor}"
        return None
    arch = f"{major}{minor}"
    build = env.cache_dir() / "torch_extensions" / f"sampling-torch{torch.__version__}-cuda{torch.version.cuda}-sm{arch}"
    try:
        from torch.utils.cpp_extension import load

        build.mkdir(parents=True, exist_ok=True)
        return load(
            name="tandem_sampling",
            sources=[str(CSRC / "sampling.cpp"), str(CSRC / "sampling.cu")],
            build_directory=str(build),
            extra_cflags=["-O3"],
            # An explicit -gencode: the device's own architecture only, whatever TORCH_CUDA_ARCH_LIST says.
            extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
        )
    except Exception as e:  # a missing nvcc or ninja, a compile error: the torch sampler still works
        _sampling_error = f"building csrc/sampling failed: {type(e).__name__}: {e}"
        return None
