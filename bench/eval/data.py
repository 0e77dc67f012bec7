"""Evaluation data: JSONL files, the TSV files VLMEvalKit distributes benchmarks in, and easy-VQA.

Every format becomes a list of Samples. Rows are read and checked before any model work: a malformed row stops
the run with its line number, unless the caller skips bad rows (then each is reported and left out).
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import json
import string
import sys
from dataclasses import dataclass
from pathlib import Path

from tandem.models.errors import InputError

EASY_VQA = "easy-vqa"
LETTERS = string.ascii_uppercase
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
REFERENCE_CHARS = 64  # a VLMEvalKit TSV image cell this short is the index of the row holding the image
# Which scorer a benchmark's TSV takes, from its file name (VLMEvalKit's names: MMBench_DEV_EN.tsv, POPE.tsv, ...).
TSV_SCORERS = (("pope", "yesno"), ("chartqa", "relaxed"), ("infovqa", "anls"), ("docvqa", "anls"))
# MMBench's CircularEval: rows index + k * CIRCULAR_STRIDE ask the question of row `index` with its options rotated,
# and the question counts as right only when every rotation is.
CIRCULAR = "mmbench"
CIRCULAR_STRIDE = 1_000_000


@dataclass(frozen=True)
class Sample:
    id: str  # unique in its dataset: the resume key
    image: bytes | str  # encoded image bytes, or a path or data URL
    question: str  # as given; `prompt` adds the options
    answers: tuple[str, ...]  # every accepted answer (for choices: the letter)
    choices: tuple[tuple[str, str], ...] = ()  # (letter, option text)
    hint: str = ""
    category: str = ""
    group: str = ""  # MMBench: the question its rotations share (scored together); "" for a sample on its own

    @property
    def prompt(self) -> str:
        """The question the model reads: with choices, the hint, options and an instruction to answer by letter."""
        if not self.choices:
            return self.question
        hint = f"Hint: {self.hint}\n" if self.hint else ""
        options = "".join(f"{letter}. {text}\n" for letter, text in self.choices)
        return f"{hint}Question: {self.question}\nOptions:\n{options}{CHOICE_INSTRUCTION}"


@dataclass(frozen=True)
class Dataset:
    name: str
    samples: list[Sample]
    scorer: str  # the scorer of its samples without choices (those with choices take `choice`)
    skipped: list[str]  # the bad rows left out (with --skip-bad-rows), each "line N: why"


def load_dataset(spec: str, skip_bad_rows: bool = False, limit: int | None = None) -> Dataset:
    """`spec`: "easy-vqa", or a .jsonl / .tsv file. `limit`: the first N samples."""
    if spec == EASY_VQA:
        return _easy_vqa(limit)
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--data {spec}: no such file (give a .jsonl or .tsv file, or {EASY_VQA})")
    if path.suffix.lower() == ".jsonl":
        rows, scorer = _jsonl_rows(path), "exact"
    elif path.suffix.lower() == ".tsv":
        scorer = _tsv_scorer(path)
        rows = _tsv_rows(path, lists=scorer == "anls", circular=CIRCULAR in path.stem.lower())
    else:
        raise InputError(f"--data {spec}: unknown format {path.suffix!r} (give a .jsonl or .tsv file, or {EASY_VQA})")
    samples, skipped, ids = [], [], set()
    for line, row in rows:
        try:
            sample = row() if callable(row) else row
            if sample.id in ids:
                raise InputError(f"id {sample.id!r} appears twice")
        except InputError as e:
            if not skip_bad_rows:
                raise InputError(f"{path}, line {line}: {e} (--skip-bad-rows leaves such rows out)") from None
            skipped.append(f"line {line}: {e}")
            continue
        ids.add(sample.id)
        samples.append(sample)
        if limit is not None and len(samples) == limit:
            break
    return Dataset(path.stem, samples, scorer, skipped)


# ---- JSONL ------------------------------------------------------------------------------------------------------
def _jsonl_rows(path: Path):
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, 1):
            if text.strip():
                yield number, lambda text=text, number=number: _jsonl_sample(text, number, path.parent)


def _jsonl_sample(text: str, number: int, folder: Path) -> Sample:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise InputError("a row must be a JSON object")
    unknown = sorted(set(row) - {"id", "image", "question", "answer", "choices", "hint", "category"})
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r} (a row has image, question, answer, and optionally id, "
                         "choices, hint, category)")
    for name in ("image", "question", "answer"):
        if name not in row:
            raise InputError(f"no {name!r} field")
    image = _text(row, "image")
    if not image.startswith("data:"):
        image = str(folder / image)
        if not Path(image).is_file():
            raise InputError(f"image {row['image']!r}: no such file (paths are relative to the JSONL file)")
    choices = _choices(row.get("choices"))
    answers = _answers(row["answer"], choices)
    return Sample(str(row.get("id", number)), image, _text(row, "question"), answers, choices,
                  _text(row, "hint", ""), _text(row, "category", ""))


def _text(row: dict, name: str, default: str | None = None) -> str:
    value = row.get(name, default)
    if not isinstance(value, str) or (default is None and not value.strip()):
        raise InputError(f"{name!r} must be a non-empty string, got {value!r}")
    return value


def _choices(value) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        value = dict(zip(LETTERS, value))
    if not isinstance(value, dict) or not value or len(value) > len(LETTERS):
        raise InputError(f"'choices' must be a list of options or a mapping A -> option, got {value!r}")
    for letter, text in value.items():
        if letter not in LETTERS or not isinstance(text, str) or not text.strip():
            raise InputError(f"choice {letter!r}: {text!r} (letters A-Z, each a non-empty option)")
    return tuple(sorted(value.items()))


def _answers(value, choices) -> tuple[str, ...]:
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise InputError(f"'answer' must be a non-empty string or a list of them, got {value!r}")
    if choices:
        letters = dict(choices)
        by_text = {text.strip().lower(): letter for letter, text in choices}
        answers = [a if a in letters else by_text.get(a.strip().lower(), a) for a in answers]
        unknown = [a for a in answers if a not in letters]
        if unknown:
            raise InputError(f"answer {unknown[0]!r} is neither a choice's letter nor its text")
    return tuple(answers)


# ---- VLMEvalKit TSV ------------------------------------------------------------------------------------------------
def _tsv_scorer(path: Path) -> str:
    """The scorer of the benchmark's open questions, by its file's name."""
    name = path.stem.lower()
    return next((scorer for key, scorer in TSV_SCORERS if key in name), "exact")


def _tsv_rows(path: Path, lists: bool, circular: bool):
    """VLMEvalKit's columns (written by pandas: a cell holding a tab, newline or quote is quoted): index, image
    (base64; or, when short, the index of the row holding it), question, answer, and optionally hint, A, B, C, ...
    and category. With `lists` (DocVQA, InfoVQA) an answer may be a Python list literal of accepted answers."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # an image cell is megabytes
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file, delimiter="\t")
        missing = sorted({"index", "image", "question", "answer"} - set(reader.fieldnames or ()))
        if missing:
            raise InputError(f"{path}: no {missing[0]!r} column (VLMEvalKit's TSV has index, image, question, answer, "
                             f"and for multiple choice A, B, ...); its columns: {reader.fieldnames}")
        rows, last = [], reader.line_num
        for row in reader:  # a row starts on the line after the last one's end (a quoted cell may span lines)
            rows.append((last + 1, row))
            last = reader.line_num
    images = {row["index"]: row["image"] for _, row in rows if row.get("image")}
    for line, row in rows:
        yield line, lambda row=row: _tsv_sample(row, images, lists, circular)


def _tsv_sample(row: dict, images: dict[str, str], lists: bool, circular: bool) -> Sample:
    if None in row or any(v is None for v in row.values()):
        raise InputError("the row's cells do not match the header's columns")
    index, image = row["index"].strip(), row["image"].strip()
    if not index:
        raise InputError("an empty index")
    if len(image) <= REFERENCE_CHARS:  # a reference to the row that holds the image
        image = images.get(image, "")
        if len(image) <= REFERENCE_CHARS:
            raise InputError(f"image {row['image']!r} is neither base64 image data nor the index of a row with one")
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"the image cell is not valid base64 ({e}); a list of images is not supported") from None
    choices = tuple((c, row[c].strip()) for c in LETTERS if row.get(c) and row[c].strip() and row[c] != "nan")
    answer = row["answer"].strip()
    if lists and answer.startswith("[") and answer.endswith("]"):
        try:
            answer = [str(a) for a in ast.literal_eval(answer)]
        except (ValueError, SyntaxError):
            raise InputError(f"answer {answer[:80]!r} looks like a list but does not parse") from None
    hint = (row.get("hint") or "").strip()
    group = str(int(index) % CIRCULAR_STRIDE) if circular and index.isdigit() else ""
    return Sample(index, data, row["question"].strip(), _answers(answer, choices), choices,
                  "" if hint == "nan" else hint, (row.get("category") or "").strip(), group)


# ---- easy-VQA ------------------------------------------------------------------------------------------------------
def _easy_vqa(limit: int | None) -> Dataset:
    """easy-VQA's test split (pip install easy-vqa): 64x64 images of one shape, questions on its shape and colour,
    one-word answers (yes / no for 74% of them)."""
    try:
        import easy_vqa
    except ImportError:
        raise InputError(f"--data {EASY_VQA} needs the easy-vqa package: pip install 'tandem-vlm[eval]'") from None
    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    count = len(questions) if limit is None else min(limit, len(questions))
    samples = [Sample(f"test-{i}", paths[image_ids[i]], questions[i], (answers[i],)) for i in range(count)]
    return Dataset(EASY_VQA, samples, "exact", [])


def data_url(image: bytes | str) -> str:
    """An image as a URL a server takes: a data URL (read from its file if `image` is a path)."""
    if isinstance(image, str) and image.startswith("data:"):
        return image
    data = Path(image).read_bytes() if isinstance(image, str) else image
    kind = "/png" if data[:4] == b"\x89PNG" else "/jpeg" if data[:2] == b"\xff\xd8" else ""
    return f"data:image{kind};base64," + base64.b64encode(data).decode()

