"""A reply's text as its tokens arrive: incremental detokenization, stop ids and stop strings.

A stop string (SamplingParams.stop) ends the reply where it first appears; the reply's text is cut before it. So
that a stream never shows what the final text will not hold, the text is released only once it is settled: up to
a stop string once one has appeared, and otherwise all but a tail that could be the start of one. The engine's loop
keeps one per request with stop strings (to end it), and each stream keeps its own (to show it).
"""

from __future__ import annotations

from tandem.models.tokenizer import IncrementalDetokenizer, Tokenizer


class ReplyText:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None, stop_ids: frozenset[int],
                 stops: tuple[str, ...] = ()):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop_ids, self._stops = stop_ids, stops
        self._longest = max(map(len, stops), default=0)
        self.text = ""  # every piece decoded so far
        self.cut: int | None = None  # where the first stop string starts, once one has appeared
        self._shown = 0  # characters handed out by add()
        self._ended = False  # a stop id or a stop string came: later tokens add nothing

    @property
    def stopped(self) -> bool:
        """A stop string has appeared."""
        return self.cut is not None

    def add(self, tokens: list[int]) -> str:
        """Take the next generated ids; -> the text they settle (shown once, in order)."""
        for token in tokens:
            if self._ended or token in self._stop_ids:
                self._ended = True
                break
            start = max(0, len(self.text) - self._longest + 1)  # a stop string may end in the new piece
            self.text += self._detok.add(token)
            if self._stops:
                found = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
                if found:
                    self.cut, self._ended = min(found), True
        return self._show(self._settled())

    def finish(self) -> str:
        """At the reply's end: the rest of its text (incomplete bytes flushed, as decode() does)."""
        self.text += self._detok.flush()  # after a stop string this lands past the cut: the final text is as it was
        return self._show(len(self.final))

    @property
    def final(self) -> str:
        return self.text if self.cut is None else self.text[: self.cut]

    def _settled(self) -> int:
        """How much of the text no later token can change."""
        if self.cut is not None:
            return self.cut
        tail = self.text[-self._longest :] if self._longest else ""
        held = max((k for s in self._stops for k in range(1, len(s)) if tail.endswith(s[:k])), default=0)
        return len(self.text) - held

    def _show(self, end: int) -> str:
        piece = self.text[self._shown : end]
        self._shown = max(self._shown, end)
        return piece
