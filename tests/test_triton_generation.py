"""End to end: the Triton kernels generate what the torch references do, token for token.

On a CUDA machine the kernels run compiled (both tiny models, 32 tokens, two images); elsewhere under Triton's CPU
interpreter (TRITON_INTERPRET=1, set by conftest), which is slow, so one model, one image and 8 tokens.
"""

from __future__ import annotations

import os

import pytest
import torch

from tandem.runtime import Engine, SamplingParams

from conftest import random_image

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or Triton's CPU interpreter")


@pytest.mark.parametrize("checkpoint", ["tiny_2b", "tiny_8b"] if CUDA else ["tiny_8b"])
def test_triton_backend_generates_the_torch_backends_tokens(checkpoint, request):
    sizes = [(300, 250), (200, 420)] if CUDA else [(256, 320)]
    images = [{"type": "image", "image": random_image(h, w, seed=h + w)} for h, w in sizes]
    messages = [{"role": "user", "content": images + [{"type": "text", "text": "What is in this image?"}]}]
    greedy = SamplingParams(max_tokens=32 if CUDA else 8, temperature=0.0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        engine = Engine.from_pretrained(request.getfixturevalue(checkpoint), device="cuda" if CUDA else "cpu",
                                        dtype="float32", kv_cache_tokens=4096, kernel_backend=backend)
        tokens[backend] = engine.generate(messages, greedy).token_ids
    assert tokens["triton"] == tokens["torch"]
