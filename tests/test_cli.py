"""The `tandem` command. Most tests run it as a user does, in a fresh process, and check its stdout, stderr and exit
status; a few run `main` in-process where only the printed text matters."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points, version
from pathlib import Path

import pytest
from PIL import Image

from tandem.runtime import Engine, SamplingParams
from tandem.runtime.cli import POLICY_HELP, main
from tandem.runtime.cli_output import StageText
from tandem.runtime.stages import POLICIES

from conftest import random_image
from test_hub import fill_hub_cache

TANDEM_SCRIPT = Path(sys.executable).parent / "tandem"  # the console script pip installed beside the interpreter


def tandem(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`tandem ARGS` in a fresh process (python -m, the interpreter running the tests); env: changes to os.environ
    (a value of None removes the variable)."""
    environment = {**os.environ, **(env or {})}
    environment = {k: v for k, v in environment.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "tandem.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, env=environment, timeout=timeout)


def tandem_all(*commands: list, env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Several `tandem` runs at once (each is mostly Python and torch starting up)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: tandem(*args, env=env), commands))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    files = {"cat": folder / "cat.png", "chart": folder / "chart.png"}
    Image.fromarray(random_image(200, 260, seed=9)).save(files["cat"])
    Image.fromarray(random_image(120, 330, seed=3)).save(files["chart"])
    return files


def test_generate_streams_the_reply_then_timings_or_one_line_of_json(tiny_2b, images):
    """Two --image flags go in the one user message, in order: the reply is the engine's for those messages."""
    common = ["generate", "--model", tiny_2b, "--device", "cpu", "--image", images["cat"], "--image", images["chart"],
              "--max-tokens", "6", "--temperature", "0", "--ignore-eos", "What differs?"]
    plain, as_json = tandem_all(common, common + ["--json"])
    assert plain.returncode == as_json.returncode == 0, plain.stderr + as_json.stderr
    data = json.loads(as_json.stdout)
    assert as_json.stdout.count("\n") == 1 and set(data) == {"text", "token_ids", "finish_reason", "timings"}
    assert data["finish_reason"] == "length" and data["timings"]["output_tokens"] == 6
    engine = Engine.from_pretrained(tiny_2b, device="cpu", kv_cache_tokens=2048)
    content = [{"type": "image", "image": str(images["cat"])}, {"type": "image", "image": str(images["chart"])},
               {"type": "text", "text": "What differs?"}]
    expected = engine.generate([{"role": "user", "content": content}],
                               SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert data["token_ids"] == expected.token_ids and data["text"] == expected.text
    assert data["timings"]["image_tokens"] == expected.timings.image_tokens
    # --json: the reply streamed to stderr, after the loading line; plain: to stdout, then the timings line.
    assert re.match(rf"loading model from {re.escape(str(tiny_2b))} \.\.\. done in \d+\.\d s\n", as_json.stderr)
    assert expected.text in as_json.stderr
    assert plain.stdout.startswith(expected.text)
    timings = plain.stdout.splitlines()[-1]
    assert timings.startswith("[length] vision") and "for 6 tokens" in timings and timings.endswith("(cpu, float32)")
    assert f"({expected.timings.image_tokens} image)" in timings


def test_ask_streams_each_stage_to_stderr_and_prints_the_result_to_stdout(tiny_8b, tiny_2b, images):
    done = tandem("ask", "--large", tiny_8b, "--small", tiny_2b, "--image", images["chart"], "--device", "cpu",
                  "--reason-tokens", "8", "--short-tokens", "4", "--ignore-eos", "--json",
                  "Which year had the highest sales?")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["policy"] == "verify" and [s["role"] for s in result["stages"]][:2] == ["answer", "reason"]
    lines = done.stderr.splitlines()
    assert lines[0].startswith(f"loading large from {tiny_8b} ... done in ")
    assert lines[1].startswith(f"loading small from {tiny_2b} ... done in ")
    # verify's two first stages decode at once: every stage's text comes in whole lines, each after its stage
    printed: dict[str, list[str]] = {}
    for line in lines[2:]:
        stage, _, text = line.partition("] ")
        printed.setdefault(stage + "]", []).append(text)
    for stage in result["stages"]:
        assert "\n".join(printed[f"[{stage['model']} {stage['role']}]"]) == stage["text"].rstrip("\n")


def test_overlapped_stages_print_whole_lines_each_with_its_stage(capsys):
    """verify's overlap (CUDA) decodes two stages from two threads: their text must not mix within a line."""
    printer = StageText(overlapped=True)
    pieces = {("large", "answer"): ["Par", "is\nand ", "more"], ("small", "reason"): ["Step", " one\nStep", " two"]}

    def send(stage):
        for piece in pieces[stage]:
            printer(*stage, piece)

    threads = [threading.Thread(target=send, args=(stage,)) for stage in pieces]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    printer.close()
    lines = capsys.readouterr().err.splitlines()
    assert sorted(lines) == sorted(["[large answer] Paris", "[large answer] and more", "[small reason] Step one",
                                    "[small reason] Step two"])
    assert lines.index("[large answer] Paris") < lines.index("[large answer] and more")


def test_a_hugging_face_model_id_is_resolved_through_the_hub_cache(tiny_2b, tiny_8b, images, tmp_path):
    cache = tmp_path / "hub"
    snapshot = fill_hub_cache(cache, "tandem-test/tiny-2b", tiny_2b)
    hub = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    by_id, uncached = tandem_all(
        ["generate", "--model", "tandem-test/tiny-2b", "--device", "cpu", "--max-tokens", "2", "Hi"],
        ["ask", "--large", tiny_8b, "--small", "Qwen/Qwen3-VL-2B-Instruct", "--image", images["cat"], "--device",
         "cpu", "What is it?"], env=hub)
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stderr.startswith(f"loading model tandem-test/tiny-2b from {snapshot} ... done in ")
    assert uncached.returncode == 2 and uncached.stdout == ""
    assert re.fullmatch(r"tandem: error: Qwen/Qwen3-VL-2B-Instruct: not a local folder, not in the Hugging Face "
                        r"cache .*\(HF_HUB_OFFLINE is set\).*\n", uncached.stderr)  # before the large model loaded


def test_help_shows_defaults_and_the_policies_and_version_names_the_release():
    version_run, ask_help, generate_help = tandem_all(["--version"], ["ask", "--help"], ["generate", "--help"])
    assert version_run.returncode == 0 and version_run.stdout == f"tandem {version('tandem-vlm')}\n"
    assert ask_help.returncode == generate_help.returncode == 0
    assert set(POLICY_HELP) == set(POLICIES)
    text = " ".join(ask_help.stdout.split())  # argparse wraps lines
    for policy, description in POLICY_HELP.items():
        assert f"{policy} {' '.join(description.split())}" in text
    for default in ("--policy {large,small,small-reason,large-reason,transfer,verify} which models run which stages, "
                    "see below (default: verify)", "(default: all)", "(default: 0.8)", "(default: 16)",
                    "(default: 512)", "--page-size N tokens per KV-cache page (default: 16)", "--kv-cache-tokens N",
                    "--no-cuda-graphs"):
        assert default in text
    text = " ".join(generate_help.stdout.split())
    assert "--max-tokens N (default: 64)" in text and "repeat for several" in text and "--no-cuda-graphs" in text


def test_the_installed_script_exits_with_the_command_s_status(tmp_path):
    """The console script pip writes (`tandem`) passes main's status on: 0, 2 for a user's mistake."""
    done = subprocess.run([TANDEM_SCRIPT, "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("tandem ")
    done = subprocess.run([TANDEM_SCRIPT, "generate", "--model", tmp_path / "missing", "hi"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stderr.startswith("tandem: error: ") and done.stderr.count("\n") == 1


def test_an_internal_error_keeps_its_traceback(tiny_2b, monkeypatch):
    """Only a user's mistake (a TandemError) becomes one line: a bug must show where it is."""
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Engine, "from_pretrained", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", "--model", str(tiny_2b), "--device", "cpu", "hi"])


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


def test_ask_prints_the_stage_table(tiny_8b, tiny_2b, images, capsys):
    assert main(["ask", "--large", str(tiny_8b), "--small", str(tiny_2b), "--image", str(images["chart"]), "--device",
                 "cpu", "--reason-tokens", "8", "--short-tokens", "4", "--ignore-eos", "--policy", "transfer", "--keep",
                 "attention", "Which year had the highest sales?"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("answer: ") and " 2 large  transfer" in captured.out
    assert "[small reason]\n" in captured.err and "[large transfer]\n" in captured.err


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
