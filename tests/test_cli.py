"""The `tandem` command, run in-process through its entry point."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tandem.runtime.cli import main

from conftest import random_image


def test_generate_prints_text_and_timings(tiny_2b, tmp_path, capsys):
    image = tmp_path / "cat.png"
    Image.fromarray(random_image(200, 260, seed=9)).save(image)
    assert main(["generate", "--model", str(tiny_2b), "--image", str(image), "--max-tokens", "5",
                 "--temperature", "0", "What animal is this?"]) == 0
    out = capsys.readouterr().out
    assert "[length] vision" in out and "for 5 tokens" in out and "(cpu, float32)" in out


def test_demo_builds_the_tiny_model_once_and_says_it_is_random(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["demo", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "weights are random" in out and "demo.png" in out and "for 4 tokens" in out
    built = list((tmp_path / "tandem").iterdir())
    assert len(built) == 1
    mtime = (built[0] / "config.json").stat().st_mtime_ns
    assert main(["demo", "--max-tokens", "2"]) == 0
    assert (built[0] / "config.json").stat().st_mtime_ns == mtime


def test_errors_are_one_line_and_exit_2(tiny_2b, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_2b), "--image", str(tmp_path / "missing.png"), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tandem: error:") and "missing.png" in err
    assert main(["generate", "--model", str(tmp_path), "hi"]) == 2
    assert "config.json" in capsys.readouterr().err
