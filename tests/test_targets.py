"""tandem.bench.targets: each target's ratio from hand-written bench JSONs, the expected values worked out by hand."""

from __future__ import annotations

import json

from tandem.bench.targets import TARGETS, evaluate, main


def bench_json(complete: bool = True, **parts) -> dict:
    machine = {"device_name": "Test GPU", "torch": "2.x", "triton": "3.x", "transformers": "5.x"}
    return {"complete": complete, "machine": machine, "dtype": "bfloat16", "date": "2026-01-01T00:00:00+00:00",
            "command": "tandem bench --test", **parts}


EIGHT = bench_json(
    floor={"ms_per_token": 5.0},
    decode={"lengths": [16, 256],
            "columns": {"tandem": {"per_token_ms": [5.5, 6.0]}, "hf_eager": {"per_token_ms": [27.5, 30.0]},
                        "hf_compiled": {"unavailable": "skipped (--skip-compile)"}},
            "stop": {"steps_past_stop": 1, "output_tokens": 4, "decode_steps": 4}},
    vision={"sizes": [224, 448], "columns": {"tandem": {"first_token_ms": [12.0, 24.0]}}},
    concurrency={"levels": [1, 8, 32], "ratio": [1.12, 8.0, 25.0],  # 140 / 125, 1000 / 125, 3200 / 128
                 "columns": {"one_at_a_time": {"tokens_per_s": [125.0, 125.0, 128.0]},
                             "concurrent": {"tokens_per_s": [140.0, 1000.0, 3200.0]}}},
)
TWO = bench_json(
    floor={"ms_per_token": 2.0},
    decode={"lengths": [1, 16, 256],  # one token: no per-token figure, left out
            "columns": {"tandem": {"per_token_ms": [None, 2.4, 2.9]}, "hf_eager": {"per_token_ms": [None, 28.8, 30.45]}},
            "stop": {"steps_past_stop": 3, "output_tokens": 4, "decode_steps": 6}},
)
PAIR = bench_json(policies={"results": {"small-reason": {"total_ms": 300.0}, "verify": {"verdict_ms": 315.0},
                                        "verify (sequential)": {"verdict_ms": 450.0}}})


def table(results: dict) -> dict[str, tuple[str, str]]:
    return {target.name: (reached, verdict) for target, reached, verdict in evaluate(results)}


def test_every_ratio_from_the_jsons():
    rows = table({"8b": EIGHT, "2b": TWO, "pair": PAIR})
    assert list(rows) == [t.name for t in TARGETS]
    assert rows["8B decode per token / floor"] == ("L=16: 1.100x, L=256: 1.200x", "missed")  # 5.5 / 5, 6 / 5 > 1.15
    assert rows["2B decode per token / floor"] == ("L=16: 1.200x, L=256: 1.450x", "met")  # 2.4 / 2, 2.9 / 2 <= 1.5
    assert rows["8B speed-up per token over transformers eager"] == ("L=16: 5.00x, L=256: 5.00x", "met")  # 27.5 / 5.5
    assert rows["2B speed-up per token over transformers eager"] == ("L=16: 12.00x, L=256: 10.50x", "met")  # 30.45 / 2.9
    assert rows["8B first token, one 448x448 image"] == ("24.00 ms", "met")
    assert rows["verify verdict / small-reason total (8B + 2B)"] == (
        "1.050x (315.0 ms / 300.0 ms); stages one after the other: 1.500x", "met")
    assert rows["8B decode steps run past a stop"] == ("1 (4 tokens out, 4 decode steps)", "met")
    assert rows["2B decode steps run past a stop"] == ("3 (4 tokens out, 6 decode steps)", "missed")
    assert rows["8B output tokens/s, C requests at once"] == (
        "C=1: 140 tok/s (1.12x one at a time), C=8: 1000 tok/s (8.00x one at a time), "
        "C=32: 3200 tok/s (25.00x one at a time)", "measured")  # information: no goal, so neither met nor missed
    assert rows["2B output tokens/s, C requests at once"] == ("no concurrency part in the run", "pending")


def test_missing_files_and_parts_are_pending_and_failed_parts_unavailable():
    cut = bench_json(complete=False, floor=EIGHT["floor"], decode=EIGHT["decode"])  # stopped before vision
    broken = bench_json(floor=TWO["floor"], decode={"unavailable": "decode failed: RuntimeError: boom"},
                        concurrency={"unavailable": "concurrency failed: RuntimeError: boom"})
    rows = table({"8b": cut, "2b": broken, "pair": None})
    assert rows["8B decode per token / floor"][1] == "missed"
    assert rows["8B first token, one 448x448 image"] == ("no vision part in the run (cut short)", "pending")
    assert rows["2B decode per token / floor"] == ("decode: decode failed: RuntimeError: boom", "unavailable")
    assert rows["verify verdict / small-reason total (8B + 2B)"] == ("no pair.json", "pending")
    assert rows["8B output tokens/s, C requests at once"] == ("no concurrency part in the run (cut short)", "pending")
    assert rows["2B output tokens/s, C requests at once"] == (
        "concurrency: concurrency failed: RuntimeError: boom", "unavailable")


def test_main_writes_targets_md_from_the_files_present(tmp_path, capsys):
    (tmp_path / "8b.json").write_text(json.dumps(EIGHT))
    assert main([str(tmp_path)]) == 0
    written = (tmp_path / "targets.md").read_text()
    assert written == capsys.readouterr().out
    assert "| 8B first token, one 448x448 image | < 30 ms | 24.00 ms | met |" in written
    assert "| 2B decode per token / floor | <= 1.5x | no 2b.json | pending |" in written
    assert "| 8B output tokens/s, C requests at once | - | C=1: 140 tok/s (1.12x one at a time), " in written
    assert "- 8b.json: Test GPU, bfloat16" in written and "- pair.json: not there" in written
