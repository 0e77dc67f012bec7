"""End to end: the Triton kernels (under TRITON_INTERPRET=1 on the CPU) generate what the torch references do."""

from __future__ import annotations

import os

import pytest

from tandem.runtime import Engine, SamplingParams

from conftest import random_image

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's CPU interpreter")


def test_triton_backend_generates_the_torch_backends_tokens(tiny_8b):
    messages = [{"role": "user", "content": [{"type": "image", "image": random_image(256, 320, seed=2)},
                                             {"type": "text", "text": "What is in this image?"}]}]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        engine = Engine.from_pretrained(tiny_8b, device="cpu", dtype="float32", kv_cache_tokens=1024,
                                        kernel_backend=backend)
        tokens[backend] = engine.generate(messages, greedy).token_ids
    assert tokens["triton"] == tokens["torch"]
