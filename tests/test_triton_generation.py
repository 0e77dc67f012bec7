"""End to end: the Triton kernels generate what the torch references do, token for token.

On a CUDA machine the kernels run compiled (both tiny models, 32 tokens, two images: the `gpu` test); without one,
under Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest), which is slow, so one model, one image and
8 tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.runtime import Engine, SamplingParams

from conftest import needs_interpreter, random_image


def tokens_by_backend(checkpoint: Path, device: str, sizes: list[tuple[int, int]], max_tokens: int) -> dict:
    images = [{"type": "image", "image": random_image(h, w, seed=h + w)} for h, w in sizes]
    messages = [{"role": "user", "content": images + [{"type": "text", "text": "What is in this image?"}]}]
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        engine = Engine.from_pretrained(checkpoint, device=device, dtype="float32", kv_cache_tokens=4096,
                                        kernel_backend=backend)
        tokens[backend] = engine.generate(messages, greedy).token_ids
    return tokens


@needs_interpreter
def test_triton_backend_generates_the_torch_backends_tokens_in_interpreter(tiny_8b):
    tokens = tokens_by_backend(tiny_8b, "cpu", [(256, 320)], 8)
    assert tokens["triton"] == tokens["torch"]


@pytest.mark.gpu
@pytest.mark.parametrize("checkpoint", ["tiny_2b", "tiny_8b"])
def test_triton_backend_generates_the_torch_backends_tokens_on_cuda(checkpoint, request):
    tokens = tokens_by_backend(request.getfixturevalue(checkpoint), "cuda", [(300, 250), (200, 420)], 32)
    assert tokens["triton"] == tokens["torch"]
