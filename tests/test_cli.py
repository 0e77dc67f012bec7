"""The `tandem` command, run in-process through its entry point."""

from __future__ import annotations

import json
import re
from importlib.metadata import entry_points
from pathlib import Path

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


def test_demo_runs_the_pair_on_tiny_models_built_once_and_says_they_are_random(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["demo", "--reason-tokens", "8", "--short-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "weights are random" in out and "demo.png" in out and "policy: verify" in out
    assert " 1 large  answer" in out and " 2 small  reason" in out
    built = sorted(p.name for p in (tmp_path / "tandem").iterdir())
    assert built == ["tiny-2b-like-1", "tiny-8b-like-1"]
    mtime = (tmp_path / "tandem" / built[0] / "config.json").stat().st_mtime_ns
    assert main(["demo", "--policy", "small", "--short-tokens", "2"]) == 0
    assert (tmp_path / "tandem" / built[0] / "config.json").stat().st_mtime_ns == mtime


def test_demo_with_a_model_runs_generate(tiny_2b, capsys):
    assert main(["demo", "--model", str(tiny_2b), "--max-tokens", "3"]) == 0
    assert "for 3 tokens" in capsys.readouterr().out


def test_ask_prints_the_stage_table_or_json(tiny_8b, tiny_2b, tmp_path, capsys):
    image = tmp_path / "chart.png"
    Image.fromarray(random_image(220, 300, seed=3)).save(image)
    common = ["ask", "--large", str(tiny_8b), "--small", str(tiny_2b), "--image", str(image), "--reason-tokens", "8",
              "--short-tokens", "4", "Which year had the highest sales?"]
    assert main(common + ["--policy", "transfer", "--keep", "attention"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and " 2 large  transfer" in out
    assert main(common + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["policy"] == "verify" and [s["role"] for s in data["stages"]][:2] == ["answer", "reason"]


def test_errors_are_one_line_and_exit_2(tiny_2b, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_2b), "--image", str(tmp_path / "missing.png"), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tandem: error:") and "missing.png" in err
    assert main(["generate", "--model", str(tmp_path), "hi"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_bench_is_an_installed_command_the_runtime_never_imports(capsys):
    """`tandem bench` comes from tandem.bench through the entry-point group "tandem.commands"; nothing in the
    runtime, models or kernels imports tandem.bench (dependencies point one way: bench -> runtime -> models ->
    kernels)."""
    commands = {e.name: e.value for e in entry_points(group="tandem.commands")}
    assert commands["bench"] == "tandem.bench.cli:add_command"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0 and "--parts PART,..." in capsys.readouterr().out
    root = Path(__file__).resolve().parents[1]
    for folder in ("runtime", "models", "kernels"):
        for path in (root / folder).rglob("*.py"):
            assert not re.search(r"^\s*(from|import)\s+tandem\.bench", path.read_text(), re.MULTILINE), path
