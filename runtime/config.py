"""EngineConfig: every setting of an engine, in one frozen dataclass, checked where it is written.

The process environment is read in one place only (tandem.kernels.env); a field left as None here takes its
value from there, or from the device, when the engine is built.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

import torch

from tandem.kernels import BACKENDS
from tandem.models.errors import InputError

DEFAULT_PAGE_SIZE = 16
CPU_KV_TOKENS = 65536  # the CPU's default cache: room for one long request; the tests' tiny models need ~1.5 KB a token
CUDA_KV_FRACTION = 0.85  # of the device memory the weights leave free; the rest is headroom for activations


@dataclass(frozen=True)
class EngineConfig:
    """How an engine runs. The CLI flag of each field is its name with dashes (--kv-cache-tokens ...)."""

    kv_cache_tokens: int | None = None  # KV cache size; None: CUDA_KV_FRACTION of free memory, or CPU_KV_TOKENS
    page_size: int = DEFAULT_PAGE_SIZE  # tokens per KV page
    kernel_backend: str | None = None  # "auto", "torch" or "triton"; None: TANDEM_KERNEL_BACKEND, else auto
    cuda_graphs: bool | None = None  # replay decode steps as CUDA graphs; None: TANDEM_CUDA_GRAPHS (default on)
    max_running: int = 64  # sequences decoded together at most; more wait in the queue
    max_waiting: int = 1024  # requests queued at most; past it, submit() raises QueueFullError
    prefill_chunk_tokens: int = 2048  # prompt tokens prefilled per step: what a long prompt may stall decodes by

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("kernel_backend", "cuda_graphs"):
                continue
            if value is None and f.name == "kv_cache_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise InputError(f"{f.name} must be a positive integer, got {value!r}")
        if self.kernel_backend is not None and self.kernel_backend not in BACKENDS:
            raise InputError(f"kernel_backend {self.kernel_backend!r} is not one of {', '.join(BACKENDS)}")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise InputError(f"cuda_graphs must be True, False or None, got {self.cuda_graphs!r}")


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: CUDA when available by default. Refuses, in one line, a name torch does not know and
    a CUDA device this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device {device!r} is not a device name: use cuda, cuda:N or cpu") from e
    if parsed.type not in ("cuda", "cpu"):
        raise InputError(f"device {device!r}: Tandem runs on cuda or cpu")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise InputError(f"device {device!r}: torch sees no CUDA device (torch {torch.__version__}, {build}); "
                             "run on the CPU instead (device='cpu', --device cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise InputError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")


def default_kv_tokens(device: torch.device, bytes_per_token: int, max_positions: int, weights: int = 0) -> int:
    """KV-cache tokens when none are asked for. CUDA: CUDA_KV_FRACTION of the memory still free after the weights
    (`weights`: bytes of weights not loaded yet, to leave for them). CPU: CPU_KV_TOKENS."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if weights >= free:
            raise InputError(f"the weights need {weights} bytes, more than the {free} free on {device}")
        return int((free - weights) * CUDA_KV_FRACTION) // bytes_per_token
    return min(CPU_KV_TOKENS, max_positions)
