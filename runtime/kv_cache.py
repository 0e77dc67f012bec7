"""The paged KV cache: one preallocated pool of fixed-size pages per model, and the sequences that own pages.

A sequence's block table lists its pages in order; token i lives in page block_table[i // page_size] at offset
i % page_size. Pages are reference-counted, so a prefix can be shared by several continuations (`fork_from`) without
copying; a shared, partly filled last page is copied before a continuation writes into it. Running out of pages
raises CacheFullError, never a silent truncation.

A sequence's pages and the pool's free list and reference counts change together, as one step that neither an
exception nor Ctrl-C can split (see tandem.runtime.interrupts). The pattern that keeps every page accounted for:
make the Sequence (it holds nothing yet), then acquire pages inside a `try` whose `finally` releases it. Python
cannot promise that a `finally` runs to its end (a Ctrl-C may land on the call that would release), so the pool
also takes back the pages of every sequence that was dropped while holding some, at its next allocation.

Threads share a pool: an engine's loop allocates and releases, a pair's caller gives its prefixes back. Every
change of the pool, and every change of a sequence's pages with it, holds the pool's lock.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable

import torch

from tandem.models.config import TextConfig
from tandem.models.errors import InputError
from tandem.runtime.interrupts import uninterrupted


class CacheFullError(InputError):
    """The request needs more KV-cache pages than are free."""


class PagePool:
    def __init__(self, config: TextConfig, num_pages: int, page_size: int, device: torch.device, dtype: torch.dtype):
        self.page_size = page_size
        self.num_pages = num_pages
        # [layers, k/v, pages, page_size, kv_heads, head_dim]: one tensor, so one allocation at start-up. One page
        # more than asked for: the scratch page, never handed out, where padded rows of a batched step write.
        self.kv = torch.empty(
            config.num_layers, 2, num_pages + 1, page_size, config.num_kv_heads, config.head_dim, device=device,
            dtype=dtype,
        )
        self.scratch_page = num_pages
        self.kv[:, :, self.scratch_page].zero_()  # padded rows read it: keep their (unread) outputs finite
        self._free = list(range(num_pages - 1, -1, -1))
        self._refs = [0] * num_pages
        # Every sequence's page list, with a weak reference to the sequence: a list whose sequence is gone is
        # released by `_reclaim`. Nothing runs at collection time, so nothing can interrupt it.
        self._holders: dict[int, tuple[weakref.ref, list[int]]] = {}
        self.lock = threading.RLock()
        # Told when pages come back, from whichever thread: the engine's loop looks again at the requests waiting
        # for pages (a pair's prefix or a speculation's sequence goes back from the caller's thread).
        self.on_free: Callable[[], None] | None = None

    @staticmethod
    def bytes_per_token(config: TextConfig, dtype: torch.dtype) -> int:
        return config.num_layers * 2 * config.num_kv_heads * config.head_dim * dtype.itemsize

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - self.free_pages

    def allocate(self, n: int) -> list[int]:
        """n free pages, each with one reference. Callers record them in the same uninterrupted step, under `lock`."""
        self.reclaim()
        if n > len(self._free):
            raise CacheFullError(
                f"KV cache full: {n} more page(s) of {self.page_size} tokens needed, {len(self._free)} free "
                f"of {self.num_pages}"
            )
        pages = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
        for p in pages:
            self._refs[p] = 1
        return pages

    def retain(self, pages: list[int]) -> None:
        for p in pages:
            self._refs[p] += 1

    def release(self, pages: list[int]) -> None:
        free = len(self._free)
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)
        if len(self._free) > free and self.on_free is not None:
            self.on_free()

    def is_shared(self, page: int) -> bool:
        return self._refs[page] > 1

    def track(self, seq: "Sequence") -> None:
        with self.lock:
            self._holders[seq.key] = (weakref.ref(seq), seq.pages)

    def reclaim(self) -> None:
        """Release the pages of sequences dropped without a release."""
        with self.lock, uninterrupted():
            for key, (ref, pages) in list(self._holders.items()):
                if ref() is None:
                    self.release(pages)
                    del self._holders[key]


class Sequence:
    """One token sequence's pages in a pool. `length` counts the tokens whose K/V are (or are being) written."""

    _keys = itertools.count()

    def __init__(self, pool: PagePool):
        self.pool = pool
        self.pages: list[int] = []  # the same list object for the sequence's life: the pool tracks it
        self.length = 0
        self.key = next(Sequence._keys)
        pool.track(self)

    def append_slots(self, n: int) -> torch.Tensor:
        """Make room for n more tokens and return their cache slots [n] (page * page_size + offset)."""
        with self.pool.lock, uninterrupted():
            self.reserve(n)
            start, self.length = self.length, self.length + n
        size = self.pool.page_size
        index = torch.arange(start, start + n)
        return torch.tensor(self.pages)[index // size] * size + index % size

    def reserve(self, n: int) -> None:
        """Own pages for n more tokens now (copying a shared last page first), without counting them: a decode
        loop that computes its slots on the device needs its pages before it starts."""
        size = self.pool.page_size
        with self.pool.lock, uninterrupted():
            if self.length % size and self.pool.is_shared(self.pages[-1]):
                self._copy_last_page()
            needed = -(-(self.length + n) // size) - len(self.pages)
            if needed > 0:
                self.pages += self.pool.allocate(needed)

    def fork_from(self, parent: "Sequence") -> None:
        """Continue `parent` (this sequence must be empty): share every page it has so far, without copying."""
        assert not self.pages, "fork_from needs an empty sequence"
        with self.pool.lock, uninterrupted():
            self.pool.retain(parent.pages)
            self.pages.extend(parent.pages)
            self.length = parent.length

    def truncate(self, length: int) -> None:
        """Forget every token from `length` on (a speculation's rejected drafts). Its pages stay, reserved for the
        tokens that take their place, which overwrite what is there."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate({length}) of a sequence of {self.length} tokens")
        self.length = length

    def release(self) -> None:
        """Give back every page (a no-op when it holds none, so a `finally` may call it whatever happened)."""
        with self.pool.lock, uninterrupted():
            self.pool.release(self.pages)
            self.pages.clear()
            self.length = 0

    def block_table(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([self.pages], dtype=torch.int32, device=device)

    def _copy_last_page(self) -> None:
        (page,) = self.pool.allocate(1)
        try:
            self.pool.kv[:, :, page] = self.pool.kv[:, :, self.pages[-1]]
        except BaseException:
            self.pool.release([page])
            raise
        self.pool.release([self.pages[-1]])
        self.pages[-1] = page


def release_all(seqs) -> None:
    """Release every sequence of an iterable, all of them even if Ctrl-C comes in the middle."""
    with uninterrupted():
        for seq in seqs:
            seq.release()
