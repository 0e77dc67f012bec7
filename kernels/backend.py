"""Which implementation runs each op: the torch reference, the Triton kernel, or flash-attn.

TANDEM_KERNEL_BACKEND=torch|triton|auto (default auto) chooses process-wide; `use_backend(name)` overrides it for
the calls made inside (each Engine wraps its forward passes in one). auto runs Triton on CUDA tensors (flash-attn
instead for the ops that have a flash path, where it is installed) and the torch reference on anything else.
Triton on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter, which the tests use).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from tandem.kernels import env

BACKENDS = ("auto", "torch", "triton")
_override: ContextVar[str | None] = ContextVar("tandem_kernel_backend", default=None)


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not one of {', '.join(BACKENDS)}")
    return name


@contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the enclosed ops with `name` (None: keep TANDEM_KERNEL_BACKEND / auto)."""
    token = _override.set(None if name is None else check_backend(name))
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend() -> str:
    return _override.get() or check_backend(env.kernel_backend())


def implementation(device: torch.device, has_flash: bool = False) -> str:
    """'torch', 'triton' or 'flash' for an op on `device`."""
    name = requested_backend()
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        return "flash" if has_flash and flash_attn_available() else "triton"
    if name == "triton" and device.type != "cuda" and not env.triton_interpreter():
        raise ValueError("the triton kernel backend needs CUDA tensors, or TRITON_INTERPRET=1 to run on the CPU")
    return name


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def dispatch(reference: Callable, triton: str, flash: str | None = None) -> Callable:
    """The public op: `reference` (the spec, and the CPU path) or the kernel at "module:function", imported on
    first use so that CPU-only users never import Triton. The first argument's device decides."""

    @functools.wraps(reference)
    def op(*args, **kwargs):
        chosen = implementation(args[0].device, has_flash=flash is not None)
        if chosen == "torch":
            return reference(*args, **kwargs)
        return _load(flash if chosen == "flash" else triton)(*args, **kwargs)

    return op


@functools.cache
def _load(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
