"""A request, and the handle its caller holds.

The Request carries its own state, as the engines people study do: its prompt and params, its KV pages, where it
stands, the tokens so far. Only the engine's loop thread changes it. The RequestHandle is the caller's side:
result() / stream() / abort() and their asyncio twins. The loop thread publishes tokens and the outcome through
the handle's condition variable, and wakes asyncio waiters through their own event loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum

import torch

from tandem.models.errors import InputError
from tandem.models.prompt import Prompt
from tandem.models.tokenizer import Tokenizer
from tandem.runtime.kv_cache import Sequence
from tandem.runtime.reply_text import ReplyText
from tandem.runtime.sampling import SamplingParams


class QueueFullError(InputError):
    """The engine's waiting queue is at its limit (EngineConfig.max_waiting): try again later."""


class RequestAborted(Exception):
    """The request was aborted before it finished (abort(), a closed stream, a cancelled task)."""


@dataclass
class Timings:
    """Seconds per phase of one request, and its token counts. Device phases are timed on the device (CUDA events)
    or after the device finished (CPU); first_token_s and decode_s are when the host had the tokens."""

    queue_s: float = 0.0  # submission to admission (waiting for a place in the batch and for cache pages)
    vision_s: float = 0.0  # image preprocessing and the vision encoder (0 when the vision cache had the image)
    prefill_s: float = 0.0  # the prompt's forward passes, up to the first sampled token
    first_token_s: float = 0.0  # submission to the first token on the host: what a user waits for
    decode_s: float = 0.0  # the first token on the host to the last one
    prompt_tokens: int = 0
    image_tokens: int = 0
    output_tokens: int = 0
    decode_steps: int = 0  # decode steps this request was fed in, steps past its stop included
    drafted: int = 0  # speculative decoding: tokens the draft proposed,
    accepted: int = 0  # of which the target kept these,
    verify_forwards: int = 0  # in this many target forwards (each also gives one token of its own)

    @property
    def decode_ms_per_token(self) -> float:
        steps = self.output_tokens - 1  # the first token comes out of prefill
        return 1000 * self.decode_s / steps if steps > 0 else 0.0


class DeviceSpan:
    """Device time of a phase without a sync: CUDA events, read at the request's end (by then the work is done);
    the host clock on the CPU, where the work is done when the call returns."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start, self.end = time.perf_counter(), None

    def stop(self) -> "DeviceSpan":
        if self.cuda:
            self.end.record()
        else:
            self.end = time.perf_counter()
        return self

    def seconds(self) -> float:
        if not self.cuda:
            return self.end - self.start
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1000


@dataclass
class GenerateOutput:
    text: str
    token_ids: list[int]  # the generated ids, including the stop token when one ended generation
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens reached)
    timings: Timings
    key_mass: torch.Tensor | None = None  # with key_mass: [output tokens, stop token excluded] float32 on the device
    logits: torch.Tensor | None = None  # with token_logits: [output tokens, vocab] float32, the weights each token
    # was drawn from: its filtered, temperature-scaled logits, -inf outside the filters (softmax: its distribution)
    ready: torch.cuda.Event | None = None  # on CUDA with key_mass or logits: wait for it before reading them
    seq: Sequence | None = None  # with keep_sequence: the sequence, handed over (every fed token's K/V in it)


@dataclass
class Prefill:
    """The outcome of a request that only prefills: a pair's prefix (its sequence, handed over), or prompt logits."""

    seq: Sequence | None
    logits: torch.Tensor | None  # [prompt, vocab] float32, with prompt_logits
    timings: Timings
    vision_cache_hit: bool | None
    ready: torch.cuda.Event | None = None  # on CUDA with logits: wait for it before reading them
    best: torch.Tensor | None = None  # [prompt] with logits: each position's likeliest token, taken where the
    # logits are made (a caller's thread need not touch a vocabulary-wide row: on the CPU its threads would compete)


class Phase(Enum):
    WAITING = "waiting"  # queued: no pages yet
    PREFILL = "prefill"  # pages reserved; prompt chunks being prefilled
    DECODE = "decode"  # in the decode batch
    DONE = "done"


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    """One unit of work for an engine. params None: prefill only (a pair's prefix, or prompt logits)."""

    prompt: Prompt
    params: SamplingParams | None
    stop_ids: frozenset[int]
    seed: int  # the sampler's key: params.seed, or drawn at submission
    parent: Sequence | None = None  # continue this sequence's pages (a pair stage forks its model's prefix)
    in_place: bool = False  # write into `parent` itself, not a fork: its holder lends it (a speculation's round)
    room: int = 0  # cache slots reserved past its own, for the requests that will continue its sequence in place
    keep_sequence: bool = False  # hand the prefilled sequence to the caller (a prefix) instead of releasing it
    prompt_logits: bool = False  # keep the logits of every prompt position
    token_logits: bool = False  # keep the weights each output token was drawn from (sampling.sample_keeping)
    key_mass: bool = False  # add up the attention each cached key receives during decode
    ready: object = None  # a CUDA event the prompt's device tensors wait for (they come from another stream)
    headroom: int = 0  # pages that must stay free once it is admitted (a prefix's room for its stages)
    id: int = field(default_factory=lambda: next(_ids))
    # The loop's state
    phase: Phase = Phase.WAITING
    seq: Sequence | None = None
    prefilled: int = 0  # prompt tokens prefilled so far
    vision: object = None  # the prompt's VisionFeatures once encoded
    next_token: torch.Tensor | None = None  # [1] on the device: the first token, until the decode batch takes it
    fed: int = 0  # decode steps launched with this request
    tokens: list[int] = field(default_factory=list)  # generated ids the host has read
    text: ReplyText | None = None  # with stop strings: the reply's text, watched for them
    mass: torch.Tensor | None = None  # [prompt + max_tokens] float32 on the device, with key_mass
    logits: list[torch.Tensor] = field(default_factory=list)  # per prompt chunk, or per output token: [n, vocab]
    timings: Timings = field(default_factory=Timings)
    spans: list = field(default_factory=list)  # (Timings field, a device-timed span) to add up at the end
    submitted: float = field(default_factory=time.perf_counter)
    first_read: float = 0.0  # when the host read the first token
    vision_cache_hit: bool | None = None  # were all its images' features cached?
    handle: "weakref.ref[RequestHandle] | None" = None  # weak: a handle its caller drops aborts the request

    @property
    def max_tokens(self) -> int:
        return 0 if self.params is None else self.params.max_tokens

    @property
    def total_tokens(self) -> int:
        """Cache slots this request may fill: its prompt (after its parent's tokens) and every fed token."""
        return (self.parent.length if self.parent else 0) + len(self.prompt) + max(self.max_tokens - 1, 0) + self.room


    def output(self, tokenizer: Tokenizer) -> GenerateOutput:
        """The finished generation: its ids, and its text without the stop token (or cut before a stop string)."""
        ids = self.tokens
        stopped = bool(ids) and ids[-1] in self.stop_ids
        text_ids = ids[:-1] if stopped else ids
        if self.text is not None and self.text.stopped:
            text, stopped = self.text.final, True
        else:
            text = tokenizer.decode(text_ids)
        output = GenerateOutput(text, list(ids), "stop" if stopped else "length", self.timings)
        if self.token_logits:  # (a step run past a stop drew a token no one reads: its row is dropped)
            output.logits = torch.cat(self.logits)[: len(ids)]
        if self.key_mass:
            start = self.seq.length - self.fed  # the prompt's end: the first output token's position
            output.key_mass = self.mass[start : start + len(text_ids)]
        return output


class RequestHandle:
    """The caller's view of a submitted request. Thread-safe; asyncio-safe through the *_async methods.

    Dropping the handle, closing or dropping a stream, or cancelling an awaiting task aborts the request: it
    leaves the batch at the engine's next step and its pages are freed.

    The loop thread appends tokens and sets the outcome (one step each under the GIL) and wakes waiters; a
    waiting thread sleeps in a C-level lock acquire with a timeout, so Ctrl-C can never leave a Python-level
    lock or condition half-changed, and a wake-up it loses costs at most WAKE_POLL_S."""

    WAKE_POLL_S = 0.05

    def __init__(self, request: Request, tokenizer: Tokenizer, abort: Callable[[int], None]):
        self.request_id = request.id
        self._tokenizer, self._abort, self._prompt_ids = tokenizer, abort, request.prompt.token_ids
        self._stop_ids = request.stop_ids
        self._stop_texts = request.params.stop if request.params is not None else ()
        self._tokens: list[int] = []
        self._done = False
        self._value: object = None  # the outcome: GenerateOutput, Prefill, or an exception
        self._signal = threading.Lock()  # released (once) by every change; waiters acquire it
        self._signal.acquire()
        self._lock = threading.Lock()  # guards _waiters
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, bool]] = []  # (.., every token)
        self._finalizer = weakref.finalize(self, abort, request.id)  # a dropped handle aborts its request
        self._finalizer.atexit = False

    # ---- the loop's side --------------------------------------------------------------------------------------
    def publish(self, tokens: list[int]) -> None:
        self._tokens += tokens
        self._wake(final=False)

    def finish(self, value: object) -> None:
        """The outcome (an exception for a failed or aborted request); wakes every waiter."""
        self._value = value
        self._done = True
        self._wake(final=True)
        self._finalizer.detach()

    def _wake(self, final: bool) -> None:
        """Wake the waiting threads, and the event loops' waiters that asked for every token (streams) or, when
        `final`, all: a plain result_async costs its event loop one wake-up, not one per token."""
        if self._signal.locked():
            try:
                self._signal.release()
            except RuntimeError:  # released by a concurrent wake meanwhile
                pass
        with self._lock:
            waiters = list(self._waiters)
        for loop, event, every_token in waiters:
            if final or every_token:
                with contextlib.suppress(RuntimeError):  # its event loop closed: nobody waits there any more
                    loop.call_soon_threadsafe(event.set)

    def _sleep(self, timeout: float | None) -> None:
        """Until a change or `timeout` (never longer than WAKE_POLL_S): the caller then looks again."""
        wait = self.WAKE_POLL_S if timeout is None else max(0.0, min(timeout, self.WAKE_POLL_S))
        if self._signal.acquire(timeout=wait):
            pass  # consumed: later changes release it again

    # ---- the caller's side ----------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done

    def abort(self) -> None:
        """Stop the request; a waiting result() then raises RequestAborted. No effect once it has finished."""
        if not self._done:
            self._abort(self.request_id)

    def result(self, timeout: float | None = None):
        """Wait for the outcome (a GenerateOutput for a generation). An interrupt while waiting (Ctrl-C) aborts the
        request before it propagates."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._done:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
                self._sleep(left)
        except BaseException:
            self.abort()
            raise
        return self._outcome()

    def stream(self) -> Iterator[str]:
        """The reply's text, piece by piece as the tokens arrive (never half a UTF-8 character, nothing a stop
        string will cut, the stop token not included). Closing the iterator early aborts the request."""
        text, seen = self._reply_text(), 0
        try:
            while True:
                done = self._done  # read first: tokens published before the outcome are all there then
                new = self._tokens[seen:]
                seen += len(new)
                piece = text.add(new)
                if piece:
                    yield piece
                if done and seen == len(self._tokens):
                    break
                if not new:
                    self._sleep(None)
            self._outcome()  # an error raises here, after the text that came before it
            tail = text.finish()
            if tail:
                yield tail
        finally:
            self.abort()

    async def result_async(self):
        """result() for asyncio: cancelling the awaiting task aborts the request."""
        event = self._register(every_token=False)
        try:
            while not self._done:
                await event.wait()
                event.clear()
        except BaseException:
            self.abort()
            raise
        finally:
            self._unregister(event)
        return self._outcome()

    async def handover_async(self):
        """result_async() for a request that hands its sequence over (keep_sequence). If the awaiting task is
        cancelled, the request is discarded (`discard_async`): a sequence handed over meanwhile is not lost."""
        try:
            return await self.result_async()
        except asyncio.CancelledError:
            await self.discard_async()
            raise

    async def discard_async(self) -> None:
        """Abort the request and wait for its end, giving back a sequence it handed over (`discard_all`)."""
        await discard_all([self])

    async def stream_async(self) -> AsyncIterator[str]:
        text, event, seen = self._reply_text(), self._register(every_token=True), 0
        try:
            while True:
                done = self._done
                new = self._tokens[seen:]
                seen += len(new)
                piece = text.add(new)
                if piece:
                    yield piece
                if done and seen == len(self._tokens):
                    break
                if not new:
                    await event.wait()
                    event.clear()
            self._outcome()
            tail = text.finish()
            if tail:
                yield tail
        finally:
            self._unregister(event)
            self.abort()

    def _reply_text(self) -> ReplyText:
        return ReplyText(self._tokenizer, self._prompt_ids if isinstance(self._prompt_ids, list) else [],
                         self._stop_ids, self._stop_texts)

    def _register(self, every_token: bool) -> asyncio.Event:
        event = asyncio.Event()
        with self._lock:
            self._waiters.append((asyncio.get_running_loop(), event, every_token))
        if (every_token and self._tokens) or self._done:
            event.set()
        return event

    def _unregister(self, event: asyncio.Event) -> None:
        with self._lock:
            self._waiters = [waiter for waiter in self._waiters if waiter[1] is not event]

    def _outcome(self):
        if isinstance(self._value, BaseException):
            raise self._value
        return self._value


async def discard_all(handles: list[RequestHandle]) -> None:
    """Abort the requests and wait for their ends; a sequence one handed over before its abort reached it goes
    back. For a caller that will not take the outcomes. A cancellation, or a Ctrl-C, that comes meanwhile is
    raised once every one has ended: never before (a request still running may write into a sequence its caller
    would give back), never swallowed."""
    for handle in handles:
        handle.abort()
    pending: BaseException | None = None
    while not all(handle.done for handle in handles):  # the aborts are on their way: each ends within a step
        try:
            await asyncio.sleep(0.001)
        except BaseException as e:  # noqa: BLE001 - raised below
            if pending is None or isinstance(pending, asyncio.CancelledError):  # a Ctrl-C outranks a cancel
                pending = e
    for handle in handles:
        seq = getattr(handle._value, "seq", None)
        if seq is not None:
            seq.release()
    if pending is not None:
        raise pending
