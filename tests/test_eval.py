"""`tandem eval` end to end on the tiny random pair: 20 easy-VQA samples under every policy with every report field
checked against the per-sample records; a run interrupted by SIGINT resumes without rescoring; an accuracy the
test fixes in advance comes out exactly; a server scored through --endpoint gives the in-process answers."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tandem.models.errors import InputError
from tandem.runtime import Budget, Tandem
from tandem.runtime.cli import main
from tandem.runtime.stages import POLICIES

from conftest import random_image, wait_for
from servers import ServerProcess

pytest.importorskip("easy_vqa")
REASON = ["--reason-tokens", "24", "--short-tokens", "6"]
STAGES = {"large": ["large-answer"], "small": ["small-answer"], "small-reason": ["small-reason"],
          "large-reason": ["large-reason"], "transfer": ["small-reason", "large-transfer"]}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def easy_run(tiny_8b, tiny_2b, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "easy"
    assert main(["eval", "--large", str(tiny_8b), "--small", str(tiny_2b), "--device", "cpu", "--data", "easy-vqa",
                 "--limit", "20", "--policies", ",".join(POLICIES), "--out", str(out), "--no-progress", *REASON]) == 0
    return out


def test_every_policys_report_agrees_with_its_samples(easy_run):
    report, rows = json.loads((easy_run / "report.json").read_text()), records(easy_run)
    assert list(report["policies"]) == list(POLICIES)
    assert report["run"]["samples"] == 20 and report["run"]["scorer"].startswith("exact")
    assert {r["scorer"] for r in rows} == {"exact"}
    for policy, f in report["policies"].items():
        mine = [r for r in rows if r["policy"] == policy]
        assert len(mine) == f["samples"] == 20 and len({r["id"] for r in mine}) == 20 and f["errors"] == 0
        assert f["accuracy"] == pytest.approx(sum(r["score"] for r in mine) / 20)
        low, high = f["accuracy_ci95"]
        assert 0 <= low <= f["accuracy"] <= high <= 1
        for r in mine:
            assert r["score"] in (0.0, 1.0) and r["latency_s"] > 0
            for stage in r["stages"]:  # token counts are the stages' output ids, as the engine counted them
                assert stage["output_tokens"] == len(stage["output_ids"]) == stage["timings"]["output_tokens"] > 0
            keys = [f"{s['model']}-{s['role']}" for s in r["stages"]]
            if policy == "verify":
                assert keys[:2] == ["large-answer", "small-reason"] and keys[2:] in ([], ["large-transfer"])
                assert (keys[2:] == []) == r["agreed"]
            else:
                assert keys == STAGES[policy]
        tokens = [sum(len(s["output_ids"]) for s in r["stages"]) for r in mine]
        assert f["output_tokens"]["mean"] == pytest.approx(sum(tokens) / 20)
        assert sum(f["output_tokens"]["by_stage"].values()) == pytest.approx(f["output_tokens"]["mean"])
        latencies = sorted(r["latency_s"] for r in mine)
        assert f["latency_s"]["mean"] == pytest.approx(sum(latencies) / 20)
        assert latencies[0] <= f["latency_s"]["p50"] <= f["latency_s"]["p90"] <= latencies[-1]
    verify = report["policies"]["verify"]["verify"]
    agreed = [r["agreed"] for r in rows if r["policy"] == "verify"]
    assert verify["agreed_share"] == pytest.approx(sum(agreed) / 20)
    kept = [s["kept_fraction"] for r in rows if r["policy"] == "transfer" for s in r["stages"]
            if s["kept_fraction"] is not None]
    assert report["policies"]["transfer"]["kept_fraction_mean"] == pytest.approx(sum(kept) / len(kept))
    summary = (easy_run / "summary.txt").read_text()
    assert all(f"\n{policy} " in summary for policy in POLICIES)
    for plot in ("accuracy_latency.png", "accuracy_tokens.png"):
        with Image.open(easy_run / plot) as image:
            assert image.format == "PNG" and image.size[0] > 300


def test_an_interrupted_run_resumes_without_rescoring(tiny_8b, tiny_2b, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "tandem.runtime.cli", "eval", "--large", str(tiny_8b), "--small", str(tiny_2b),
               "--device", "cpu", "--data", "easy-vqa", "--limit", "20", "--policies", "large,small-reason",
               "--concurrency", "2", "--out", str(out), "--no-progress", *REASON]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = out / "samples.jsonl"
    assert wait_for(lambda: samples.exists() and samples.read_text().count("\n") >= 6, timeout=120)
    first.send_signal(signal.SIGINT)
    assert first.wait(60) == 130  # the CLI's status for Ctrl-C
    before = [line for line in samples.read_text().splitlines(keepends=True) if line.endswith("\n")]
    assert 6 <= len(before) < 40
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {len(before)} of 40 answers already scored" in again.stderr
    after = samples.read_text().splitlines(keepends=True)
    assert after[:len(before)] == before  # the first run's answers kept as they were
    assert len(after) == 40 and len({(json.loads(x)["policy"], json.loads(x)["id"]) for x in after}) == 40
    report = json.loads((out / "report.json").read_text())
    assert [f["samples"] for f in report["policies"].values()] == [20, 20]
    clash = subprocess.run(command[:-len(REASON)] + ["--keep", "attention", *REASON], capture_output=True, text=True)
    assert clash.returncode == 2 and "holds a run with other settings (keep: 'all', now 'attention')" in clash.stderr


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    rows = []
    for i in range(6):
        Image.fromarray(random_image(40 + 8 * i, 48, seed=i)).save(folder / f"{i}.png")
        rows.append({"id": f"s{i}", "image": f"{i}.png", "question": f"What is in picture {i}?", "answer": "unset"})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "data.jsonl"


def test_accuracy_is_the_share_of_accepted_answers(tiny_8b, tiny_2b, jsonl, tmp_path):
    """Half the samples accept what the large model answers (asked in process here, alone): large's accuracy must
    come out 0.5 exactly, and each record's score 1 exactly there."""
    pair = Tandem.from_pretrained(tiny_8b, tiny_2b, device="cpu", budget=Budget(short_tokens=6, reason_tokens=24))
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for i, row in enumerate(rows):
        if i % 2 == 0:
            row["answer"] = [pair.answer(str(jsonl.parent / row["image"]), row["question"], "large").answer, "x"]
    for engine in pair.engines.values():
        engine.close()
    data = jsonl.parent / "half.jsonl"  # beside the images its rows name
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["eval", "--large", str(tiny_8b), "--small", str(tiny_2b), "--device", "cpu", "--data", str(data),
                 "--policies", "large", "--out", str(out), "--no-progress", *REASON]) == 0
    assert json.loads((out / "report.json").read_text())["policies"]["large"]["accuracy"] == 0.5
    assert {r["id"]: r["score"] for r in records(out)} == {f"s{i}": float(i % 2 == 0) for i in range(6)}


def test_a_server_scored_through_its_endpoint_answers_as_in_process(tiny_8b, tiny_2b, jsonl, tmp_path):
    server = ServerProcess(["--large", str(tiny_8b), "--small", str(tiny_2b), "--reason-tokens", "24",
                            "--short-tokens", "6"], tmp_path / "serve.log")
    try:
        out = tmp_path / "http"
        assert main(["eval", "--endpoint", server.url + "/v1", "--data", str(jsonl), "--no-progress", "--out",
                     str(out), "--policies", f"tandem-large,verify,{tiny_2b.name}"]) == 0
        # an id the server does not have fails every sample alike: the run stops at the first
        assert main(["eval", "--endpoint", server.url + "/v1", "--data", str(jsonl), "--no-progress", "--out",
                     str(tmp_path / "wrong"), "--policies", "gpt-4o"]) == 2
    finally:
        server.stop()
    local = tmp_path / "local"
    assert main(["eval", "--large", str(tiny_8b), "--small", str(tiny_2b), "--device", "cpu", "--data", str(jsonl),
                 "--policies", "large,verify", "--out", str(local), "--no-progress", *REASON]) == 0
    served = {(r["policy"], r["id"]): r for r in records(out)}
    for r in records(local):
        there = served[r["policy"], r["id"]]
        assert there["prediction"] == r["prediction"] and there["agreed"] == r["agreed"]
        assert [s["output_ids"] for s in there["stages"]] == [s["output_ids"] for s in r["stages"]]
    plain = [r for key, r in served.items() if key[0] == tiny_2b.name]
    assert len(plain) == 6 and all(r["stages"][0]["output_tokens"] > 0 and not r.get("error") for r in plain)
    assert set(json.loads((out / "report.json").read_text())["policies"]) == {"large", "verify", tiny_2b.name}


def test_an_unreachable_endpoint_or_no_answerer_stops_the_run_in_one_line(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    assert main(["eval", "--endpoint", f"http://127.0.0.1:{port}/v1", "--data", "easy-vqa", "--limit", "2",
                 "--policies", "verify", "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert f"--endpoint http://127.0.0.1:{port}/v1/: ConnectError" in capsys.readouterr().err
    assert main(["eval", "--data", "easy-vqa", "--out", str(tmp_path / "b")]) == 2
    assert "give --large DIR and --small DIR" in capsys.readouterr().err


def test_a_record_cut_short_is_dropped_and_a_corrupt_one_named(tmp_path):
    from tandem.bench.eval.run import _read_records

    path = tmp_path / "samples.jsonl"
    whole = [json.dumps({"id": str(i), "policy": "large", "score": 1.0}) + "\n" for i in range(2)]
    path.write_text("".join(whole) + '{"id": "2", "pol')  # an interrupted write
    assert [r["id"] for r in _read_records(path)] == ["0", "1"]
    assert path.read_text() == "".join(whole)  # the next record starts on a line of its own
    path.write_text(whole[0] + "garbage\n" + whole[1])
    with pytest.raises(InputError, match=r"samples.jsonl, line 2: not a record"):
        _read_records(path)
    assert path.read_text() == whole[0] + "garbage\n" + whole[1]  # nothing destroyed


def test_one_folder_serves_one_run_at_a_time(tmp_path):
    from tandem.bench.eval.run import open_run

    with open_run(tmp_path / "out", {"data": "x"}):
        with pytest.raises(InputError, match="is in use by another tandem eval run"):
            open_run(tmp_path / "out", {"data": "x"})
    open_run(tmp_path / "out", {"data": "x"}).close()  # free again once the first run let go
