"""Scorers: a model's answer against a sample's accepted answers, each as its benchmark defines it.

- `choice` (MMBench, RealWorldQA, any multiple choice): the option letter the answer gives, found by rules
  ("B", "(B)", "B. a cat", "The answer is B", or the text of exactly one option; a leading "A" followed by words
  is read as the article); 1 when it is the right one. MMBench's own evaluation falls back on a GPT judge when its
  rules find no letter: here such an answer scores 0. (Its CircularEval, a question right only when all its
  rotations are, is the report's grouping: report.py.)
- `yesno` (POPE): POPE's own rule: keep the first sentence; "no" when it holds the word No, no or not, else "yes".
- `relaxed` (ChartQA): numbers within 5% of the answer (a trailing % read as a percentage), other answers equal
  ignoring case (pix2struct's `relaxed_correctness`, which ChartQA's papers use).
- `anls` (InfoVQA, DocVQA): 1 - normalized Levenshtein distance to the closest answer, 0 when that is 0.5 or more.
- `exact`: equal to an accepted answer after the VQA normalization (case, punctuation, articles, number words).
Each returns a score in [0, 1]; a benchmark's accuracy is their mean. A sample with options is scored by `choice`
unless a scorer is forced (`scorer_for`).
"""

from __future__ import annotations

import re

from tandem.bench.eval.data import Sample

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05
_NUMBER_WORDS = {"none": "0", **{w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}}
_ARTICLES = {"a", "an", "the"}


def score(scorer: str, prediction: str, sample: Sample) -> float:
    return SCORERS[scorer](prediction, sample)


def scorer_for(sample: Sample, default: str, forced: str | None = None) -> str:
    """The scorer of one sample: `forced` if given, else `choice` for a sample with options, else `default`."""
    return forced or ("choice" if sample.choices else default)


# ---- multiple choice -----------------------------------------------------------------------------------------------
def choice_letter(prediction: str, choices: tuple[tuple[str, str], ...]) -> str | None:
    """The option `prediction` picks, or None when the rules find none (or more than one)."""
    letters = [letter for letter, _ in choices]
    text = prediction.strip()
    article = re.match(r"^A\s+(?!(?:or|and)\b)[a-z]", text)  # "A blue square": the article, not option A
    alone = {m for m in re.findall(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", text[1 if article else 0:]) if m in letters}
    lead = None if article else re.match(r"^\(?([A-Z])\)?(?:[.:)]|\s|$)", text)  # "B", "(B)", "B.", "B) ..."
    if lead and lead.group(1) in letters and alone <= {lead.group(1)}:
        return lead.group(1)
    said = re.search(r"\b(?i:answer)(?: (?i:is))?\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])", text)
    if said and said.group(1) in letters:
        return said.group(1)
    if len(alone) == 1:
        return alone.pop()
    folded = f" {_squash(text)} "
    named = [letter for letter, option in choices if _squash(option) and f" {_squash(option)} " in folded]
    return named[0] if len(named) == 1 else None


def _choice(prediction: str, sample: Sample) -> float:
    return float(choice_letter(prediction, sample.choices) in sample.answers)


# ---- yes / no (POPE) -----------------------------------------------------------------------------------------------
def yes_or_no(prediction: str) -> str:
    """POPE's rule (its evaluate.py): the first sentence, commas dropped, split on spaces; "no" if it holds the
    word "No", "no" or "not", else "yes"."""
    first = prediction.split(".")[0] if "." in prediction else prediction
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def _yesno(prediction: str, sample: Sample) -> float:
    return float(yes_or_no(prediction) in {a.strip().lower() for a in sample.answers})


# ---- relaxed accuracy (ChartQA) ------------------------------------------------------------------------------------
def relaxed_correct(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    predicted, expected = _to_float(prediction.strip()), _to_float(target.strip())
    if predicted is not None and expected:  # a zero target falls back on string equality, as the definition does
        return abs(predicted - expected) / abs(expected) <= tolerance
    return prediction.strip().lower() == target.strip().lower()


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def _relaxed(prediction: str, sample: Sample) -> float:
    return float(any(relaxed_correct(prediction, a) for a in sample.answers))


# ---- ANLS (InfoVQA, DocVQA) ----------------------------------------------------------------------------------------
def anls(prediction: str, answers: tuple[str, ...], threshold: float = ANLS_THRESHOLD) -> float:
    best = 0.0
    got = " ".join(prediction.strip().lower().split())
    for answer in answers:
        want = " ".join(answer.strip().lower().split())
        longest = max(len(got), len(want))
        distance = levenshtein(got, want) / longest if longest else 0.0
        best = max(best, 0.0 if distance >= threshold else 1.0 - distance)
    return best


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _anls(prediction: str, sample: Sample) -> float:
    return anls(prediction, sample.answers)


# ---- exact match, VQA-normalized -----------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """The VQA normalization: lower case, a comma between digits dropped ("3,000": "3000"), other punctuation
    dropped (a period before a digit kept: "3.5"), number words (and "none") as digits, articles dropped, spaces
    collapsed."""
    text = text.lower().replace("\n", " ").replace("\t", " ")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"\.(?!\d)", " ", text)
    text = re.sub(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$:~|']", " ", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def _exact(prediction: str, sample: Sample) -> float:
    return float(normalize(prediction) in {normalize(a) for a in sample.answers})


def _squash(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


SCORERS = {"choice": _choice, "yesno": _yesno, "relaxed": _relaxed, "anls": _anls, "exact": _exact}
