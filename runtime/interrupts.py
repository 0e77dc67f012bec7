"""Bookkeeping that must change as one step, even when the user presses Ctrl-C.

Python raises KeyboardInterrupt between almost any two lines of the main thread. A page taken from the free list
but not yet recorded by its sequence, or a decode run marked busy but not yet handed to the code that ends it,
would then be lost for good. `uninterrupted()` holds a SIGINT that arrives inside its block until the block has
finished, then delivers it. Code outside such blocks keeps the rule that makes it safe on its own: acquire
inside a `try` whose `finally` releases.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = threading.local()


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Run the block with SIGINT held back; a SIGINT that came meanwhile is raised again when it ends. Only the
    main thread receives signals: elsewhere, and inside an outer such block, this does nothing."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None or getattr(_state, "active", False):  # None: a handler installed outside Python
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    _state.active = True
    try:
        yield
    finally:
        _state.active = False
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)  # now the previous handler (KeyboardInterrupt by default) runs
