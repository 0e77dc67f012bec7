"""Loop: the thread that runs an engine's steps, and the inbox that feeds it from any thread.

Callers post messages (a new request, an abort) and return at once; the loop thread takes them between steps.
Posting takes no lock: deque.append is one step, so Ctrl-C in a caller's thread can never leave a lock held or a
message half-posted, and a wake-up it loses costs the loop at most IDLE_POLL_S. The thread starts on the first
post, and again on a post after `close`; at exit every loop is closed, so no device work runs while the
interpreter shuts down.

On the CPU the loop thread and its caller each own an OpenMP team, and so does every other engine's loop;
`free_idle_cpu_workers` keeps the idle ones from slowing the one at work (see there).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import functools
import queue
import threading
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
IDLE_POLL_S = 0.05  # an idle loop looks at its inbox at least this often
OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep the settings


class Closed(Exception):
    """`close` reached the loop: it ends after this step."""


class Loop:
    def __init__(self, name: str, step: Callable[["Loop"], None], setup: Callable[[], contextlib.AbstractContextManager],
                 on_error: Callable[[BaseException], None]):
        """step(loop) runs one engine step (and takes the inbox's messages); setup() is entered around the whole
        thread (the engine's stream, inference mode); on_error(e) fails what an exception in a step left in
        flight (Closed included, on close), and the loop goes on."""
        self.name, self._step, self._setup, self._on_error = name, step, setup, on_error
        self._inbox: deque = deque()
        self._wake = threading.Event()
        self._woken = False  # `wake` was called: a blocking take returns even with nothing posted
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()  # one thread, whichever caller starts it

    def __len__(self) -> int:
        return len(self._inbox)

    def post(self, message: tuple) -> None:
        """Hand a message to the loop, starting its thread if need be."""
        self._inbox.append(message)
        with self._starting:
            if self._thread is None or not self._thread.is_alive():
                thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                thread.start()
                self._thread = thread
                _LIVE.add(self)
        self._wake.set()

    def take(self, block: bool) -> list[tuple]:
        """The messages posted since the last take (waiting, if `block`, for one or a `wake`), in order. Raises
        Closed at a close message."""
        if block and not self._inbox:
            free_idle_cpu_workers()  # an idle loop holds no OpenMP threads: other engines' loops may be working
        while block and not self._inbox and not self._woken:
            self._wake.wait(IDLE_POLL_S)
            self._wake.clear()
        self._woken = False  # a wake-up after this point is not lost: the caller's step schedules next
        messages = []
        while self._inbox:
            message = self._inbox.popleft()
            if message[0] == "close":
                raise Closed
            messages.append(message)
        return messages

    def wake(self) -> None:
        """End a blocking `take` with no message, from any thread: the step looks again at what waits (pages have
        come back). No lock, so that it may be called under the pool's."""
        self._woken = True
        self._wake.set()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current step (on_error gets Closed for what is in flight)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._inbox.append(("close", None))
        self._wake.set()
        thread.join(timeout)

    def _run(self) -> None:
        with self._setup():
            while True:
                try:
                    self._step(self)
                except Closed as e:
                    self._on_error(e)
                    return
                except BaseException as e:  # noqa: BLE001 - fails what is in flight; the loop goes on
                    self._on_error(e)


_LIVE: "weakref.WeakSet[Loop]" = weakref.WeakSet()  # loops whose thread has run: closed at exit


@atexit.register
def _close_all() -> None:
    for loop in list(_LIVE):
        loop.close(timeout=5.0)


async def off_loop(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) in a worker thread: CPU work (decoding an image) that would stall the event loop. The
    worker's OpenMP threads are freed after it (see free_idle_cpu_workers)."""
    def run():
        try:
            return fn(*args, **kwargs)
        finally:
            free_idle_cpu_workers()

    return await asyncio.to_thread(run)


def iterate(source: AsyncGenerator[T, None]) -> Iterator[T]:
    """An async iterator as a plain one, for a caller with no event loop running. It runs on an event loop in a
    thread of its own, which signals never reach: Ctrl-C lands in the caller's wait, never half-way through the
    iterator's own code. Closing the iterator early, or an exception in the caller, cancels it there and waits
    until its cleanup has run."""
    items: queue.SimpleQueue = queue.SimpleQueue()  # (item, None), then (None, the exception that ended it)
    loop = asyncio.new_event_loop()

    async def drain():
        try:
            async for item in source:
                items.put((item, None))
        finally:
            await source.aclose()

    def run():
        try:
            loop.run_until_complete(task)
            items.put((None, StopIteration()))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            items.put((None, e))
        finally:
            loop.close()

    task = loop.create_task(drain())
    thread = threading.Thread(target=run, name="tandem-iterate", daemon=True)
    try:
        thread.start()
        while True:
            item, end = items.get()
            if isinstance(end, StopIteration):
                return
            if end is not None:
                raise end
            yield item
    finally:
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing left to cancel
                loop.call_soon_threadsafe(task.cancel)
            thread.join()


def free_idle_cpu_workers() -> None:
    """Free the calling thread's idle OpenMP worker threads: a caller's before it hands CPU work to a loop
    thread, a loop's before it waits for work.

    While a process holds more OpenMP threads than CPUs, libgomp cuts every worker's spin-wait to a few
    iterations, so each parallel region of the working loop's step pays a futex wake-up; one idle team (the
    caller's, made when it loaded the model, or an idle engine's) is enough to cross that line. On the tiny
    2b-like model this made the batch-1 CPU decode step 1.8x slower. The thread's next parallel region starts its
    team again. Only libgomp (torch's OpenMP on Linux) is handled; with another runtime this does nothing."""
    pause = _omp_pause_resource_all()
    if pause is not None:
        pause(OMP_PAUSE_SOFT)


@functools.cache
def _omp_pause_resource_all():
    """omp_pause_resource_all of the libgomp this process loaded, or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
    return None
