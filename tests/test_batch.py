"""Batched decoding: several requests decoded together, each step one token for every unfinished reply.

Padded to a power of two, a batch's extra rows write into the pool's scratch page: every real reply must be the one
it gets alone (and, for text prompts, the one transformers generates), whatever the batch size and stop points.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from tandem.models.errors import InputError
from tandem.runtime import Engine, SamplingParams

from conftest import needs_interpreter, random_image

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def image_message(question: str, h: int, w: int) -> list[dict]:
    content = [{"type": "image", "image": random_image(h, w, seed=h + w)}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def text_message(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


REQUESTS = [
    text_message("hello"),
    image_message("What is in this picture?", 240, 300),
    text_message("Write a long and detailed story about a lighthouse keeper and the sea."),
    image_message("Describe it.", 200, 420),
    text_message("2 + 2 = ?"),
]


@pytest.fixture(scope="module")
def engine(tiny_8b) -> Engine:
    return Engine.from_pretrained(tiny_8b, device="cpu", dtype="float32", kv_cache_tokens=8192)


@pytest.fixture(scope="module")
def alone(engine) -> list[list[int]]:
    return [engine.generate(r, GREEDY).token_ids for r in REQUESTS]


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_each_reply_is_the_one_it_gets_alone(engine, alone, size):
    """Batches of 1, 2, 3 (one padding row) and 5 (three padding rows), mixing image and text prompts of
    different lengths."""
    outs = engine.generate_batch(REQUESTS[:size], GREEDY)
    assert [o.token_ids for o in outs] == alone[:size]
    assert all(o.finish_reason == "length" and o.timings.output_tokens == 10 for o in outs)
    assert engine.pool.pages_in_use == 0


def test_text_replies_match_transformers_generate(engine, tiny_8b):
    reference = Qwen3VLForConditionalGeneration.from_pretrained(tiny_8b, dtype=torch.float32).eval()
    prompts = [engine.prepare(r) for r in (REQUESTS[0], REQUESTS[2], REQUESTS[4])]
    outs = engine.generate_batch(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt.token_ids])
        with torch.no_grad():
            ref = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                     min_new_tokens=10, do_sample=False, temperature=None, top_p=None, top_k=None)
        assert out.token_ids == ref[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("lag", [0, 1])
def test_replies_stop_at_their_own_stop_tokens(engine, alone, lag):
    """A stop token that each reply meets at a different step (or never): each reply ends at its first one, the
    others go on, and reading the tokens a step behind the device changes nothing."""
    stop = alone[1][3]
    params = SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(stop,), ignore_eos=True)
    expected = [engine.generate(r, params) for r in REQUESTS[:4]]
    assert expected[1].finish_reason == "stop" and len({len(e.token_ids) for e in expected}) > 1
    engine.read_lag = lag
    try:
        outs = engine.generate_batch(REQUESTS[:4], params)
    finally:
        engine.read_lag = 0
    for out, exp in zip(outs, expected):
        assert (out.token_ids, out.finish_reason, out.text) == (exp.token_ids, exp.finish_reason, exp.text)
        assert out.timings.output_tokens == len(exp.token_ids)
    assert engine.pool.pages_in_use == 0


@pytest.mark.parametrize("lag", [0, 1])
def test_key_mass_of_a_batch_is_each_requests_own(engine, alone, lag):
    """The key mass of each request decoded in a batch equals its mass decoded alone, also when the rows stop at
    different steps (the batch changes under them) and the host reads the tokens a step behind the device: a step
    that feeds a row its stop token, or runs after it, adds nothing to that row's mass."""
    prompts = [engine.prepare(r) for r in (REQUESTS[0], REQUESTS[1], REQUESTS[2])]
    params = engine.resolve(SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(alone[1][3],),
                                           ignore_eos=True))

    def decode(group):
        handles = [engine._submit(prompt, params, key_mass=True) for prompt in group]
        return [h.result() for h in handles]

    engine.read_lag = lag
    try:
        together = decode(prompts)
    finally:
        engine.read_lag = 0
    assert len(together[1].token_ids) == 4 and len({len(o.token_ids) for o in together}) > 1  # different stops
    for out, prompt in zip(together, prompts):
        (own,) = decode([prompt])
        assert out.token_ids == own.token_ids
        torch.testing.assert_close(out.key_mass, own.key_mass, rtol=1e-5, atol=1e-6)
        assert own.key_mass.sum() > 0
    assert engine.pool.pages_in_use == 0


def test_a_bad_request_refuses_the_whole_batch_before_any_work(engine, alone):
    steps = engine.stats.decode_steps
    with pytest.raises(InputError, match="nope.png"):
        engine.generate_batch([REQUESTS[0], [{"role": "user", "content": [{"type": "image", "image": "nope.png"}]}]])
    assert engine.stats.decode_steps == steps and engine.pool.pages_in_use == 0
    assert engine.generate_batch(REQUESTS[:2], GREEDY)[1].token_ids == alone[1]
    assert engine.generate_batch([], GREEDY) == []
    assert engine.pool.pages_in_use == 0


def test_requests_that_fit_one_at_a_time_wait_for_each_other(tiny_8b):
    small = Engine.from_pretrained(tiny_8b, device="cpu", dtype="float32", kv_cache_tokens=128)
    each_fits = SamplingParams(max_tokens=small.pool.capacity_tokens // 2, temperature=0.0, ignore_eos=True)
    outs = small.generate_batch([REQUESTS[0], REQUESTS[4]], each_fits)  # not both at once: the second waits
    assert [len(o.token_ids) for o in outs] == [each_fits.max_tokens] * 2
    assert outs[1].timings.queue_s > outs[0].timings.queue_s
    assert small.pool.pages_in_use == 0


def batch_tokens_by_backend(checkpoint: Path, device: str) -> dict:
    """The Triton kernels' and the torch references' tokens for a padded batch (3 requests in 4 rows)."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    requests = [text_message("hi"), image_message("What?", 64, 96), text_message("Count to ten, slowly.")]
    tokens = {}
    for backend in ("torch", "triton"):
        engine = Engine.from_pretrained(checkpoint, device=device, dtype="float32", kv_cache_tokens=1024,
                                        kernel_backend=backend)
        tokens[backend] = [o.token_ids for o in engine.generate_batch(requests, params)]
    return tokens


@needs_interpreter
def test_triton_batch_equals_torch_batch_in_interpreter(tiny_2b):
    tokens = batch_tokens_by_backend(tiny_2b, "cpu")
    assert tokens["triton"] == tokens["torch"]


@pytest.mark.gpu
def test_triton_batch_equals_torch_batch_on_cuda(tiny_2b):
    tokens = batch_tokens_by_backend(tiny_2b, "cuda")
    assert tokens["triton"] == tokens["torch"]
