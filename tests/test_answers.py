"""Answer extraction and normalisation on outputs written the way Qwen3-VL writes them, and the agree/disagree pairs
that decide whether the "verify" policy stops early."""

from __future__ import annotations

import pytest

from tandem.runtime.answers import answers_agree, extract_answer, normalize_answer

CHART_REASONING = """Let me look at the line chart carefully.
The x-axis shows years from 1990 to 2010, and the y-axis shows sales in millions.
The line peaks above the 40 mark once, at the point labelled 1998.
After that it declines steadily until 2004.
So the answer is [[1998]]."""

TWO_BRACKETS = """First I considered [[2004]], because that bar looks tall at first glance.
Looking again, the 2004 bar reaches 35 while the 2007 bar reaches 38.
Therefore the tallest bar is in [[2007]]."""

MULTIPLE_CHOICE_STATEMENT = """The image shows a red double-decker bus next to a clock tower.
Option A (Paris) does not fit: the buses there are not red double-deckers.
Option B (London) matches both the bus and the tower.
The final answer is: B"""

MARKDOWN_ANSWER = """**Reasoning:** The sign on the door reads "OPEN" in green letters.

**Answer:** Yes"""

COUNTING_REASONING = """I need to count the apples in the bowl.
There is one apple on the left, one in the middle, and one partially hidden on the right.
That makes three apples in total.
Answer: 3"""

BOXED_REASONING = """Reading the bar for 2015: it sits exactly halfway between 10 and 15.
So the value is $\\boxed{12.5}$."""

YES_NO_REASONING = """The question asks whether the cat is on the table.
The cat is sitting on the floor beside the table leg, not on its surface.
So the answer is no, the cat is not on the table."""


@pytest.mark.parametrize(
    "output,expected",
    [
        (CHART_REASONING, "1998"),
        (TWO_BRACKETS, "2007"),  # the last [[...]] is the answer, earlier ones are drafts
        ("Looking at the legend, the blue segment is larger.\n[[ B ]]", "B"),
        ("The values are [[[1, 2]]]", "[1, 2]"),  # a list answer keeps its own brackets
        (MULTIPLE_CHOICE_STATEMENT, "B"),
        (MARKDOWN_ANSWER, "Yes"),
        (COUNTING_REASONING, "3"),
        (BOXED_REASONING, "12.5"),
        (YES_NO_REASONING, "no, the cat is not on the table"),
        ("The percentage for Germany is 3.5. The answer is 3.5.", "3.5"),  # decimal points do not end sentences
        ("Answer:\n\n(C) Blue", "(C) Blue"),
        ("The answer is $1.2 million.\nThis is read from the top bar.", "$1.2 million"),
        ("Yes.", "Yes."),  # a short answer is its own answer
        ("(C)", "(C)"),
        (" 42 \n", "42"),
        ("", ""),
    ],
)
def test_extract_answer(output, expected):
    assert extract_answer(output) == expected


@pytest.mark.parametrize(
    "answer,expected",
    [
        # multiple choice: the letter wins over the option text
        ("B", "b"),
        ("(B)", "b"),
        ("B.", "b"),
        ("B)", "b"),
        ("Option B", "b"),
        ("option (b)", "b"),
        ("B: Paris", "b"),
        ("(B) Paris", "b"),
        ("**C**", "c"),
        ("B. Paris", "b paris"),  # "X. text" may be a name ("J. Smith"), so it is not a letter
        # yes / no
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("Yes, it is.", "yes"),
        ("No, there isn't", "no"),
        ("No one", "no one"),  # "nobody", not "no"
        ("No. 5", "no 5"),  # "number 5"
        ("True", "true"),  # not mapped to "yes"
        # numbers
        ("1,234", "1234"),
        ("3.50", "3.5"),
        ("-0.0", "0"),
        (".5", "0.5"),
        ("−7", "-7"),  # U+2212 minus sign
        ("1,5", "1,5"),  # not "15"
        ("three", "3"),
        ("Forty-two", "42"),
        ("the red one", "red one"),  # number words only where the answer starts with one
        ("50%", "50%"),
        ("12 per cent", "12%"),
        ("$12", "12 $"),
        ("1.2 million dollars", "1200000 $"),
        ("12kg", "12 kg"),
        ("12 kilograms", "12 kg"),
        ("25 ℃", "25 °c"),
        # plain text: VQA normalisation
        ('"The Eiffel Tower."', "eiffel tower"),
        ("a red T-shirt", "red t shirt"),
        ("C++", "c++"),
        ("3:45", "3:45"),
        ("", ""),
    ],
)
def test_normalize_answer(answer, expected):
    assert normalize_answer(answer) == expected


@pytest.mark.parametrize(
    "large,small",
    [
        ("1998", CHART_REASONING),
        ("2007", TWO_BRACKETS),
        ("B", MULTIPLE_CHOICE_STATEMENT),
        ("(B) London", MULTIPLE_CHOICE_STATEMENT),
        ("yes", MARKDOWN_ANSWER),
        ("Yes.", "The light is green, so cars may go.\nSo the answer is [[Yes]]."),
        ("No", YES_NO_REASONING),
        ("No, the cat is not on the table.", "[[no]]"),
        ("three", COUNTING_REASONING),
        ("3", "There are three birds on the wire.\n[[three]]"),
        ("12.5", BOXED_REASONING),
        ("42", "Counting every tile in the grid gives forty-two.\n[[forty-two]]"),
        ("$1.2 million", "The revenue bar for 2020 reads 1.2 million.\n[[1.2 million dollars]]"),
        ("12%", "The pie slice is labelled 12 percent.\n[[12 percent]]"),
        ("1,234", "The label reads 1234.\n[[1234]]"),
        ("3.50", "[[3.5]]"),
        ("12kg", "[[12 kilograms]]"),
        ("The Eiffel Tower", "The landmark is in Paris.\n[[Eiffel tower]]"),
    ],
)
def test_answers_agree(large, small):
    assert answers_agree(large, small)
    assert answers_agree(small, large)


@pytest.mark.parametrize(
    "large,small",
    [
        ("B", "[[C]]"),
        ("B", "The final answer is: C"),
        ("12", "[[120]]"),
        ("yes", "[[no]]"),
        ("Yes, it is.", YES_NO_REASONING),
        ("2019", "The latest bar is 2018.\n[[2018]]"),
        ("2007", "First [[2007]], but on reflection [[2004]]."),  # only the last bracket counts
        ("12 kg", "[[12 g]]"),
        ("50", "[[50%]]"),  # percent is part of the meaning
        ("0.5", "[[50%]]"),
        ("$1.2 million", "[[$1.2 billion]]"),
        ("1.2 million", "[[$1.2 million]]"),  # a bare number never equals one with a unit
        ("True", "[[Yes]]"),
        ("No one", "[[No]]"),
        ("15", "[[1,5]]"),
        ("C", "[[C++]]"),
        ("A", "[[(A) and (B)]]"),  # two options named: not a single letter
        ("B", "[[(A) and (B)]]"),
        ("", ""),  # nothing to agree on
        ("B", "[[]]"),
    ],
)
def test_answers_disagree(large, small):
    assert not answers_agree(large, small)
    assert not answers_agree(small, large)
