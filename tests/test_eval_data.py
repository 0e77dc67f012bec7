"""`tandem eval`'s data formats: JSONL, VLMEvalKit's TSV (base64 images, image references, options, hints, list
answers) and easy-VQA; malformed rows named by line, or skipped when asked."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from tandem.bench.eval.data import CHOICE_INSTRUCTION, data_url, load_dataset
from tandem.bench.eval.scoring import scorer_for
from tandem.models.errors import InputError

from conftest import random_image


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(random_image(12, 10, seed)).save(buffer, "PNG")
    return buffer.getvalue()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png(1))
    return tmp_path


def test_jsonl_rows_become_samples(folder):
    url = "data:image/png;base64," + base64.b64encode(png(2)).decode()
    path = write_jsonl(folder / "my.jsonl", [
        {"image": "img/a.png", "question": "What shape?", "answer": ["circle", "a circle"], "category": "shape"},
        {"id": "q2", "image": url, "question": "Which colour?", "choices": ["red", "blue"], "answer": "blue"},
        {"image": "img/a.png", "question": "Which?", "choices": {"A": "cat", "B": "dog"}, "answer": "A",
         "hint": "An animal."},
    ])
    data = load_dataset(str(path))
    first, second, third = data.samples
    assert data.name == "my" and data.scorer == "exact"  # for the open question; those with options: choice
    assert (first.id, first.image, first.answers, first.category) == ("1", str(folder / "img/a.png"),
                                                                      ("circle", "a circle"), "shape")
    assert first.prompt == "What shape?"
    assert second.id == "q2" and second.image == url
    assert second.choices == (("A", "red"), ("B", "blue")) and second.answers == ("B",)  # the option's text: B
    assert third.prompt == f"Hint: An animal.\nQuestion: Which?\nOptions:\nA. cat\nB. dog\n{CHOICE_INSTRUCTION}"


BAD_ROWS = {
    "not json": ('{"image": "img/a.png", "question": ', "not valid JSON"),
    "no answer": ({"image": "img/a.png", "question": "q"}, "no 'answer' field"),
    "missing image": ({"image": "img/none.png", "question": "q", "answer": "x"}, "image 'img/none.png': no such file"),
    "unknown field": ({"image": "img/a.png", "question": "q", "answer": "x", "label": 1}, "unknown field 'label'"),
    "empty question": ({"image": "img/a.png", "question": " ", "answer": "x"}, "'question' must be a non-empty"),
    "answer not a choice": ({"image": "img/a.png", "question": "q", "choices": ["a", "b"], "answer": "c"},
                            "answer 'c' is neither a choice's letter nor its text"),
    "answer type": ({"image": "img/a.png", "question": "q", "answer": 3}, "'answer' must be a non-empty string"),
}


@pytest.mark.parametrize("case", BAD_ROWS, ids=list(BAD_ROWS))
def test_a_malformed_jsonl_row_is_named_by_its_line_or_skipped(folder, case):
    row, message = BAD_ROWS[case]
    good = {"image": "img/a.png", "question": "q", "answer": "x"}
    path = write_jsonl(folder / "d.jsonl", [good, row, good])
    with pytest.raises(InputError, match=rf"d.jsonl, line 2: .*{message}.*--skip-bad-rows"):
        load_dataset(str(path))
    data = load_dataset(str(path), skip_bad_rows=True)
    assert [s.id for s in data.samples] == ["1", "3"]
    assert len(data.skipped) == 1 and data.skipped[0].startswith("line 2: ")


def test_repeated_ids_are_refused(folder):
    row = {"id": "x", "image": "img/a.png", "question": "q", "answer": "y"}
    with pytest.raises(InputError, match="line 2: id 'x' appears twice"):
        load_dataset(str(write_jsonl(folder / "d.jsonl", [row, row])))


def tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    return path


def test_vlmevalkit_tsv_rows_with_base64_images_references_and_options(tmp_path):
    a, b = base64.b64encode(png(3)).decode(), base64.b64encode(png(4)).decode()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    path = tsv(tmp_path / "MMBench_DEV_EN.tsv", header, [
        ["10", "What is shown?", "nan", "a cat", "a dog", "a cow", "nan", "B", "animals", a],
        ["11", "How many?", "Count them.", "1", "2", "nan", "nan", "A", "count", "10"],  # image: row 10's
        ["12", "Which?", "nan", "x", "y", "nan", "nan", "B", "other", b],
    ])
    data = load_dataset(str(path))
    first, second, third = data.samples
    assert data.name == "MMBench_DEV_EN" and data.scorer == "exact" and all(s.choices for s in data.samples)
    assert first.image == png(3) and second.image == png(3) and third.image == png(4)
    assert first.choices == (("A", "a cat"), ("B", "a dog"), ("C", "a cow")) and first.answers == ("B",)
    assert first.hint == "" and second.hint == "Count them." and second.category == "count"
    assert second.prompt.startswith("Hint: Count them.\nQuestion: How many?\nOptions:\nA. 1\nB. 2\n")


@pytest.mark.parametrize("name, scorer", [("POPE.tsv", "yesno"), ("ChartQA_TEST.tsv", "relaxed"),
                                          ("InfoVQA_VAL.tsv", "anls"), ("RealWorldQA.tsv", "choice"),
                                          ("Other.tsv", "exact")])
def test_each_benchmarks_tsv_gets_its_scorer(tmp_path, name, scorer):
    image = base64.b64encode(png(5)).decode()
    options = ["A", "B"] if name.startswith("RealWorld") else []
    header = ["index", "image", "question", *options, "answer"]
    answer = "['Apple Inc', 'apple']" if name.startswith("Info") else "A" if options else "yes"
    data = load_dataset(str(tsv(tmp_path / name, header, [["0", image, "q?", *["x", "y"][:len(options)], answer]])))
    assert scorer_for(data.samples[0], data.scorer) == scorer
    if name.startswith("Info"):
        assert data.samples[0].answers == ("Apple Inc", "apple")  # VLMEvalKit's list literal


def test_a_malformed_tsv_row_is_named_by_its_line(tmp_path):
    image = base64.b64encode(png(6)).decode()
    header = ["index", "image", "question", "answer"]
    path = tsv(tmp_path / "POPE.tsv", header, [["0", image, "q?", "yes"], ["1", "@@" * 40, "q?", "no"],
                                               ["2", "99", "q?", "no"]])
    with pytest.raises(InputError, match=r"POPE.tsv, line 3: the image cell is not valid base64"):
        load_dataset(str(path))
    data = load_dataset(str(path), skip_bad_rows=True)
    assert [s.id for s in data.samples] == ["0"]
    assert data.skipped[1].startswith("line 4: image '99' is neither base64 image data nor the index")
    with pytest.raises(InputError, match="no 'answer' column"):
        load_dataset(str(tsv(tmp_path / "x.tsv", ["index", "image", "question"], [["0", image, "q"]])))


def test_easy_vqa_is_the_packages_test_split():
    easy_vqa = pytest.importorskip("easy_vqa")
    questions, answers, image_ids = easy_vqa.get_test_questions()
    data = load_dataset("easy-vqa", limit=20)
    assert len(data.samples) == 20 and data.scorer == "exact"
    for i, sample in enumerate(data.samples):
        assert (sample.question, sample.answers) == (questions[i], (answers[i],))
        assert Image.open(sample.image).size == (64, 64)
        assert Path(sample.image).name == f"{image_ids[i]}.png"


def test_unknown_data_is_refused(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_dataset(str(tmp_path / "none.jsonl"))
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(InputError, match="unknown format '.csv'"):
        load_dataset(str(tmp_path / "d.csv"))


def test_data_urls_carry_the_bytes():
    data = png(7)
    url = data_url(data)
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == data


def test_a_tsv_as_pandas_writes_it_quoted_cells_spanning_lines(tmp_path):
    """pandas (which writes VLMEvalKit's files) quotes a cell holding a tab, a newline or a quote."""
    image = base64.b64encode(png(8)).decode()
    path = tmp_path / "MMBench_DEV_EN.tsv"
    with path.open("w", newline="", encoding="utf-8-sig") as file:  # with the BOM some tools write
        writer = csv.writer(file, delimiter="\t", lineterminator="\n")
        writer.writerow(["index", "question", "hint", "A", "B", "answer", "image"])
        writer.writerow(["0", 'He said "hi". Who?', "two\nlines", "Ann", "Bob", "A", image])
        writer.writerow(["1", "Bad?", "nan", "x", "y", "A", "@@" * 40])
        writer.writerow(["1000000", 'He said "hi". Who?', "two\nlines", "Bob", "Ann", "B", "0"])
    with pytest.raises(InputError, match=r"MMBench_DEV_EN.tsv, line 4: the image cell is not valid base64"):
        load_dataset(str(path))  # the second row starts on line 4: the first one's hint spans lines 2-3
    first, rotated = load_dataset(str(path), skip_bad_rows=True).samples
    assert first.question == 'He said "hi". Who?' and first.hint == "two\nlines" and first.image == png(8)
    assert (first.group, rotated.group) == ("0", "0")  # CircularEval: one question, its options rotated
    assert rotated.choices == (("A", "Bob"), ("B", "Ann")) and rotated.image == png(8)


def test_list_answers_only_where_the_benchmark_has_them(tmp_path):
    image = base64.b64encode(png(9)).decode()
    header = ["index", "image", "question", "answer"]
    chart = load_dataset(str(tsv(tmp_path / "ChartQA_TEST.tsv", header, [["0", image, "q", "[1, 2]"]])))
    assert chart.samples[0].answers == ("[1, 2]",)  # an answer that looks like a list, not a list of answers
