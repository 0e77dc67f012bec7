"""Many requests in flight on one engine, and many pair requests on two: continuous batching must change nothing.

Every request gets exactly the tokens it gets alone (greedy, and seeded sampling: a seeded request's draws do not
depend on its batch), whatever joins or leaves the batch around it; an aborted request leaves at the next step
with its pages; limits and failures stay with the request they concern. After every test no page is in use.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
import torch

from tandem.models.errors import InputError
from tandem.runtime import Budget, Engine, QueueFullError, RequestAborted, SamplingParams, Tandem

from conftest import random_image, wait_for


def image_message(question: str, h: int, w: int, seed: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": random_image(h, w, seed)},
                                         {"type": "text", "text": question}]}]


# 16 requests: text and images, short and long prompts, different max_tokens, stop ids, greedy and seeded sampling.
MIXED = [
    ("Tell me about the sea.", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)),
    (image_message("What is this?", 120, 160, 1), SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)),
    ("Count from one to twenty, slowly and carefully, one number per line.",
     SamplingParams(max_tokens=20, temperature=0.8, top_k=20, top_p=0.9, seed=3, ignore_eos=True)),
    ("hi", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)),
    (image_message("Describe the colours.", 200, 96, 2), SamplingParams(max_tokens=15, temperature=1.0, seed=9,
                                                                        ignore_eos=True)),
    ("Write a haiku about autumn leaves.", SamplingParams(max_tokens=9, temperature=0.7, top_p=0.8, seed=4,
                                                          ignore_eos=True)),
    ("2 + 2 =", SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)),
    (image_message("Is there text?", 64, 64, 3), SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True)),
    ("Name three rivers.", SamplingParams(max_tokens=14, temperature=1.2, top_k=5, seed=5, ignore_eos=True)),
    ("Explain gravity to a child in two sentences, please, with an example.",
     SamplingParams(max_tokens=18, temperature=0.0, ignore_eos=True)),
    ("Hello!", SamplingParams(max_tokens=6, temperature=0.9, top_p=0.95, seed=6, ignore_eos=True)),
    (image_message("What shape?", 300, 120, 4), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)),
    ("Say something.", SamplingParams(max_tokens=16, temperature=0.6, top_k=40, top_p=0.9, seed=7, ignore_eos=True)),
    ("The end.", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)),
    (image_message("Count the objects.", 90, 200, 5), SamplingParams(max_tokens=13, temperature=1.0, top_p=0.5,
                                                                      seed=8, ignore_eos=True)),
    ("Why?", SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)),
]


@pytest.fixture(scope="module")
def engine(tiny_8b) -> Engine:
    # A small prefill chunk and running limit: requests join over several steps and some wait for a place.
    return Engine.from_pretrained(tiny_8b, device="cpu", dtype="float32", kv_cache_tokens=8192, max_running=6,
                                  prefill_chunk_tokens=160)


@pytest.fixture(scope="module")
def alone(engine) -> list[list[int]]:
    return [engine.generate(messages, params).token_ids for messages, params in MIXED]


@pytest.fixture(scope="module")
def stopping(alone) -> list[SamplingParams]:
    """Each greedy request stopped by a stop id it meets mid-way: rows end at different steps."""
    out = []
    for (_, params), tokens in zip(MIXED, alone):
        if params.temperature == 0 and len(tokens) > 4:
            params = SamplingParams(max_tokens=params.max_tokens, temperature=0.0, stop_token_ids=(tokens[3],),
                                    ignore_eos=True)
        out.append(params)
    return out


def test_sixteen_requests_from_several_threads_each_get_their_own_tokens(engine, alone):
    results: dict[int, list[int]] = {}

    def submit(indices):
        handles = [(i, engine.submit(MIXED[i][0], MIXED[i][1])) for i in indices]
        for i, handle in handles:
            results[i] = handle.result(timeout=120).token_ids

    steps = engine.stats.decode_steps
    threads = [threading.Thread(target=submit, args=(range(k, 16, 4),)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(16)] == alone
    assert engine.stats.decode_steps - steps < sum(len(t) - 1 for t in alone) / 2  # they really shared steps
    assert engine.pool.pages_in_use == 0


def test_rows_that_stop_at_different_steps_leave_the_others_unchanged(engine, stopping):
    expected = [engine.generate(messages, params).token_ids for (messages, _), params in zip(MIXED, stopping)]
    outs = engine.generate_batch([m for m, _ in MIXED], stopping)  # one SamplingParams per request
    assert [o.token_ids for o in outs] == expected
    assert any(o.finish_reason == "stop" for o in outs) and any(o.finish_reason == "length" for o in outs)
    assert engine.pool.pages_in_use == 0


def test_an_aborted_request_leaves_at_the_next_step_and_the_others_finish_unchanged(engine, alone):
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    victim = engine.submit("Tell me a very long story.", long)
    others = [engine.submit(messages, params) for messages, params in MIXED[:6]]
    stream = victim.stream()
    next(stream)  # the victim is decoding
    held = engine.pool.pages_in_use
    victim.abort()
    with pytest.raises(RequestAborted):
        victim.result(timeout=30)
    assert [h.result(timeout=120).token_ids for h in others] == alone[:6]
    assert wait_for(lambda: engine.pool.pages_in_use == 0) and held > 0


def left_early(engine, steps_before: int, max_tokens: int) -> bool:
    """The engine is idle again, with no page held, and the request in flight left before its natural end."""
    return (wait_for(lambda: not engine.scheduler and engine.pool.pages_in_use == 0)
            and engine.stats.decode_steps - steps_before < max_tokens - 1)


def test_closing_or_dropping_a_stream_aborts_its_request(engine):
    params = SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True)
    steps = engine.stats.decode_steps
    stream = engine.stream("A long story, please.", params)
    next(stream)
    stream.close()
    assert left_early(engine, steps, params.max_tokens)
    steps = engine.stats.decode_steps
    stream = engine.stream("Another long story, please.", params)
    next(stream)
    del stream  # garbage: its finally aborts
    assert left_early(engine, steps, params.max_tokens)
    steps = engine.stats.decode_steps
    handle = engine.submit("And one more.", params)
    assert wait_for(lambda: engine.pool.pages_in_use > 0)  # admitted: the loop holds the request, not the handle
    del handle  # a dropped handle aborts too
    assert left_early(engine, steps, params.max_tokens)


def test_asyncio_calls_share_the_batch_and_cancelling_a_task_aborts(engine, alone):
    async def run():
        outs = await asyncio.gather(*(engine.generate_async(m, p) for m, p in MIXED[:8]))
        pieces = [piece async for piece in engine.stream_async(MIXED[0][0], MIXED[0][1])]
        steps = engine.stats.decode_steps
        task = asyncio.ensure_future(engine.generate_async("Long.", SamplingParams(max_tokens=4000, temperature=0.0,
                                                                                   ignore_eos=True)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return outs, "".join(pieces), steps

    outs, text, steps = asyncio.run(run())
    assert [o.token_ids for o in outs] == alone[:8]
    assert text == engine.tokenizer.decode(alone[0])
    assert left_early(engine, steps, 4000)


def test_the_queue_limit_refuses_at_submission(tiny_2b):
    engine = Engine.from_pretrained(tiny_2b, device="cpu", dtype="float32", kv_cache_tokens=512, max_waiting=2,
                                    max_running=1)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    handles = [engine.submit("one", params)]
    assert wait_for(lambda: engine.scheduler.decoding)  # running: the queue is empty again
    handles += [engine.submit("two", params), engine.submit("three", params)]
    with pytest.raises(QueueFullError, match=r"queue is full \(2 requests waiting, max_waiting\)"):
        engine.submit("four", params)
    for handle in handles:
        handle.abort()
    assert wait_for(lambda: not engine.scheduler and engine.pool.pages_in_use == 0)
    assert len(engine.generate("five", SamplingParams(max_tokens=2, temperature=0.0)).token_ids) <= 2


def test_a_failing_request_fails_alone(engine, alone, monkeypatch):
    """An exception in one request's prefill (here its images' encode) fails that request only; an exception in a
    decode step fails the batch it ran, and the engine goes on."""
    from tandem.runtime import engine as engine_module

    real = engine_module.encode

    def broken(model, images, *args):
        if images[0].shape[1] == 300:  # the image of MIXED[11]
            raise RuntimeError("the tower fell over")
        return real(model, images, *args)

    monkeypatch.setattr(engine_module, "encode", broken)
    handles = [engine.submit(m, p) for m, p in MIXED[8:14]]
    with pytest.raises(RuntimeError, match="the tower fell over"):
        handles[3].result(timeout=60)
    assert [h.result(timeout=120).token_ids for i, h in enumerate(handles) if i != 3] == \
        [t for i, t in enumerate(alone[8:14]) if i != 3]
    monkeypatch.undo()
    runner = engine.runner

    def failing_decode(batch):
        raise RuntimeError("a step failed")

    monkeypatch.setattr(runner, "decode", failing_decode)
    handle = engine.submit(*MIXED[0])
    with pytest.raises(RuntimeError, match="a step failed"):
        handle.result(timeout=60)
    monkeypatch.undo()
    assert wait_for(lambda: engine.pool.pages_in_use == 0)
    assert engine.generate(*MIXED[0]).token_ids == alone[0]


def test_a_request_that_can_never_fit_is_refused_and_one_that_fits_later_waits(tiny_2b):
    engine = Engine.from_pretrained(tiny_2b, device="cpu", dtype="float32", kv_cache_tokens=128)
    with pytest.raises(InputError, match=r"more than the cache holds \(capacity 128 tokens"):
        engine.submit("hi", SamplingParams(max_tokens=200, temperature=0.0))
    params = SamplingParams(max_tokens=90, temperature=0.0, ignore_eos=True)
    first, second = engine.submit("one", params), engine.submit("two", params)  # each fits, not both at once
    assert [len(h.result(timeout=60).token_ids) for h in (first, second)] == [90, 90]
    assert second.result().timings.queue_s > first.result().timings.queue_s
    assert engine.pool.pages_in_use == 0


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def libgomp_loaded() -> bool:
    return os.path.exists("/proc/self/maps") and "libgomp" in open("/proc/self/maps").read()


def settled_thread_count() -> int:
    """The process's thread count once it stays put for 0.1 s (a loop frees its team a moment after a reply)."""
    counts = [thread_count()]
    while len(counts) < 3 or len(set(counts[-3:])) > 1:
        time.sleep(0.05)
        counts.append(thread_count())
        assert len(counts) < 200, f"the thread count never settled: {counts[-10:]}"
    return counts[-1]


@pytest.mark.skipif(not libgomp_loaded() or torch.get_num_threads() < 2, reason="needs Linux, libgomp, 2 threads")
def test_idle_threads_hold_no_openmp_workers(tiny_2b):
    # While an idle OpenMP team lives, libgomp throttles the working one (see free_idle_cpu_workers): a submit
    # frees the caller's team, and a loop frees its own when it has nothing to do.
    engine = Engine.from_pretrained(tiny_2b, device="cpu", dtype="float32", kv_cache_tokens=1024)
    workers = torch.get_num_threads() - 1  # a team of n threads: the thread that made it and n - 1 workers
    x = torch.randn(512, 512)
    for loop_thread_starts in (1, 0):  # the first reply starts the loop thread
        (x @ x).softmax(-1)
        with_team = settled_thread_count()  # this thread's team lives
        engine.generate("hi", SamplingParams(max_tokens=2))
        assert settled_thread_count() == with_team - workers + loop_thread_starts  # no team anywhere
    engine.close()


# ---- the pair ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tiny_8b, tiny_2b) -> Tandem:
    engines = [Engine.from_pretrained(p, device="cpu", dtype="float32", kv_cache_tokens=16384, max_running=12)
               for p in (tiny_8b, tiny_2b)]
    return Tandem(*engines, budget=Budget(short_tokens=4, reason_tokens=12))


PAIR_REQUESTS = [(random_image(64 + 16 * (i % 5), 80 + 8 * (i % 3), seed=100 + i), f"What is in picture {i}?",
                  ("verify", "transfer")[i % 2], ("all", "attention")[(i // 2) % 2]) for i in range(32)]


def test_thirty_two_concurrent_pair_requests_equal_one_at_a_time(pair):
    one_at_a_time = [pair.answer(image, question, policy=policy, keep=keep)
                     for image, question, policy, keep in PAIR_REQUESTS]

    async def run():
        return await asyncio.gather(*(pair.answer_async(image, question, policy=policy, keep=keep)
                                      for image, question, policy, keep in PAIR_REQUESTS))

    steps = {name: e.stats.decode_steps for name, e in pair.engines.items()}
    concurrent = asyncio.run(run())
    for name, e in pair.engines.items():  # the stages of many requests shared their engine's steps
        one = sum(len(s.output_ids) - 1 for r in one_at_a_time for s in r.stages if s.model == name)
        assert e.stats.decode_steps - steps[name] < one / 2
    for a, b in zip(concurrent, one_at_a_time):
        assert [s.output_ids for s in a.stages] == [s.output_ids for s in b.stages]
        assert [s.kept_indices for s in a.stages] == [s.kept_indices for s in b.stages]
        assert a.answer == b.answer
    assert all(e.pool.pages_in_use == 0 for e in pair.engines.values())
