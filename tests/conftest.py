"""Shared fixtures: tiny random Qwen3-VL checkpoints built with transformers, and seeded test images."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only in Triton's interpreter, which must be on before any kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tandem.models.tiny import build_random_checkpoint

# A shell without job control starts a background command with SIGINT ignored, and every process it starts
# inherits that: the tests that interrupt, and the servers they stop with SIGINT, need Python's own handler.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Tests of Triton on CPU tensors run only under the interpreter; on a CUDA machine their `gpu` twins run compiled.
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                                       reason="needs Triton's CPU interpreter (TRITON_INTERPRET=1, no CUDA)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def sigint_left_as_found():
    """Every test leaves Ctrl-C as it found it: Python's handler in place and SIGINT not blocked. A leak would make
    later tests that interrupt (tests/test_interrupts.py) or stop servers with SIGINT fail far from its cause."""
    yield
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, signal.getsignal(signal.SIGINT)
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, []), "SIGINT is left blocked"


@pytest.fixture
def no_tf32():
    """float32 matmuls and convolutions in full precision on CUDA while the test runs (cuDNN's default TF32 puts
    transformers' Conv3d patch embedding ~3e-4 off in a float32 comparison); the previous settings after."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.fixture(scope="session")
def tiny_2b(tmp_path_factory) -> Path:
    """2B-like: tied lm_head, deepstack after vision blocks 1..3."""
    return build_random_checkpoint(tmp_path_factory.mktemp("tiny-2b"), "2b-like", seed=0)


@pytest.fixture(scope="session")
def tiny_8b(tmp_path_factory) -> Path:
    """8B-like: untied lm_head, vision head_dim 36 (not a power of two)."""
    return build_random_checkpoint(tmp_path_factory.mktemp("tiny-8b"), "8b-like", seed=1)


def wait_for(condition, timeout: float = 10.0) -> bool:
    """Poll `condition()` until it holds (True) or `timeout` seconds pass (False): for what an engine's loop thread
    does after a call returns, such as freeing an aborted request's pages at its next step."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    """A seeded HWC uint8 image with structure (a gradient plus noise), so resampling is not trivial."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8)
