"""The scorers against their benchmarks' published definitions, on answers as models write them. Expected scores
are worked out by hand from the definitions (MMBench's option matching, POPE's evaluate.py rule, pix2struct's
relaxed_correctness for ChartQA, the ANLS of DocVQA / InfoVQA, the VQA answer normalization)."""

from __future__ import annotations

import pytest

from tandem.bench.eval.data import Sample
from tandem.bench.eval.scoring import anls, choice_letter, levenshtein, normalize, score, scorer_for, yes_or_no

CHOICES = (("A", "a red circle"), ("B", "a blue square"), ("C", "a green triangle"), ("D", "nothing"))


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("(C)", "C"), ("D. nothing", "D"), ("A) a red circle", "A"), ("C\n", "C"),
    ("The answer is B.", "B"), ("Answer: (D)", "D"), ("I think the correct option is C", "C"),
    ("a blue square", "B"), ("It shows a green triangle on white.", "C"), ("The answer is a blue square.", "B"),
    ("A blue square", "B"),  # "A" the article, as VLMEvalKit reads it, not option A
    ("A and C", None),
    ("A or B", None), ("a circle or a square", None), ("Unsure.", None), ("E", None),
])
def test_the_option_letter_an_answer_gives(answer, letter):
    assert choice_letter(answer, CHOICES) == letter


def test_choice_scores_the_right_letter_only():
    sample = Sample("0", b"", "What is drawn?", ("C",), CHOICES)
    assert [score("choice", a, sample) for a in ("C", "The answer is C.", "a green triangle", "B", "A or C")] == \
           [1.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("answer, verdict", [
    ("Yes, there is a dog in the image.", "yes"), ("Yes", "yes"), ("No.", "no"), ("no", "no"),
    ("There is no dog in the image.", "no"), ("The image does not contain a cat. Yes, maybe.", "no"),
    ("No, there is not.", "no"), ("There is a dog, not a cat.", "no"),  # the rule's word "not", as POPE counts it
    ("Nope", "yes"), ("NO", "yes"),  # POPE's rule matches the words No, no and not only
    ("I see a person. No other objects.", "yes"),  # only the first sentence counts
])
def test_pope_yes_or_no(answer, verdict):
    assert yes_or_no(answer) == verdict


def test_yesno_scores_against_the_label():
    assert score("yesno", "No, there is none.", Sample("0", b"", "Is there a cat?", ("no",))) == 1.0
    assert score("yesno", "Yes.", Sample("0", b"", "Is there a cat?", ("no",))) == 0.0


@pytest.mark.parametrize("answer, target, right", [
    ("12.5", "12", True),  # 4.2% off
    ("13", "12", False),  # 8.3% off
    ("19", "20", True), ("18.9", "20", False),  # 5% exactly is in, 5.5% is out
    ("25%", "0.25", True),  # a percentage is read as a fraction
    ("0", "0", True), ("0.01", "0", False),  # a zero target needs the same string
    ("Yes", "yes", True), ("Germany", "germany ", True), ("France", "Germany", False),
    ("about 12", "12", False),  # not a number: string equality
])
def test_chartqa_relaxed_accuracy(answer, target, right):
    assert score("relaxed", answer, Sample("0", b"", "q", (target,))) == float(right)


def test_anls_is_one_minus_the_normalized_distance_to_the_closest_answer():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert anls("Apple Inc", ("apple inc.",)) == pytest.approx(1 - 1 / 10)  # case and spaces folded, 1 edit in 10
    assert anls("  APPLE   inc. ", ("apple inc.",)) == 1.0
    assert anls("Appl", ("Apple Inc",)) == 0.0  # 5 edits in 9: at or past the 0.5 threshold
    assert anls("Microsft", ("Apple", "Microsoft")) == pytest.approx(1 - 1 / 9)  # the best of the answers
    assert anls("abcd", ("abef",)) == 0.0  # exactly 0.5: scored 0, as the definition's strict threshold says
    assert score("anls", "1995", Sample("0", b"", "q", ("1995", "in 1995"))) == 1.0


@pytest.mark.parametrize("answer, accepted, right", [
    ("Two", ("2",), True), ("The circle.", ("circle",), True), ("circle", ("Circle",), True),
    ("a red triangle", ("red triangle",), True), ("3.5", ("3.5",), True), ("yes!", ("yes",), True),
    ("Triangle shape", ("triangle",), False), ("blue", ("red", "green"), False), ("green", ("red", "green"), True),
])
def test_exact_match_after_vqa_normalization(answer, accepted, right):
    assert score("exact", answer, Sample("0", b"", "q", accepted)) == float(right)


def test_normalization_keeps_decimal_points_and_drops_articles():
    assert normalize("The answer: 3.5 apples, an orange!") == "answer 3.5 apples orange"
    assert (normalize("12."), normalize("3,000 people"), normalize("None")) == ("12", "3000 people", "0")


def test_a_sample_with_options_is_scored_by_its_letter_unless_a_scorer_is_forced():
    with_options = Sample("0", b"", "q", ("B",), CHOICES)
    open_question = Sample("1", b"", "q", ("circle",))
    assert [scorer_for(s, "exact") for s in (with_options, open_question)] == ["choice", "exact"]
    assert scorer_for(with_options, "exact", forced="anls") == "anls"
