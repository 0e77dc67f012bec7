"""The one place the process environment is read: every setting Tandem takes from it, with its default.

    TANDEM_KERNEL_BACKEND  auto (default) | torch | triton   which implementation each op runs (kernels.backend)
    TANDEM_CUDA_GRAPHS     1 (default) | 0                   replay decode steps as CUDA graphs (runtime.decode)
    TRITON_INTERPRET       1                                 Triton's CPU interpreter (Triton reads it; we check it)
    XDG_CACHE_HOME         ~/.cache (default)                where the tandem/ cache folder lives

Each is read when it is used, not at import, so a caller (or a test) may set it at any time before.
"""

from __future__ import annotations

import os
from pathlib import Path

_FALSE = ("0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")


def kernel_backend() -> str:
    return os.environ.get("TANDEM_KERNEL_BACKEND", "auto")


def cuda_graphs() -> bool:
    return _flag("TANDEM_CUDA_GRAPHS", default=True)


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/tandem (~/.cache/tandem): built tiny checkpoints and compiled extensions."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tandem"


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a switch: use 1 or 0")
