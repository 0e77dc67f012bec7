"""Answer extraction and normalisation, so the "verify" policy can tell whether two models gave the same answer.

A false "agree" costs accuracy (the cheap answer is kept) while a false "disagree" only costs latency (the expensive
stage runs), so every rule below is strict when an answer is ambiguous. Decisions for the unclear cases:

- Multiple choice: "B", "(B)", "B.", "B)", "B: Paris", "B) Paris", "(B) Paris", "Option B", "option (b) Paris" -> "b"
  (letters A-J; the letter wins over the option text). "B. Paris" is NOT a letter, because "J. Smith" is a name.
  An answer naming two options ("(A) and (B)") is not a letter either.
- Yes/no: "Yes", "yes.", "Yes, it is.", "No, there isn't" -> "yes"/"no"; "yes" or "no" must stand alone or be followed
  by , ; ! or a full stop ("No one", "No smoking" and "No. 5" are not "no"). "True"/"False" are NOT mapped to yes/no:
  they are also literal answers (a label, a truth-table cell), and the prompts ask yes/no questions in yes/no words.
- Numbers: "1,234" -> "1234", "3.50" -> "3.5", "-0.0" -> "0", ".5" -> "0.5"; a European "1,5" is not a number and
  stays distinct from "15". Number words zero..ninety-nine ("three", "forty-two") -> digits, but only where the answer
  starts with one ("the red one" is left alone). "none" is NOT 0 (it is also an option text, "none of the above").
- Scale words multiply: "1.2 million" == "1200000", "12k" == "12000" ("m" and "b" are not scales: metres, bytes).
- Units follow the number as "NUMBER UNIT": "12kg" == "12 kg" == "12 kilograms" -> "12 kg"; different units stay
  different, and a bare number never equals one with a unit ("50" != "50%", "12" != "$12").
- Percent is part of the meaning: "12%" == "12 percent" == "12 per cent" -> "12%".
- Currency: "$12" == "12 dollars" == "12 USD" -> "12 $", so "$1.2 million" == "1.2 million dollars" ("1200000 $").
- Otherwise the VQA normalisation: articles (a, an, the) and punctuation are dropped, except punctuation between digits
  ("3:45", "1/2"); symbols such as "+" stay, so "C++" is not "C".
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal

# Extraction -------------------------------------------------------------------------------------------------------

# "[[...]]" whose content holds no "[[" and whose "]]" is the last of a run, so "[[[1, 2]]]" yields "[1, 2]".
_BRACKETED = re.compile(r"\[\[((?:(?!\[\[).)*?)\]\](?!\])", re.S)
# Qwen models write \boxed{...} out of habit from maths data even when asked for [[...]]; one level of nested braces.
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
# "the answer is X", "Answer: X", "Final answer: X", "**Answer:** X", "The final answer is: X".
_ANSWER_LEAD = re.compile(r"\banswer\b[*_]*\s*(?:is\b|:)\s*:?[*_]*\s*", re.I)
# A sentence ends at a line break or at . ! ? followed by a space or the end, so "3.5" and "U.S" survive.
_SENTENCE_END = re.compile(r"\n|[.!?](?=\s|$)")


def extract_answer(text: str) -> str:
    """The final answer in a model output: the LAST [[...]] if any (else the last \\boxed{...}); else the last "the
    answer is X" / "Answer: X" / "Final answer: X" statement (X up to the sentence end); else the whole text stripped
    (a short answer is its own answer). Never raises; empty text -> ""."""
    for marker in (_BRACKETED, _BOXED):
        found = marker.findall(text)
        if found:
            return found[-1].strip()
    for lead in reversed(list(_ANSWER_LEAD.finditer(text))):
        stated = _SENTENCE_END.split(text[lead.end() :], maxsplit=1)[0].strip()
        if stated:  # "Answer:" with nothing after it is a heading, not an answer
            return stated
    return text.strip()


# Normalisation ----------------------------------------------------------------------------------------------------

_BRACKETS = {"(": ")", "[": "]", "{": "}"}
_QUOTES = "\"'“”‘’«»`"
_TRAILING = ".!?,;:。"
_APOSTROPHES = "'’"
_ARTICLES = {"a", "an", "the"}

# Multiple-choice forms, tried with fullmatch on the cleaned answer; group 2 is whatever follows the letter.
_CHOICE_FORMS = (
    re.compile(r"(?:option|choice)\s*\(?([a-j])\)?(?!\w)(.*)"),  # "option b", "option (b) paris", "choice c: x"
    re.compile(r"\(([a-j])\)(.*)"),  # "(b) paris"
    re.compile(r"([a-j])(?:[:)](.*))?"),  # "b", "b: paris", "b) paris"
)
_ANOTHER_OPTION = re.compile(r"\([a-j]\)|(?<!\w)[a-j][:)]|\b(?:option|choice)\s*\(?[a-j]\b")
_YES_NO = re.compile(r"(yes|no)(?:$|[,;!]|\.(?!\s*\d))")

_SMALL_NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER_WORD = re.compile(
    rf"(?:(?P<tens>{'|'.join(_TENS)})(?:[- ](?P<unit>{'|'.join(_SMALL_NUMBERS[1:10])}))?"
    rf"|(?P<small>{'|'.join(sorted(_SMALL_NUMBERS, key=len, reverse=True))}))(?![\w-])"
)
_CURRENCY_SYMBOLS = "$€£¥₹"
_NUMBER = re.compile(
    rf"(?P<sign>[-+]?)(?P<currency>[{_CURRENCY_SYMBOLS}]?)\s*(?P<sign2>[-+]?)"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?![\d.,:/])\s*(?P<rest>.*)"
)
_SCALES = {
    "thousand": Decimal(10) ** 3,
    "k": Decimal(10) ** 3,
    "million": Decimal(10) ** 6,
    "billion": Decimal(10) ** 9,
    "bn": Decimal(10) ** 9,
    "trillion": Decimal(10) ** 12,
}
_UNIT_ALIASES = {
    "%": ("%", "percent", "per cent", "pct"),
    "$": ("$", "usd", "dollar", "dollars"),
    "€": ("€", "eur", "euro", "euros"),
    "£": ("£", "gbp"),  # not "pounds": that is also a weight
    "¥": ("¥", "yen"),
    "₹": ("₹", "inr", "rupee", "rupees"),
    "kg": ("kg", "kgs", "kilogram", "kilograms"),
    "g": ("g", "gram", "grams"),
    "mg": ("mg", "milligram", "milligrams"),
    "lb": ("lb", "lbs"),
    "km": ("km", "kilometer", "kilometers", "kilometre", "kilometres"),
    "m": ("m", "meter", "meters", "metre", "metres"),
    "cm": ("cm", "centimeter", "centimeters", "centimetre", "centimetres"),
    "mm": ("mm", "millimeter", "millimeters", "millimetre", "millimetres"),
    "mi": ("mi", "mile", "miles"),
    "ft": ("ft", "foot", "feet"),
    "inch": ("inch", "inches"),  # not "in": "12 in total"
    "l": ("l", "liter", "liters", "litre", "litres"),
    "ml": ("ml", "milliliter", "milliliters", "millilitre", "millilitres"),
    "s": ("s", "sec", "secs", "second", "seconds"),
    "min": ("min", "mins", "minute", "minutes"),
    "h": ("h", "hr", "hrs", "hour", "hours"),
    "day": ("day", "days"),
    "year": ("year", "years", "yr", "yrs"),
    "°": ("°", "degree", "degrees"),
    "°c": ("°c", "celsius", "degrees celsius"),
    "°f": ("°f", "fahrenheit", "degrees fahrenheit"),
}
_UNITS = {alias: unit for unit, aliases in _UNIT_ALIASES.items() for alias in aliases}


def normalize_answer(answer: str) -> str:
    """Canonical form for comparison (see the module docstring for the rules and the decisions behind them)."""
    text = _clean(answer)
    return _choice_letter(text) or _yes_no(text) or _number(_digits_for_number_word(text)) or _plain_text(text)


def answers_agree(a: str, b: str) -> bool:
    """Whether two model outputs give the same non-empty answer after extraction and normalisation."""
    first = normalize_answer(extract_answer(a))
    return bool(first) and first == normalize_answer(extract_answer(b))


def _clean(answer: str) -> str:
    """NFKC, lowercase, single spaces, and no wrapping quotes, brackets, markdown, $...$ maths or trailing period."""
    text = " ".join(unicodedata.normalize("NFKC", answer).replace("−", "-").lower().split())
    while True:
        unwrapped = text.rstrip(_TRAILING).strip("*` ")
        if len(unwrapped) >= 2 and (
            _is_wrapped(unwrapped)
            or (unwrapped[0] in _QUOTES and unwrapped[-1] in _QUOTES)
            or unwrapped[0] == unwrapped[-1] == "$"  # LaTeX inline maths: "$42$"
        ):
            unwrapped = unwrapped[1:-1].strip()
        if unwrapped == text:
            return text
        text = unwrapped


def _is_wrapped(text: str) -> bool:
    """Whether the bracket opening the text is closed by its last character ("(a) and (b)" is not wrapped)."""
    close = _BRACKETS.get(text[0])
    if close is None or text[-1] != close:
        return False
    depth = 0
    for i, char in enumerate(text):
        depth += (char == text[0]) - (char == close)
        if depth == 0:
            return i == len(text) - 1
    return False


def _choice_letter(text: str) -> str:
    for form in _CHOICE_FORMS:
        match = form.fullmatch(text)
        if match:
            # "(a) and (b)" names two options: no single letter stands for it.
            return "" if _ANOTHER_OPTION.search(match.group(2) or "") else match.group(1)
    return ""


def _yes_no(text: str) -> str:
    match = _YES_NO.match(text)
    return match.group(1) if match else ""


def _digits_for_number_word(text: str) -> str:
    """Spell a leading number word as digits: "three" -> "3", "forty-two apples" -> "42 apples"."""
    match = _NUMBER_WORD.match(text)
    if not match:
        return text
    if match["small"]:
        value = _SMALL_NUMBERS.index(match["small"])
    else:
        value = 20 + 10 * _TENS.index(match["tens"]) + (_SMALL_NUMBERS.index(match["unit"]) if match["unit"] else 0)
    return f"{value}{text[match.end():]}"


def _number(text: str) -> str:
    """ "NUMBER" or "NUMBER UNIT" ("12%", "1200000 $"), or "" when the text does not start with a number."""
    match = _NUMBER.fullmatch(text)
    # What follows the number must be a word, a symbol or "%" ("12kg", "50%"), not "-2020" or "(approx)".
    rest_start = match["rest"][:1] if match else ""
    if not match or (rest_start not in ("", "%") and unicodedata.category(rest_start)[0] in "NP"):
        return ""
    value = Decimal(match["digits"].replace(",", ""))
    if "-" in match["sign"] + match["sign2"]:
        value = -value
    words = match["rest"].split()
    if words and words[0] in _SCALES:
        value *= _SCALES[words.pop(0)]
    rest = " ".join(words)
    unit = _UNITS.get(rest) or _plain_text(rest)
    currency = _UNITS.get(match["currency"], "")
    units = " ".join(dict.fromkeys(u for u in (unit, currency) if u))  # "$12 dollars" names one currency once
    number = "0" if value == 0 else format(value.normalize(), "f")  # normalize: "3.50" -> "3.5", "-0.0" -> "0"
    if units == "%":
        return f"{number}%"
    return f"{number} {units}" if units else number


def _plain_text(text: str) -> str:
    """The standard VQA normalisation: no punctuation (except between digits) and no articles."""
    chars = []
    for i, char in enumerate(text):
        between_digits = 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()
        if unicodedata.category(char).startswith("P") and not between_digits:
            char = "" if char in _APOSTROPHES else " "  # "isn't" -> "isnt", "t-shirt" -> "t shirt"
        chars.append(char)
    return " ".join(word for word in "".join(chars).split() if word not in _ARTICLES)
