"""Ctrl-C at any line of the code that takes or gives back KV pages or the decode runner leaves nothing behind.

A tracer counts the lines executed inside those functions and, after the n-th, delivers a real SIGINT at the next
Python function call (where CPython itself would first notice a Ctrl-C), for every n a request reaches: the
interrupt then arrives as a user's would, held back where the code holds it back. After each, no page is in use,
the decode runner is free, and the engine (or pair) still answers.
"""

from __future__ import annotations

import signal
import sys
import threading

import pytest
import torch

from tandem.runtime import Budget, Engine, SamplingParams, Tandem
from tandem.runtime.decode import DecodeRunner
from tandem.runtime.kv_cache import PagePool, Sequence, release_all

from conftest import random_image

KV_CODE = [PagePool.allocate, PagePool.release, PagePool.retain, Sequence.append_slots, Sequence.reserve,
           Sequence.fork_from, Sequence.release, Sequence._copy_last_page, release_all,
           DecodeRunner.begin, DecodeRunner._begin, DecodeRunner.end]
ENGINE_CODE = [Engine.generate, Engine._generate, Engine._token_chunks, Engine.decode_batch, Engine.prompt_logits]
PAIR_CODE = [Tandem.answer, Tandem._run_policy, Tandem._stage, Tandem._prefix, Tandem._transfer]


class Interrupter:
    """sys.settrace hook: counts the lines executed inside `functions`; after line `at` (never if 0), sends SIGINT
    at the next call of any Python function."""

    def __init__(self, functions, at: int = 0):
        self.codes = {f.__code__ for f in functions}
        self.at, self.lines, self.pending = at, 0, False

    def __call__(self, frame, event, arg):  # every call event
        if self.pending:
            self.pending = False
            signal.raise_signal(signal.SIGINT)
        return self._line if frame.f_code in self.codes else None

    def _line(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            self.pending = self.pending or self.lines == self.at
        return self._line

    def run(self, call):
        """call() under the tracer -> "done" or "interrupted"."""
        sys.settrace(self)
        try:
            call()
            return "done"
        except KeyboardInterrupt:
            return "interrupted"
        finally:
            sys.settrace(None)


def interrupt_everywhere(call, functions, check, every_nth_check_call=7):
    """Run `call` once per line it executes inside `functions`, interrupted at that line; `check()` after each."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    counter = Interrupter(functions)
    assert counter.run(call) == "done"
    outcomes = []
    for at in range(1, counter.lines + 1):
        outcomes.append(Interrupter(functions, at).run(call))
        check(full=at % every_nth_check_call == 0 or at == counter.lines)
    assert outcomes.count("interrupted") >= counter.lines // 2  # the interrupts really arrived
    return counter.lines


@pytest.fixture(scope="module")
def engine(tiny_2b):
    return Engine.from_pretrained(tiny_2b, device="cpu", dtype="float32", kv_cache_tokens=1024, page_size=4)


def test_ctrl_c_anywhere_in_a_batch_leaves_no_page_and_a_free_runner(engine):
    messages = [[{"role": "user", "content": "Count to three."}], [{"role": "user", "content": "Say hello."}]]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in engine.generate_batch(messages, params)]

    def check(full: bool) -> None:
        assert engine.pool.pages_in_use == 0
        assert not engine.decoder.busy
        if full:
            assert [o.token_ids for o in engine.generate_batch(messages, params)] == expected

    lines = interrupt_everywhere(lambda: engine.generate_batch(messages, params), KV_CODE + ENGINE_CODE, check)
    assert lines > 50


def test_ctrl_c_anywhere_in_a_stream_leaves_nothing_behind(engine):
    messages = [{"role": "user", "content": "Tell me a story."}]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    expected = "".join(engine.stream(messages, params))

    def check(full: bool) -> None:
        assert engine.pool.pages_in_use == 0 and not engine.decoder.busy
        if full:
            assert "".join(engine.stream(messages, params)) == expected

    interrupt_everywhere(lambda: "".join(engine.stream(messages, params)), KV_CODE + ENGINE_CODE, check)


def test_ctrl_c_anywhere_in_page_bookkeeping_leaves_no_page_behind():
    """Sharing a prefix, copying its shared last page on write, releasing: interrupted at every line of the page
    bookkeeping. Sequences dropped mid-way (their `finally` never ran) come back at the pool's next allocation."""
    from tandem.models.config import TextConfig

    config = TextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                        head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4, mrope_section=(1, 0, 1),
                        max_position_embeddings=64)
    pool = PagePool(config, num_pages=8, page_size=4, device=torch.device("cpu"), dtype=torch.float32)

    def scenario():
        parent, child = Sequence(pool), Sequence(pool)
        try:
            parent.append_slots(6)
            child.fork_from(parent)
            child.append_slots(3)  # writes into the shared, partly filled last page: copied first
            assert child.pages[0] == parent.pages[0] and child.pages[1] != parent.pages[1]
        finally:
            release_all([parent, child])

    def check(full: bool) -> None:
        assert pool.pages_in_use == 0 and sorted(pool._free) == list(range(8))
        if full:
            scenario()

    interrupt_everywhere(scenario, KV_CODE, check, every_nth_check_call=1)


def test_ctrl_c_anywhere_in_a_pair_request_leaves_nothing_behind(tiny_2b):
    """The transfer policy (two prefixes, forks, key mass, the gather of the reasoning ids), interrupted at every
    line of the pipeline's own code; the engines' code below it is covered by the tests above."""
    large, small = (Engine.from_pretrained(tiny_2b, device="cpu", dtype="float32", kv_cache_tokens=2048, page_size=4)
                    for _ in range(2))
    pair = Tandem(large, small, budget=Budget(short_tokens=2, reason_tokens=3))
    image = random_image(64, 64, seed=1)
    expected = pair.answer(image, "What is it?", policy="transfer", keep="attention").answer

    def check(full: bool) -> None:
        for e in (large, small):
            assert e.pool.pages_in_use == 0 and not e.decoder.busy
        if full:
            assert pair.answer(image, "What is it?", policy="transfer", keep="attention").answer == expected

    interrupt_everywhere(lambda: pair.answer(image, "What is it?", policy="transfer", keep="attention"),
                         PAIR_CODE, check, every_nth_check_call=10)


def test_two_threads_cannot_share_the_decode_runner(engine):
    """The busy check is a lock: of two threads starting a generation at the same moment, one gets an error."""
    from tandem.models.errors import InputError

    runner = engine.decoder
    barrier = threading.Barrier(2)
    results = []

    def start(seqs):
        barrier.wait()
        try:
            runner.begin(seqs, [0], 1)
            results.append("began")
        except InputError as e:
            results.append(str(e))

    first, second = [Sequence(engine.pool)], [Sequence(engine.pool)]
    for seqs in (first, second):
        seqs[0].append_slots(2)
    threads = [threading.Thread(target=start, args=(s,)) for s in (first, second)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r == "began" for r in results) == [False, True]
        assert any("already decoding another generation" in r for r in results)
    finally:
        runner.end(first)
        runner.end(second)
        release_all(first + second)
    assert not runner.busy and engine.pool.pages_in_use == 0
