"""Scheduler: which requests an engine step works on.

A waiting queue and a running set. Each step admits waiting requests, first come first served, while the KV pages
for their whole life (prompt + max_tokens: no preemption is ever needed) are free and the running set is below its
limit; then hands out prompt chunks under the step's token budget (a long image prompt stalls the running decodes
for one chunk at a time, not for its whole prefill); then decodes every request that has its first token, in one
batched step. Requests join and leave between steps. A speculation's rounds write in place into a sequence whose
pages it reserved at its start: they need no page and are never held back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tandem.runtime.config import EngineConfig
from tandem.runtime.interrupts import uninterrupted
from tandem.models.errors import InputError
from tandem.runtime.kv_cache import CacheFullError, PagePool, Sequence
from tandem.runtime.request import Phase, Request


@dataclass
class Plan:
    """One step's work: prompt chunks (request, start, end), then one decode step over `decode`."""

    admitted: list[Request] = field(default_factory=list)
    prefill: list[tuple[Request, int, int]] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, pool: PagePool, config: EngineConfig, context: int):
        """context: the model's context length in tokens."""
        self.pool, self.config, self.context = pool, config, context
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # admitted, prompt not yet fully prefilled, in admission order
        self.decoding: list[Request] = []  # prefilled, in the decode batch

    def __len__(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.decoding)

    def pages_needed(self, request: Request) -> int:
        """Fresh pages the request takes for its life: its own slots, and one more where it forks a parent whose
        partly filled last page it will copy before writing. In place, what its sequence has not reserved yet."""
        size = self.pool.page_size
        if request.in_place:
            return max(0, -(-request.total_tokens // size) - len(request.parent.pages))
        shared = (request.parent.length // size) if request.parent else 0
        return -(-request.total_tokens // size) - shared

    def check_fits(self, total: int, parent: Sequence | None = None, headroom: int = 0) -> None:
        """Refuse a sequence that could never fit: `total` tokens (its prompt, after `parent`'s tokens, and
        max_tokens) beyond the model's context, or more cache pages than the cache can ever give it: its capacity,
        less the parent's pages (held while it runs) and `headroom` pages that must stay free for the request's
        later stages. One that fits only later waits in the queue."""
        limit = self.context
        if total > limit:
            raise InputError(f"prompt + max_tokens = {total} tokens exceeds the model's context of {limit} tokens")
        size = self.pool.page_size
        held = len(parent.pages) if parent is not None else 0
        pages = -(-total // size) - (parent.length // size if parent is not None else 0) + headroom
        if pages > self.pool.num_pages - held:
            what = "the prompt and the stages after it need" if headroom else "prompt + max_tokens needs"
            room = (f"the {(self.pool.num_pages - held) * size} the cache can give it (capacity "
                    f"{self.pool.capacity_tokens} tokens, {held * size} of them held by the prefix it continues"
                    if held else f"the cache holds (capacity {self.pool.capacity_tokens} tokens")
            raise CacheFullError(f"{what} {pages * size} tokens of KV cache ({pages} pages of {size}), more than "
                                 f"{room}; raise kv_cache_tokens (--kv-cache-tokens) or lower max_tokens)")

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> Plan:
        plan = Plan()
        # Requests that continue a prefix go first, then the others, each first come first served: a prefix held
        # for its stages must not wait behind new prefixes, and a new prefix is admitted only with room for a stage
        # left (its headroom), so the held prefixes can never fill the cache and starve every stage.
        for forks in (True, False):
            blocked = False  # one of this kind waits for pages: later ones that need pages do not overtake it
            for request in [r for r in self.waiting if (r.parent is not None) == forks]:
                if len(self.prefilling) + len(self.decoding) >= self.config.max_running:
                    break
                if blocked and not request.in_place:
                    continue
                need = self.pages_needed(request) + request.headroom
                if need > self.pool.free_pages and not blocked:
                    self.pool.reclaim()  # pages of sequences dropped without a release come back first
                if need > self.pool.free_pages or (blocked and need):
                    blocked = True  # a speculation's round in place, needing no page, still goes ahead: the pages
                    continue  # waited for may be held by the sequence that round would finish
                self._admit(request)
                self.waiting.remove(request)
                plan.admitted.append(request)
        budget = self.config.prefill_chunk_tokens
        for request in self.prefilling:
            if budget == 0:
                break
            start = request.prefilled
            end = min(len(request.prompt), start + budget)
            plan.prefill.append((request, start, end))
            budget -= end - start
        plan.decode = list(self.decoding)
        return plan

    def _admit(self, request: Request) -> None:
        """Give the request its sequence, with every page it will fill reserved (a fork shares its parent's; in
        place, the parent is its sequence)."""
        seq = request.parent if request.in_place else Sequence(self.pool)
        request.seq = seq
        with uninterrupted():
            if request.parent is not None and not request.in_place:
                seq.fork_from(request.parent)
            seq.reserve(request.total_tokens - seq.length)
        request.phase = Phase.PREFILL
        self.prefilling.append(request)

    def prefilled(self, request: Request) -> None:
        """The request's prompt is in its cache: it decodes from the next step on (or leaves, when it only
        prefills)."""
        self.prefilling.remove(request)
        if request.params is not None:
            request.phase = Phase.DECODE
            self.decoding.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out, wherever it is (it has finished, failed, or been aborted)."""
        for queue in (self.waiting, self.prefilling, self.decoding):
            if request in queue:
                queue.remove(request)
        request.phase = Phase.DONE
