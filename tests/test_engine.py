"""The Engine's request handling: stops, streaming, limits, bad input, and that it stays usable afterwards."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from tandem.models.errors import InputError
from tandem.runtime import Engine, SamplingParams
from tandem.runtime.kv_cache import Sequence

from conftest import random_image, wait_for

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_2b) -> Engine:
    return Engine.from_pretrained(tiny_2b, device="cpu", dtype="float32", kv_cache_tokens=4096)


@pytest.fixture(scope="module")
def messages():
    image = random_image(240, 300, seed=5)
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}]


def test_generate_reports_counts_and_timings(engine, messages):
    out = engine.generate(messages, GREEDY)
    t = out.timings
    assert len(out.token_ids) == 12 and out.finish_reason == "length"
    assert t.output_tokens == 12 and t.image_tokens == (256 // 16) * (288 // 16) // 4  # 240x300 resizes to 256x288
    assert t.prompt_tokens == len(engine.prepare(messages).token_ids)
    assert t.vision_s > 0 and t.prefill_s > 0 and t.decode_s > 0
    assert out.text == engine.tokenizer.decode(out.token_ids)


def test_stream_concatenates_to_generate_text(engine, messages):
    assert "".join(engine.stream(messages, GREEDY)) == engine.generate(messages, GREEDY).text
    assert engine.pool.pages_in_use == 0


def test_stop_token_ends_generation_and_is_not_in_the_text(engine, messages):
    free = engine.generate(messages, GREEDY).token_ids
    stop = free[4]
    first = free.index(stop)
    out = engine.generate(messages, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop,)))
    assert out.token_ids == free[: first + 1]
    assert out.finish_reason == "stop"
    assert out.text == engine.tokenizer.decode(free[:first])
    assert "".join(engine.stream(messages, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop,)))) == out.text


def test_seeded_sampling_is_reproducible(engine, messages):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, top_k=50, seed=123)
    assert engine.generate(messages, params).token_ids == engine.generate(messages, params).token_ids


def test_default_sampling_comes_from_generation_config(engine):
    # The tiny checkpoint's generation_config.json says what the real Qwen3-VL's does.
    d = engine.sampling_defaults
    assert (d.temperature, d.top_p, d.top_k) == (0.7, 0.8, 20)
    assert engine.eos_ids == (151645, 151643)


def test_a_prepared_prompt_submits_as_its_messages_do(engine, messages):
    prompt = engine.prepare(messages, max_tokens=12)
    assert engine.submit(prompt, GREEDY).result().token_ids == engine.generate(messages, GREEDY).token_ids
    with pytest.raises(InputError, match="already holds its token ids and images"):
        engine.submit(prompt, GREEDY, images=[random_image(8, 8, 0)])
    limit = engine.model.config.text.max_position_embeddings
    with pytest.raises(InputError, match="exceeds the model's context"):
        engine.submit(prompt, SamplingParams(max_tokens=limit, temperature=0.0))
    assert engine.pool.pages_in_use == 0


def test_too_long_for_the_model_context_is_refused_before_any_work(engine, messages):
    limit = engine.model.config.text.max_position_embeddings
    with pytest.raises(InputError, match=rf"= {limit + 86} tokens exceeds the model's context of {limit} tokens"):
        engine.generate(messages, SamplingParams(max_tokens=limit, temperature=0.0))
    assert engine.pool.pages_in_use == 0


def test_too_long_for_the_cache_is_refused_before_any_work(tiny_2b, messages):
    small = Engine.from_pretrained(tiny_2b, device="cpu", dtype="float32", kv_cache_tokens=128)
    needed = len(small.prepare(messages).token_ids) + 200
    pages = -(-needed // small.pool.page_size)
    with pytest.raises(InputError, match=rf"needs {pages * 16} tokens of KV cache \({pages} pages of 16\), more than "
                                         r"the cache holds \(capacity 128 tokens"):
        small.generate(messages, SamplingParams(max_tokens=200, temperature=0.0))
    assert small.pool.pages_in_use == 0
    assert len(small.generate([{"role": "user", "content": "hi"}], GREEDY).token_ids) == 12


def test_a_request_that_fits_only_later_waits_for_its_pages(engine):
    """Pages held elsewhere (here a sequence that keeps all but two) make a request that needs more wait in the
    queue, not fail; it runs as soon as they come back, given back from another thread with nothing else posted
    (the pool wakes the engine's loop)."""
    hog = Sequence(engine.pool)
    hog.reserve((engine.pool.free_pages - 2) * engine.pool.page_size)
    try:
        handle = engine.submit([{"role": "user", "content": "x " * 40}], GREEDY)
        time.sleep(0.3)
        assert not handle.done and engine.scheduler.waiting
    finally:
        hog.release()
    assert len(handle.result(timeout=30).token_ids) == 12
    assert engine.pool.pages_in_use == 0


def test_abandoned_stream_releases_its_pages(engine, messages):
    stream = engine.stream(messages, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    next(stream)
    assert engine.pool.pages_in_use > 0
    stream.close()
    assert wait_for(lambda: engine.pool.pages_in_use == 0)


def test_a_discard_cancelled_meanwhile_waits_for_the_end_then_raises_the_cancel(engine, messages):
    """discard_async waits for the aborted request's end whatever cancels its task meanwhile (a sequence handed
    over before the abort would otherwise be lost), then raises the cancellation instead of swallowing it. The
    engine's loop is held inside the request's prefill (a hook on the model) while the task is cancelled."""
    entered, go = threading.Event(), threading.Event()
    hook = engine.model.register_forward_pre_hook(lambda *_: (entered.set(), go.wait(30)) and None)

    async def run():
        handle = engine.submit(messages, GREEDY)
        assert await asyncio.to_thread(entered.wait, 30)
        task = asyncio.ensure_future(handle.discard_async())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done() and not handle.done  # the abort waits for the step the loop is in
        go.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert handle.done

    try:
        asyncio.run(run())
    finally:
        go.set()
        hook.remove()
    assert wait_for(lambda: engine.pool.pages_in_use == 0)
    assert len(engine.generate(messages, GREEDY).token_ids) == 12


def test_the_callers_code_between_streamed_pieces_is_not_in_inference_mode(engine, messages):
    for piece in engine.stream(messages, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)):
        assert not torch.is_inference_mode_enabled()
        assert torch.ones(2, requires_grad=True).sum().requires_grad  # autograd works in the loop body


def test_a_second_generation_during_a_stream_joins_it_and_both_are_unchanged(engine, messages):
    """A generation started while a stream is half read joins its decode batch: each gives the reply it gives
    alone."""
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    alone = engine.generate(messages, params).text
    other_alone = engine.generate(prompt_token_ids=[1, 2, 3], sampling=params).token_ids
    stream = engine.stream(messages, params)
    first = next(stream)
    assert engine.generate(prompt_token_ids=[1, 2, 3], sampling=params).token_ids == other_alone
    assert first + "".join(stream) == alone
    assert engine.pool.pages_in_use == 0


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(prompt_token_ids=[]), r"prompt_token_ids is empty"),
    (dict(prompt_token_ids=[1, 2, 999999]), r"prompt_token_ids\[2\] = 999999 is not a token id"),
    (dict(prompt_token_ids=[1, 151655, 2], images=[]), r"image"),
    (dict(), r"either messages or prompt_token_ids"),
])
def test_bad_requests_are_clear_errors_and_the_engine_stays_usable(engine, kwargs, pattern):
    with pytest.raises(InputError, match=pattern):
        engine.generate(sampling=GREEDY, **kwargs)
    assert engine.pool.pages_in_use == 0
    assert len(engine.generate([{"role": "user", "content": "hello"}], GREEDY).token_ids) == 12


def test_missing_image_file_names_the_path(engine, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(InputError, match="nope.png"):
        engine.generate([{"role": "user", "content": [{"type": "image", "image": str(missing)}]}], GREEDY)
    assert len(engine.generate([{"role": "user", "content": "hello"}], GREEDY).token_ids) == 12


def test_unsupported_dtype(tiny_2b):
    with pytest.raises(InputError, match=r"dtype 'int8' is not supported"):
        Engine.from_pretrained(tiny_2b, device="cpu", dtype="int8")


def test_unknown_kernel_backend(tiny_2b):
    with pytest.raises(InputError, match=r"kernel_backend 'cuda' is not one of auto, torch, triton"):
        Engine.from_pretrained(tiny_2b, device="cpu", kernel_backend="cuda")


@pytest.mark.parametrize("lag", [0, 1])
def test_reading_the_tokens_a_step_behind_changes_nothing_but_one_step(engine, messages, lag):
    """The host reads each step's tokens `read_lag` steps behind the device (1 on CUDA, so the device never waits
    for the host): the reply is the same, and at most that many steps run past the stop."""
    free = engine.generate(messages, GREEDY).token_ids
    sampling = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(free[5],))
    stop_at = free.index(free[5]) + 1  # the reply ends at the first occurrence of the stop id
    engine.read_lag = lag
    try:
        out = engine.generate(messages, sampling)
        assert (out.token_ids, out.finish_reason) == (free[:stop_at], "stop")
        assert out.timings.output_tokens == stop_at
        assert out.timings.decode_steps == stop_at - 1 + lag  # the steps the reply needed, and `lag` past its stop
        assert engine.generate(messages, GREEDY).token_ids == free
        assert "".join(engine.stream(messages, sampling)) == engine.tokenizer.decode(free[: stop_at - 1])
        assert engine.generate(messages, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
                               ).timings.decode_steps == 3  # never a step past max_tokens
    finally:
        engine.read_lag = 0
    assert engine.pool.pages_in_use == 0
