"""The errors Tandem raises for bad input. Each message names the file, tensor, shape or token at fault."""

from __future__ import annotations


class TandemError(ValueError):
    """Base class: bad input that the caller can fix. The runtime stays usable after one."""


class CheckpointError(TandemError):
    """A checkpoint folder that cannot be loaded: config, safetensors files, tokenizer or chat template."""


class InputError(TandemError):
    """A request that cannot be served: an unreadable image, a malformed message, a prompt too long for the cache."""
