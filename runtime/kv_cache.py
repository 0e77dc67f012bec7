"""The paged KV cache: one preallocated pool of fixed-size pages per model, and the sequences that own pages.

A sequence's block table lists its pages in order; token i lives in page block_table[i // page_size] at offset
i % page_size. Pages are reference-counted, so a prefix can be shared by several continuations (`fork`) without
copying; a shared, partly filled last page is copied before a continuation writes into it. Running out of pages
raises CacheFullError, never a silent truncation.
"""

from __future__ import annotations

import torch

from tandem.models.config import TextConfig
from tandem.models.errors import InputError


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
        return self.num_pages - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CacheFullError(
                f"KV cache full: {n} more page(s) of {self.page_size} tokens needed, {len(self._free)} free "
                f"of {self.num_pages}"
            )
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def retain(self, pages: list[int]) -> None:
        for p in pages:
            self._refs[p] += 1

    def release(self, pages: list[int]) -> None:
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)

    def is_shared(self, page: int) -> bool:
        return self._refs[page] > 1


class Sequence:
    """One token sequence's pages in a pool. `length` counts the tokens whose K/V are (or are being) written."""

    def __init__(self, pool: PagePool):
        self.pool = pool
        self.pages: list[int] = []
        self.length = 0

    def append_slots(self, n: int) -> torch.Tensor:
        """Make room for n more tokens and return their cache slots [n] (page * page_size + offset)."""
        self.reserve(n)
        size = self.pool.page_size
        index = torch.arange(self.length, self.length + n)
        slots = torch.tensor(self.pages)[index // size] * size + index % size
        self.length += n
        return slots

    def reserve(self, n: int) -> None:
        """Own pages for n more tokens now (copying a shared last page first), without counting them: a decode
        loop that computes its slots on the device needs its pages before it starts."""
        size = self.pool.page_size
        if self.length % size and self.pool.is_shared(self.pages[-1]):
            self._copy_last_page()
        needed = -(-(self.length + n) // size) - len(self.pages)
        if needed > 0:
            self.pages += self.pool.allocate(needed)

    def fork(self) -> "Sequence":
        """A continuation sharing every page of this sequence so far."""
        child = Sequence(self.pool)
        child.pages, child.length = list(self.pages), self.length
        self.pool.retain(child.pages)
        return child

    def release(self) -> None:
        self.pool.release(self.pages)
        self.pages, self.length = [], 0

    def block_table(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([self.pages], dtype=torch.int32, device=device)

    def _copy_last_page(self) -> None:
        (page,) = self.pool.allocate(1)
        self.pool.kv[:, :, page] = self.pool.kv[:, :, self.pages[-1]]
        self.pool.release([self.pages[-1]])
        self.pages[-1] = page
