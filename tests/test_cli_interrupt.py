"""Ctrl-C while `tandem` decodes: the text decoded so far stays printed, an `[interrupted]` note follows, the exit
status is 130 (the shell's for SIGINT) and no traceback is shown."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

from PIL import Image

from conftest import random_image

LONG = "20000"  # tokens: far more than the test waits for (--ignore-eos: the tiny random model never stops early)


def interrupt_once_printed(args: list, stream: str, after: str = "", chars: int = 40) -> tuple[int, str, str, str]:
    """Run `tandem ARGS`; once `stream` ("stdout" or "stderr") has printed `chars` characters past the text `after`,
    send SIGINT. -> (exit status, what that stream had printed by then, stdout, stderr)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tandem.runtime.cli", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # A shell without job control starts background commands with SIGINT ignored; a user's terminal does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watched = getattr(process, stream)
    seen = b""
    deadline = time.monotonic() + 120
    try:
        while True:
            text = seen.decode(errors="ignore")
            start = text.find(after)
            if start >= 0 and len(text) - start - len(after) >= chars:
                break
            assert time.monotonic() < deadline and process.poll() is None, text
            if select.select([watched], [], [], 1)[0]:
                seen += os.read(watched.fileno(), 4096)
        process.send_signal(signal.SIGINT)
        rest_out, rest_err = process.communicate(timeout=60)
    finally:
        process.kill()
    out, err = (seen + rest_out, rest_err) if stream == "stdout" else (rest_out, seen + rest_err)
    return process.returncode, seen.decode(errors="replace"), out.decode(errors="replace"), err.decode(errors="replace")


def test_ctrl_c_during_generate_keeps_the_text_and_exits_130(tiny_2b):
    status, shown, out, err = interrupt_once_printed(
        ["generate", "--model", tiny_2b, "--device", "cpu", "--max-tokens", LONG, "--ignore-eos", "Tell a story."],
        "stdout")
    assert status == 130, err
    assert out.startswith(shown) and out.endswith("\n")  # kept, and its unfinished line ended
    assert "[length]" not in out
    assert err.endswith("\n[interrupted]\n") and "Traceback" not in err


def test_ctrl_c_during_ask_keeps_each_stage_s_text_and_exits_130(tiny_8b, tiny_2b, tmp_path):
    image = tmp_path / "chart.png"
    Image.fromarray(random_image(120, 160, seed=4)).save(image)
    status, shown, out, err = interrupt_once_printed(
        ["ask", "--large", tiny_8b, "--small", tiny_2b, "--image", image, "--device", "cpu", "--policy", "small-reason",
         "--reason-tokens", LONG, "--ignore-eos", "Which year had the highest sales?"],
        "stderr", after="[small reason]\n")
    assert status == 130, err
    assert out == ""  # no result table: the request did not finish
    assert err.startswith(shown) and err.endswith("\n[interrupted]\n") and "Traceback" not in err
