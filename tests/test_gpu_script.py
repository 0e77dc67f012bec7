"""bench/gpu.sh, the one prepared GPU run, in its dry mode: the same script on the CPU with tiny models and lists,
so that a broken script is found here and not on the GPU. Its GPU tests skip here, but pytest must find every one
of their node ids (a missing id fails the part, and the run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tandem.bench.targets import TARGETS

ROOT = Path(__file__).resolve().parents[1]
FILES = ("run.log", "gpu-tests.log", "8b.json", "2b.json", "pair.json", "targets.md", "real-2b.log")
MAX_FILES = 8
DEADLINE_S = 300  # the dry run takes under a minute on a 2-core machine


def files_under(folder: Path) -> list[Path]:
    """Every file below folder, relative to it (os.walk skips a folder the script removes meanwhile)."""
    return [Path(top, name).relative_to(folder) for top, _, names in os.walk(folder) for name in names]


def script_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "WHEELS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python3 is this interpreter
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    """Run the script once, counting the files under OUTDIR every 50 ms while it runs."""
    out = tmp_path_factory.mktemp("gpu-run")
    start = time.monotonic()
    process = subprocess.Popen(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry", str(out)], env=script_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,  # run.log holds everything
                               start_new_session=True)  # its own process group: a run past the deadline dies whole
    seen: list[list[Path]] = []
    try:
        while process.poll() is None and time.monotonic() - start < DEADLINE_S:
            seen.append(files_under(out))
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    code = process.wait()
    seen.append(files_under(out))
    log = (out / "run.log").read_text() if (out / "run.log").is_file() else ""
    return {"code": code, "out": out, "seen": seen, "log": log, "seconds": time.monotonic() - start}


def test_exits_0_and_every_part_passed(dry_run):
    assert dry_run["code"] == 0, dry_run["log"][-4000:]
    log = dry_run["log"]
    for part in ("install", "versions", "gpu-tests", "8b", "2b", "pair", "real-2b"):
        assert f"== {part}: exit 0 after " in log, part
    assert "every part passed" in log and f"torch {torch.__version__} | CUDA" in log
    assert dry_run["seconds"] < 120


def test_writes_each_file_and_never_more_than_8(dry_run):
    out = dry_run["out"]
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert sorted(map(str, files_under(out))) == sorted(FILES)
    assert max(len(files) for files in dry_run["seen"]) <= MAX_FILES
    assert all(len(path.parts) <= 2 for files in dry_run["seen"] for path in files)  # OUTDIR/a/file at the deepest


def test_gpu_tests_were_all_found(dry_run):
    log = (dry_run["out"] / "gpu-tests.log").read_text()
    assert "not found" not in log and "error" not in log.lower()
    assert " skipped" in log and " deselected" in log  # fp16 and float32 variants dropped by -k


def test_jsons_hold_the_parts_asked_for(dry_run):
    out = dry_run["out"]
    large, small, pair = (json.loads((out / name).read_text()) for name in ("8b.json", "2b.json", "pair.json"))
    assert large["settings"]["parts"] == ["decode", "batch", "concurrency", "vision", "check", "profile"]
    assert large["model"]["preset"] == "8b-like" and large["vision"]["sizes"] == [448]
    assert large["check"]["contexts"] == [32, 64] and large["check"]["tokens"] == [1, 4]
    assert large["batch"]["batch_sizes"] == [1, 2] and large["profile"]["first_token"]["wall_ms"] > 0
    assert small["settings"]["parts"] == ["decode", "concurrency"] and small["model"]["preset"] == "2b-like"
    for data in (large, small):
        assert data["complete"] and data["decode"]["lengths"] == [2, 4]
        assert data["concurrency"]["levels"] == [1, 3] and data["concurrency"]["output_tokens"] == 4
        assert data["decode"]["columns"]["hf_compiled"] == {"unavailable": "skipped (--skip-compile)"}
        assert data["decode"]["stop"]["finish_reason"] == "stop"
    assert pair["settings"]["parts"] == ["policies"] and pair["complete"]
    assert {"verify", "verify (sequential)", "small-reason"} <= set(pair["policies"]["results"])


def test_targets_table_lists_every_target_with_a_number(dry_run):
    table = (dry_run["out"] / "targets.md").read_text()
    for target in TARGETS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {target.name} |"))
        assert row.endswith(("| met |", "| missed |") if target.goal else "| measured |"), row
    assert table in dry_run["log"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_stops_at_once_with_one_line(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(tmp_path)], env=script_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1].startswith("gpu.sh: torch sees no CUDA device")
    assert [p.name for p in tmp_path.iterdir()] == ["run.log"]
