"""Stop strings: a reply ends where one first appears in its text, cut before it; a stream shows exactly that text.

The reference is the same greedy request without stop strings (itself held equal to transformers by the parity
tests): its text cut at the stop string's first occurrence, and its ids up to the one that completed it.
"""

from __future__ import annotations

import pytest

from tandem.models.errors import InputError
from tandem.runtime import Engine, SamplingParams

PROMPT = "Write a long story about a lighthouse keeper."


@pytest.fixture(scope="module")
def engine(tiny_2b) -> Engine:
    return Engine.from_pretrained(tiny_2b, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def free(engine):
    return engine.generate(PROMPT, SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))


def ids_until(engine, ids: list[int], stop: str) -> list[int]:
    """The shortest prefix of `ids` whose text holds `stop`."""
    return next(ids[:n] for n in range(1, len(ids) + 1) if stop in engine.tokenizer.decode(ids[:n]))


def middle_substring(text: str, at: int, length: int) -> str:
    piece = text[at : at + length]
    assert len(piece) == length and piece.strip(), text  # the random reply is long enough to cut from
    return piece


@pytest.mark.parametrize("at", [0, 9, 40])
def test_a_stop_string_cuts_the_text_and_ends_the_reply(engine, free, at):
    stop = middle_substring(free.text, at, 3)
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, stop=[stop])
    out = engine.generate(PROMPT, params)
    assert out.text == free.text[: free.text.find(stop)]
    assert out.token_ids == ids_until(engine, free.token_ids, stop)
    assert out.finish_reason == "stop"
    assert "".join(engine.stream(PROMPT, params)) == out.text  # a stream never shows what the cut removes
    assert engine.pool.pages_in_use == 0


def test_the_earliest_of_several_stop_strings_wins(engine, free):
    late, early = middle_substring(free.text, 30, 4), middle_substring(free.text, 12, 2)
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, stop=(late, early))
    out = engine.generate(PROMPT, params)
    first = min(free.text.find(late), free.text.find(early))
    assert out.text == free.text[:first] and out.finish_reason == "stop"


def test_a_stop_string_that_never_appears_changes_nothing(engine, free):
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, stop=["\x00never\x00"])
    out = engine.generate(PROMPT, params)
    assert (out.text, out.token_ids, out.finish_reason) == (free.text, free.token_ids, "length")
    assert "".join(engine.stream(PROMPT, params)) == free.text


@pytest.mark.parametrize("stop, named", [([""], "stop[0]"), (["ok", 3], "stop[1]"), (5, "SamplingParams.stop")])
def test_bad_stop_strings_are_refused_by_name(stop, named):
    with pytest.raises(InputError, match=named.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(stop=stop)
