"""A new user's mistakes with the `tandem` command: each is told in one line, `tandem: error: ...`, with exit
status 2, no traceback, and (where it can be checked without the weights) before any model loads."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tandem.runtime.cli import _parser

from conftest import random_image
from test_cli import tandem, tandem_all


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("files")
    good, broken, animated = folder / "good.png", folder / "broken.png", folder / "animated.gif"
    Image.fromarray(random_image(64, 64, seed=1)).save(good)
    broken.write_bytes(good.read_bytes()[:100])  # a PNG cut short: the header reads, the pixels do not
    frames = [Image.new("RGB", (32, 32), (80 * i, 0, 0)) for i in range(3)]
    frames[0].save(animated, save_all=True, append_images=frames[1:])
    return {"folder": folder, "good": good, "broken": broken, "animated": animated, "missing": folder / "missing.png"}


def test_mistakes_are_one_line_exit_2_and_refused_before_any_model_loads(tiny_2b, tiny_8b, files):
    """The checkpoints are fine in every case: what is wrong is found before they load (no "loading" line)."""
    generate = ["generate", "--model", tiny_2b, "--device", "cpu"]
    ask = ["ask", "--large", tiny_8b, "--small", tiny_2b, "--device", "cpu", "--image", files["good"]]
    cases = {  # the command -> what its one line must say
        ("generate", "--model", tiny_2b, "--device", "gpu", "hi"): "device 'gpu' is not a device name",
        ("generate", "--model", tiny_2b, "--kernel-backend", "triton", "--device", "cpu", "hi"):
            "kernel backend on cpu: the triton kernel backend needs CUDA tensors, or TRITON_INTERPRET=1",
        ("generate", "--model", files["folder"] / "nowhere", "hi"): "nowhere: no such checkpoint folder",
        ("generate", "--model", files["good"], "hi"): "good.png: is a file; expected a checkpoint folder",
        (*generate, "--image", files["good"], "--image", files["missing"], "hi"):
            f"image 1 ({files['missing']}): file not found",
        (*generate, "--image", files["broken"], "hi"): "broken.png): could not be decoded",
        (*generate, "--image", files["animated"], "hi"): "animated.gif): GIF image has 3 frames",
        (*ask, "--image", files["good"], "hi"): "the pair answers about one image; --image was given 2 times",
        (*ask, "--policy", "large", "--keep", "attention", "hi"): "--keep attention has no effect with --policy large",
        (*ask, "--policy", "transfer", "--delta", "0.8", "hi"): "--delta has no effect with --keep all",  # typed
        ("demo", "--model", tiny_2b, "--keep", "attention", "--policy", "small"): "--policy, --keep: no effect with "
                                                                                 "--model",
        ("demo", "--max-tokens", "5"): "--max-tokens: no effect without --model",
    }
    if not torch.cuda.is_available():
        cases[("generate", "--model", tiny_2b, "--device", "cuda", "hi")] = "device 'cuda': torch sees no CUDA device"
    # TRITON_INTERPRET (which the test process sets) would let Triton run on the CPU: a user's shell has none.
    runs = tandem_all(*cases, env={"TRITON_INTERPRET": None})
    for (command, says), done in zip(cases.items(), runs):
        assert done.returncode == 2 and done.stdout == "", (command, done.stderr)
        assert done.stderr.startswith("tandem: error: ") and done.stderr.count("\n") == 1, (command, done.stderr)
        assert says in done.stderr, (command, done.stderr)


@pytest.mark.parametrize("flag, value, says", [
    ("--max-tokens", "0", "must be a positive integer, got '0'"),
    ("--max-tokens", "many", "must be a positive integer, got 'many'"),
    ("--temperature", "-1", "must be a finite number >= 0"),
    ("--temperature", "nan", "must be a finite number >= 0"),
    ("--top-p", "0", "must be a number in (0, 1]"),
    ("--top-p", "1.5", "must be a number in (0, 1]"),
    ("--top-k", "-1", "must be an integer >= 0"),
    ("--seed", "-3", "must be an integer in [0, 2**64)"),
    ("--kv-cache-tokens", "0", "must be a positive integer"),
    ("--page-size", "-16", "must be a positive integer"),
    ("--short-tokens", "0", "must be a positive integer"),
    ("--reason-tokens", "1.5", "must be a positive integer"),
    ("--delta", "0", "must be a number in (0, 1]"),
    ("--delta", "inf", "must be a number in (0, 1]"),
])
def test_numbers_are_refused_by_the_parser_naming_the_flag(flag, value, says, capsys):
    pair = flag in ("--short-tokens", "--reason-tokens", "--delta")
    argv = (["ask", "--large", "L", "--small", "S", "--image", "x.png"] if pair else ["generate", "--model", "M"])
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args([*argv, flag, value, "a question"])
    assert exit_info.value.code == 2
    assert f"error: argument {flag}: {says}" in capsys.readouterr().err


def test_parser_errors_exit_2_and_an_empty_question_is_refused_before_loading(tiny_8b, tiny_2b, files):
    empty, zero = tandem_all(
        ["ask", "--large", tiny_8b, "--small", tiny_2b, "--image", files["good"], "  "],
        ["ask", "--large", tiny_8b, "--small", tiny_2b, "--image", files["good"], "--short-tokens", "0", "hi"])
    assert empty.returncode == zero.returncode == 2 and "Traceback" not in empty.stderr + zero.stderr
    assert empty.stderr.splitlines()[-1] == "tandem ask: error: argument question: must not be empty"
    assert zero.stderr.splitlines()[-1] == ("tandem ask: error: argument --short-tokens: must be a positive integer, "
                                            "got '0'")


def test_a_request_too_long_for_the_kv_cache_names_the_flags_that_size_it(tiny_2b):
    """--kv-cache-tokens and --page-size reach the engine (its message reports them); its refusal names the flags a
    command-line user changes."""
    done = tandem("generate", "--model", tiny_2b, "--device", "cpu", "--kv-cache-tokens", "64", "--page-size", "8",
                  "--no-cuda-graphs", "--max-tokens", "200", "hi")
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    loading, error = done.stderr.splitlines()
    assert loading.startswith("loading model from ") and loading.endswith(" s")
    assert error.startswith("tandem: error: prompt + max_tokens needs ") and "pages of 8" in error
    assert "capacity 64" in error and error.endswith("(flags: --kv-cache-tokens, --max-tokens)")
