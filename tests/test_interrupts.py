"""Ctrl-C at any line of the caller's side of a request leaves nothing behind.

Signals reach the main thread only: there a request is prepared, submitted and waited for, and a pair's flow runs
(asyncio), while the engine's loop does the device work in a thread of its own. A tracer counts the lines executed
inside the caller's code and, after the n-th, delivers a real SIGINT at the next Python function call (where
CPython itself would first notice a Ctrl-C), for every n a request reaches. After each, once the loop has taken the
abort, no page is in use and the engine (or pair) still answers. The page bookkeeping itself is interrupted the
same way on a pool of its own.
"""

from __future__ import annotations

import signal
import sys
import threading

import pytest
import torch

from tandem.runtime import Budget, Engine, SamplingParams, Tandem
from tandem.runtime import engine as engine_module
from tandem.runtime import loop as loop_module
from tandem.runtime import pipeline, speculative
from tandem.runtime import request as request_module
from tandem.runtime.engine import Engine as _Engine
from tandem.runtime.kv_cache import PagePool, Sequence, release_all
from tandem.runtime.loop import Loop
from tandem.runtime.reply_text import ReplyText
from tandem.runtime.request import RequestHandle

from conftest import random_image, wait_for

KV_CODE = [PagePool.allocate, PagePool.release, PagePool.retain, PagePool.reclaim, Sequence.append_slots,
           Sequence.reserve, Sequence.fork_from, Sequence.truncate, Sequence.release, Sequence._copy_last_page,
           release_all]
CALLER_CODE = [_Engine.generate, _Engine.generate_batch, _Engine.stream, _Engine.submit, _Engine.prepare,
               _Engine._submit, Loop.post, _Engine.abort, RequestHandle.result, RequestHandle.stream,
               RequestHandle._reply_text, ReplyText.add, ReplyText.finish, RequestHandle.abort]
PAIR_CODE = [Tandem.answer, Tandem.answer_async, Tandem._run_policy, Tandem._stage, Tandem._prefix,
             Tandem._build_prefix, Tandem._release, Tandem._transfer, Tandem._reason, Tandem._short, pipeline._all,
             RequestHandle.handover_async, RequestHandle.result_async, RequestHandle.stream_async,
             RequestHandle.discard_async, request_module.discard_all]
SPECULATIVE_CODE = [speculative.speculate, speculative._take, speculative.accept_drafts, speculative._draft_params,
                    speculative._after, _Engine._drafted, _Engine.generate_async,
                    _Engine.stream_async, engine_module._speculative_stream, loop_module.iterate,
                    RequestHandle.discard_async, request_module.discard_all, RequestHandle.result_async]


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


def settled(engine: Engine) -> bool:
    """The loop has taken every abort: nothing queued or running, no page in use."""
    return not engine.scheduler and not engine._requests and engine.pool.pages_in_use == 0


def test_ctrl_c_anywhere_in_a_batch_leaves_no_page_behind(engine):
    messages = [[{"role": "user", "content": "Count to three."}], [{"role": "user", "content": "Say hello."}]]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in engine.generate_batch(messages, params)]

    def check(full: bool) -> None:
        assert wait_for(lambda: settled(engine))
        if full:
            assert [o.token_ids for o in engine.generate_batch(messages, params)] == expected

    lines = interrupt_everywhere(lambda: engine.generate_batch(messages, params), CALLER_CODE, check)
    assert lines > 30


def test_ctrl_c_anywhere_in_a_stream_leaves_nothing_behind(engine):
    messages = [{"role": "user", "content": "Tell me a story."}]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    expected = "".join(engine.stream(messages, params))

    def check(full: bool) -> None:
        assert wait_for(lambda: settled(engine))
        if full:
            assert "".join(engine.stream(messages, params)) == expected

    interrupt_everywhere(lambda: "".join(engine.stream(messages, params)), CALLER_CODE, check)


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
        pool.reclaim()  # what the pool does at its next allocation
        assert pool.pages_in_use == 0 and sorted(pool._free) == list(range(8))
        if full:
            scenario()

    interrupt_everywhere(scenario, KV_CODE, check, every_nth_check_call=1)


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited")  # Ctrl-C on the call to asyncio.run itself
def test_ctrl_c_anywhere_in_a_pair_request_leaves_nothing_behind(tiny_2b):
    """The transfer policy (two prefixes, forks, key mass, the gather of the reasoning ids), interrupted at every
    line of the pipeline's flow (asyncio.run cancels it: every prefix goes back, every stage is aborted)."""
    large, small = (Engine.from_pretrained(tiny_2b, device="cpu", dtype="float32", kv_cache_tokens=2048, page_size=4)
                    for _ in range(2))
    pair = Tandem(large, small, budget=Budget(short_tokens=2, reason_tokens=3))
    image = random_image(64, 64, seed=1)
    expected = pair.answer(image, "What is it?", policy="transfer", keep="attention").answer

    def check(full: bool) -> None:
        for e in (large, small):
            assert wait_for(lambda: settled(e))
        if full:
            assert pair.answer(image, "What is it?", policy="transfer", keep="attention").answer == expected

    interrupt_everywhere(lambda: pair.answer(image, "What is it?", policy="transfer", keep="attention"),
                         PAIR_CODE + CALLER_CODE, check, every_nth_check_call=10)


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited")  # Ctrl-C on the call to asyncio.run itself
@pytest.mark.parametrize("temperature, streamed", [(0.0, False), (1.0, False), (0.0, True)],
                         ids=["greedy", "sampled", "streamed"])
def test_ctrl_c_anywhere_in_a_speculative_generation_leaves_nothing_behind(tiny_2b, tiny_8b, temperature, streamed):
    """Speculative decoding (two engines' kept sequences, forks, truncations), interrupted at every line of its
    flow: every sequence goes back, every request is aborted, and the next generation is unchanged. Streamed, the
    rounds run in a thread of their own, which no signal reaches: every line of the caller's side is interrupted,
    and the stream's close must cancel the rounds there and wait for their cleanup."""
    large = Engine.from_pretrained(tiny_8b, device="cpu", dtype="float32", kv_cache_tokens=1024, page_size=4)
    small = Engine.from_pretrained(tiny_2b, device="cpu", dtype="float32", kv_cache_tokens=1024, page_size=4)
    messages = [{"role": "user", "content": "Count to three."}]
    params = SamplingParams(max_tokens=4, temperature=temperature, seed=5, ignore_eos=True)
    if temperature:
        expected = large.generate(messages, params, draft=small, speculative=2).token_ids  # seeded: reproducible
    else:
        expected = large.generate(messages, params).token_ids

    def check(full: bool) -> None:
        for e in (large, small):
            assert wait_for(lambda: settled(e))
        if full:
            assert large.generate(messages, params, draft=small, speculative=2).token_ids == expected

    if streamed:
        text = large.tokenizer.decode(expected)
        call = lambda: "".join(large.stream(messages, params, draft=small, speculative=2)) == text or 1 / 0
    else:
        call = lambda: large.generate(messages, params, draft=small, speculative=2)
    interrupt_everywhere(call, SPECULATIVE_CODE + CALLER_CODE, check, every_nth_check_call=10)
