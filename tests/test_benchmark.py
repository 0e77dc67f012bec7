"""`tandem bench` in quick mode on the CPU with the tiny presets: structure and honesty of its outputs.

One run of the whole harness (through the CLI, every part) is shared by the tests of this module; the numbers
are CPU timings of tiny models, so only their form is checked: positive, finite, as many as requested, ratios
that are the value over the floor, forced lengths that were really produced.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math

import pytest
import torch
from PIL import Image

from tandem.bench.build import build_models, decode_weight_bytes, forced_greedy, text_ids
from tandem.bench.check import bench_check
from tandem.bench.latency_report import COLUMNS
from tandem.bench.policies import _policy_summary
from tandem.bench.settings import PARTS, BenchSettings
from tandem.bench.timing import Progress
from tandem.models.tiny import PRESETS, write_support_files
from tandem.runtime.cli import main
from tandem.runtime.pipeline import POLICIES

LENGTHS = [1, 3, 8]
IMAGE_SIZES = [224, 320]
PROMPT_LENGTHS = [64, 160]
BATCH_SIZES, BATCH_TOKENS = [1, 3], 5
CONCURRENCY, CONCURRENCY_TOKENS, CONCURRENCY_REPEATS = [1, 4], 7, 3  # its own repeats: 3 against the others' 2
PROFILE_STEPS = 16
CHECK_CONTEXTS, CHECK_TOKENS = [40, 100], [1, 3]  # not the defaults
SHORT, REASON = 3, 12  # not the defaults, so a forced length cannot be a coincidence
ARGS = ["bench", "--quick", "--preset", "2b-like", "--pair", "8b-like,2b-like", "--device", "cpu", "--dtype", "float32",
        "--repeats", "2", "--lengths", ",".join(map(str, LENGTHS)), "--image-sizes", ",".join(map(str, IMAGE_SIZES)),
        "--prompt-lengths", ",".join(map(str, PROMPT_LENGTHS)), "--short-tokens", str(SHORT),
        "--reason-tokens", str(REASON), "--batch-sizes", ",".join(map(str, BATCH_SIZES)),
        "--batch-tokens", str(BATCH_TOKENS), "--concurrency", ",".join(map(str, CONCURRENCY)),
        "--concurrency-tokens", str(CONCURRENCY_TOKENS), "--concurrency-repeats", str(CONCURRENCY_REPEATS),
        "--profile-steps", str(PROFILE_STEPS), "--check-contexts", ",".join(map(str, CHECK_CONTEXTS)),
        "--check-tokens", ",".join(map(str, CHECK_TOKENS))]


def _run(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    code, printed = _run(ARGS + ["--out", str(folder)])
    data = json.loads((folder / "bench.json").read_text()) if (folder / "bench.json").is_file() else None
    return {"code": code, "printed": printed, "folder": folder, "data": data}


def test_cli_returns_0_and_writes_every_file(run):
    assert run["code"] == 0
    for name in ("bench.json", "latency.png", "summary.txt"):
        assert (run["folder"] / name).is_file(), name
    assert run["printed"].startswith((run["folder"] / "summary.txt").read_text().rstrip("\n"))


def test_json_has_every_section_and_the_machine(run):
    data = run["data"]
    assert data["complete"] is True
    for section in ("machine", "settings", "kernels", "model", "floor", *PARTS):
        assert section in data, section
    machine = data["machine"]
    assert machine["device"] == "cpu" and machine["device_name"]
    assert machine["torch"] == torch.__version__ and machine["transformers"] and machine["triton"]
    assert data["dtype"] == "float32" and data["settings"]["dtype"] == "float32"
    assert data["command"].startswith("tandem bench ") and "--preset 2b-like" in data["command"]
    assert "--reason-tokens 12" in data["command"] and data["process_argv"]
    datetime.datetime.fromisoformat(data["date"])
    assert set(data["decode"]["columns"]) == set(COLUMNS)
    assert data["model"]["preset"] == "2b-like" and data["policies"]["large"] == "8b-like"


def _numbers(node, path=""):
    if isinstance(node, bool) or node is None or isinstance(node, str):
        return
    if isinstance(node, (int, float)):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _numbers(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _numbers(value, f"{path}[{i}]")


def test_every_measured_number_is_positive_and_finite(run):
    data = run["data"]
    found = 0
    for section in ("model", "floor", *PARTS):
        for path, value in _numbers(data[section], section):
            if path.startswith("policies.budget."):  # settings (temperature 0), not measurements
                continue
            if path.startswith("decode.stop."):  # counts and a token id: 0 is a valid value (test_stop_check)
                continue
            if path.rsplit(".", 1)[-1] in ("drafted", "accepted", "verify_forwards"):  # counts, 0 without a draft
                continue
            if path == "check.default_chunk_rows":  # a setting: 0 where no graph replays
                continue
            assert math.isfinite(value) and value > 0, (path, value)
            found += 1
    assert found > 200


def test_lengths_sizes_and_prompts_are_as_requested(run):
    data = run["data"]
    decode = data["decode"]
    assert decode["lengths"] == LENGTHS
    for key in ("tandem", "hf_eager"):
        column = decode["columns"][key]
        for field in ("per_token_ms", "total_ms", "ratio_to_floor", "tokens"):
            assert len(column[field]) == len(LENGTHS)
        assert column["per_token_ms"][0] is None  # one token: no decode step, so no per-token number
        assert all(v is not None for v in column["per_token_ms"][1:])
        assert [len(s) for s in column["samples"]["total_ms"]] == [2] * len(LENGTHS)  # the repeats, all kept
    assert data["prefill"]["prompt_tokens"] == PROMPT_LENGTHS
    assert len(data["prefill"]["columns"]["tandem"]["ms"]) == len(PROMPT_LENGTHS)
    vision = data["vision"]
    assert vision["sizes"] == IMAGE_SIZES and len(vision["columns"]["hf_eager"]["ms"]) == len(IMAGE_SIZES)
    assert vision["resized"] == [[256, 256], [320, 320]]  # 224 is below Qwen3-VL's min_pixels: scaled up, and said so
    assert vision["image_tokens"] == [64, 100]
    tandem = vision["columns"]["tandem"]
    assert len(tandem["first_token_ms"]) == len(IMAGE_SIZES)
    assert [len(x) for x in tandem["first_token_samples_ms"]] == [2] * len(IMAGE_SIZES)


def test_forced_lengths_were_produced(run):
    decode = run["data"]["decode"]
    for key in ("tandem", "hf_eager"):
        assert decode["columns"][key]["tokens"] == [[n] for n in LENGTHS], key
    policies = run["data"]["policies"]
    assert policies["budget"]["short_tokens"] == SHORT and policies["budget"]["reason_tokens"] == REASON
    assert list(policies["results"]) == [*POLICIES, "verify (sequential)", "large-reason (speculative)",
                                         "large-reason (self-draft)"]
    for name, result in policies["results"].items():
        for one in result["runs"]:
            for stage in one["stages"]:
                expected = REASON if stage["role"] == "reason" else SHORT
                assert stage["output_tokens"] == stage["expected_tokens"] == expected, (name, stage)


def test_large_reason_drafted_reports_its_drafts(run):
    results = run["data"]["policies"]["results"]
    for name in ("large-reason (speculative)", "large-reason (self-draft)"):
        for one in results[name]["runs"]:
            (stage,) = one["stages"]
            assert stage["verify_forwards"] + stage["accepted"] == REASON - 1  # every token a kept draft or the target's
            if name.endswith("(self-draft)"):
                assert stage["accepted"] == stage["drafted"] > 0  # the large model agrees with itself
    for one in results["large-reason"]["runs"]:
        assert one["stages"][0]["drafted"] == one["stages"][0]["verify_forwards"] == 0


def test_stop_check_counts_the_steps_run_past_a_stop(run):
    """The reply's 4th token made a stop id ends the reply at that id's first occurrence; the steps past it are
    the decode steps run beyond the output_tokens - 1 that produced the reply."""
    stop = run["data"]["decode"]["stop"]
    assert stop["max_tokens"] == 16 and stop["stop_position"] == 4
    assert stop["finish_reason"] == "stop" and stop["output_tokens"] == stop["expected_tokens"] <= 4
    assert stop["steps_past_stop"] == stop["decode_steps"] - (stop["output_tokens"] - 1) >= 0
    assert f"{stop['steps_past_stop']} past the stop" in run["printed"]


def test_check_times_both_ways_at_every_context_and_chunk(run):
    check = run["data"]["check"]
    assert check["contexts"] == CHECK_CONTEXTS and check["tokens"] == CHECK_TOKENS
    assert check["graphs"] is False and check["default_chunk_rows"] == 0  # the CPU replays no graph: prefills
    for mode in ("rows", "prefill"):
        column = check["columns"][mode]
        assert [len(row) for row in column["ms"]] == [len(CHECK_TOKENS)] * len(CHECK_CONTEXTS)
        assert all(len(x) == 2 for row in column["samples_ms"] for x in row)  # the repeats, all kept
    for i in range(len(CHECK_CONTEXTS)):
        for j in range(len(CHECK_TOKENS)):
            rows, prefill = check["columns"]["rows"]["ms"][i][j], check["columns"]["prefill"]["ms"][i][j]
            assert check["ratio"][i][j] == pytest.approx(rows / prefill, rel=1e-12)
    assert "Speculation check: submit_verify of n tokens after L" in run["printed"]


def test_check_part_runs_rows_then_gives_back_its_pages_and_the_runners_setting(tmp_path):
    """The rows mode really runs decode rows (their step shapes exist afterwards: one per row bucket, all of one
    block-table width, the pages of the longest chunk being reserved up front);
    the part cuts every chunk off its held sequence, releases it, and leaves chunk_rows as it found it; the
    engine then answers as before."""
    built = build_models("2b-like", torch.device("cpu"), torch.float32, 0, write_support_files(tmp_path), 512)
    engine = built.engine
    before = engine.generate(prompt_token_ids=text_ids(30, 2), sampling=forced_greedy(6)).token_ids
    engine.runner.chunk_rows = 7
    settings = BenchSettings(preset="2b-like", device="cpu", repeats=1, check_contexts=(250,),
                             check_tokens=(1, 9)).resolve()
    result = bench_check(built, settings, Progress(0, enabled=False))
    assert engine.pool.free_pages == engine.pool.num_pages and engine.runner.chunk_rows == 7
    # rows 1 and 16 (9 rounded up); 250 + 9 tokens fill 17 pages of 16: a table 32 wide, for n = 1 too (251
    # tokens alone fill 16 pages: a 16-wide table, had the pages grown chunk by chunk)
    assert sorted(engine.runner._chunk_buffers) == [(1, 32), (16, 32)]
    assert result["contexts"] == [250] and result["failed_captures"] == []
    assert all(len(x) == 1 for row in result["columns"]["rows"]["samples_ms"] for x in row)
    engine.runner.chunk_rows = 0
    assert engine.generate(prompt_token_ids=text_ids(30, 2), sampling=forced_greedy(6)).token_ids == before


def test_check_part_failing_midway_holds_no_page(tmp_path, monkeypatch):
    """A check that fails (here the third, made to raise) ends the part with its sequence released and
    chunk_rows restored."""
    built = build_models("2b-like", torch.device("cpu"), torch.float32, 0, write_support_files(tmp_path), 512)
    engine, calls = built.engine, []
    real = engine.submit_verify

    def third_fails(seq, prompt):
        calls.append(len(prompt))
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(seq, prompt)

    monkeypatch.setattr(engine, "submit_verify", third_fails)
    settings = BenchSettings(preset="2b-like", device="cpu", repeats=1, check_contexts=(40,),
                             check_tokens=(3, 4)).resolve()
    with pytest.raises(RuntimeError, match="injected failure"):
        bench_check(built, settings, Progress(0, enabled=False))
    assert calls == [3, 3, 4] and engine.pool.free_pages == engine.pool.num_pages
    assert engine.runner.chunk_rows == 0


def test_verify_reports_its_verdict_time_and_the_sequential_run(run):
    policies = run["data"]["policies"]
    assert policies["verify_overlap"] is True  # verify's two first stages at once, "verify (sequential)" in turn
    for name in ("verify", "verify (sequential)"):
        for one in policies["results"][name]["runs"]:
            assert 0 < one["verdict_ms"] <= one["total_ms"]
    assert all(one["verdict_ms"] is None for one in policies["results"]["small-reason"]["runs"])
    assert "verify verdict (its whole cost when the answers agree)" in run["printed"]


def test_verify_reports_which_branch_ran(run):
    verify = run["data"]["policies"]["results"]["verify"]
    assert sum(verify["branches"].values()) == len(verify["runs"]) == 2
    for one in verify["runs"]:
        roles = [s["role"] for s in one["stages"]]
        assert roles == (["answer", "reason"] if one["branch"].startswith("agreed") else ["answer", "reason", "transfer"])
    for name in ("large", "transfer"):
        assert run["data"]["policies"]["results"][name]["branches"] == {}


def test_ratios_are_value_over_floor(run):
    data = run["data"]
    floor = data["floor"]
    assert floor["ms_per_token"] == pytest.approx(1000 * floor["decode_weight_bytes"] / (floor["bandwidth_gb_s"] * 1e9))
    assert floor["bandwidth_gb_s"] == pytest.approx(2 * floor["copy_bytes"] / (floor["copy_ms"] / 1000) / 1e9)
    for key in ("tandem", "hf_eager"):
        column = data["decode"]["columns"][key]
        for value, ratio in zip(column["per_token_ms"], column["ratio_to_floor"]):
            assert ratio == (None if value is None else pytest.approx(value / floor["ms_per_token"], rel=1e-12))


def test_batch_part_reports_each_batch_size(run):
    batch, floor = run["data"]["batch"], run["data"]["floor"]["ms_per_token"]
    assert batch["batch_sizes"] == BATCH_SIZES and batch["output_tokens"] == BATCH_TOKENS
    assert batch["tokens"] == [[BATCH_TOKENS]] * len(BATCH_SIZES)  # every row decoded exactly the forced length
    for B, ms, ratio, rate, samples in zip(BATCH_SIZES, batch["step_ms"], batch["ratio_to_floor"],
                                           batch["tokens_per_s"], batch["samples"]["step_ms"]):
        assert ratio == pytest.approx(ms / floor) and rate == pytest.approx(1000 * B / ms)
        assert len(samples) == 2 and ms == pytest.approx(sorted(samples)[0] / 2 + sorted(samples)[1] / 2)
    assert "Decode ms per step, Tandem, one token for each of B sequences" in run["printed"]


def test_concurrency_part_runs_each_level_one_at_a_time_and_at_once(run):
    c = run["data"]["concurrency"]
    assert c["levels"] == CONCURRENCY and c["output_tokens"] == CONCURRENCY_TOKENS and c["prompt_tokens"] == 128
    columns = c["columns"]
    assert set(columns) == {"one_at_a_time", "concurrent"}
    for mode, column in columns.items():
        assert column["tokens"] == [[CONCURRENCY_TOKENS]] * len(CONCURRENCY), mode  # every request, the forced length
        for C, ms, rate, samples in zip(CONCURRENCY, column["ms"], column["tokens_per_s"], column["samples"]["ms"]):
            assert len(samples) == CONCURRENCY_REPEATS
            median_s = sorted(samples)[1] / 1000  # the middle one of 3
            assert ms == pytest.approx(1000 * median_s) and rate == pytest.approx(C * CONCURRENCY_TOKENS / median_s)
    one, at_once = columns["one_at_a_time"], columns["concurrent"]
    for i, C in enumerate(CONCURRENCY):
        assert c["ratio"][i] == pytest.approx(at_once["tokens_per_s"][i] / one["tokens_per_s"][i])
        # Alone, a request's first token comes from its prefill and each other token from one decode step.
        assert one["samples"]["decode_steps"][i] == [C * (CONCURRENCY_TOKENS - 1)] * CONCURRENCY_REPEATS
        assert min(at_once["samples"]["decode_steps"][i]) >= CONCURRENCY_TOKENS - 1
        if C > 1:  # at once, the requests share decode steps
            assert max(at_once["samples"]["decode_steps"][i]) < C * (CONCURRENCY_TOKENS - 1)
    assert "Concurrent requests, Tandem: C requests" in run["printed"]
    assert "--concurrency 1,4 --concurrency-tokens 7 --concurrency-repeats 3" in run["data"]["command"]


def test_concurrency_defaults():
    """1,8,32 requests of 128 tokens on a GPU; 1,16 with --quick or on the CPU, 16 tokens with --quick; its repeats
    are the run's unless given."""
    quick = BenchSettings(device="cpu", quick=True).resolve()
    assert (quick.concurrency, quick.concurrency_tokens, quick.concurrency_repeats) == ((1, 16), 16, 2)
    cpu = BenchSettings(device="cpu", repeats=5).resolve()
    assert (cpu.concurrency, cpu.concurrency_tokens, cpu.concurrency_repeats) == ((1, 16), 128, 5)
    assert BenchSettings(device="cpu", concurrency_repeats=1).resolve().concurrency_repeats == 1


def test_profile_sees_every_matmul_of_a_decode_step(run):
    """On the CPU the profile's rows are operators: a decode step of the torch backend runs four matmuls per layer
    (fused qkv, o, fused gate_up, down) and the output head, and the window holds exactly the steps asked for."""
    p = run["data"]["profile"]
    (decode,) = p["decode"].values()  # no CUDA graphs on the CPU: one mode
    assert decode["steps"] == PROFILE_STEPS and decode["cuda_graphs"] is False
    layers = PRESETS["2b-like"]["text_config"]["num_hidden_layers"]
    rows = {r["name"]: r for r in decode["rows"]}
    assert rows["aten::mm"]["calls"] == 4 * layers + 1
    assert decode["busy_ms_per_step"] <= decode["wall_ms_per_step"]
    for part in (decode, p["first_token"]):
        times = [r["ms"] for r in part["rows"]]
        assert times == sorted(times, reverse=True) and sum(r["share"] for r in part["rows"]) <= 1 + 1e-9


def test_profile_splits_the_first_token(run):
    f = run["data"]["profile"]["first_token"]
    assert f["image_tokens"] == (448 // 32) ** 2 and f["prompt_tokens"] > f["image_tokens"]
    assert f["prepare_ms"] + f["vision_ms"] + f["prefill_ms"] <= f["wall_ms"]
    assert f["busy_ms"] <= f["wall_ms"]


def test_floor_counts_the_weights_a_decode_step_reads(run):
    """2b-like ties its head to the embedding: a step reads the whole text model (embedding = head, layers, norm)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from tandem.models.config import parse_config
    from tandem.models.loader import load_model_from_state_dict
    from tandem.models.tiny import PRESETS

    hf = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**PRESETS["2b-like"]))
    text = sum(p.numel() * 4 for p in hf.model.language_model.parameters())
    assert run["data"]["model"]["decode_weight_bytes"] == run["data"]["floor"]["decode_weight_bytes"] == text
    untied = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**PRESETS["8b-like"]))
    model = load_model_from_state_dict(parse_config(untied.config.to_dict()), untied.state_dict(), "cpu", torch.float32)
    embed = untied.model.language_model.embed_tokens.weight
    text = sum(p.numel() * 4 for p in untied.model.language_model.parameters())
    assert decode_weight_bytes(model) == text - embed.numel() * 4 + embed.shape[1] * 4 + untied.lm_head.weight.numel() * 4


def test_both_implementations_get_identical_weights(tmp_path):
    """The harness's own build path (random transformers model -> state_dict -> Tandem) gives one model twice."""
    built = build_models("8b-like", torch.device("cpu"), torch.float32, 3, write_support_files(tmp_path), 256)
    ids = text_ids(40, 1)
    ours = built.engine.prompt_logits(built.engine.prepare(None, ids))
    with torch.no_grad():
        ref = built.hf(input_ids=torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert built.decode_weight_bytes < built.weight_bytes


def test_policy_medians_follow_the_most_frequent_branch():
    def one(total, branch, decode):
        stages = [{"model": "large", "role": "answer", "input_tokens": 9, "prefilled_tokens": 9, "expected_tokens": 4,
                   "output_tokens": 4, "vision_ms": 1.0, "prefill_ms": 2.0, "decode_ms": decode, "drafted": 0,
                   "accepted": 0, "verify_forwards": 0}]
        if branch.startswith("disagreed"):
            stages.append({**stages[0], "role": "transfer", "decode_ms": 50.0})
        return {"total_ms": total, "branch": branch, "stages": stages}

    runs = [one(10.0, "agreed: no transfer stage", 3.0), one(30.0, "disagreed: transfer stage ran", 7.0),
            one(12.0, "agreed: no transfer stage", 5.0)]
    summary = _policy_summary(runs)
    assert summary["total_ms"] == 12.0 and summary["stage_runs"] == 2
    assert summary["branches"] == {"agreed: no transfer stage": 2, "disagreed: transfer stage ran": 1}
    assert [s["role"] for s in summary["stages"]] == ["answer"] and summary["stages"][0]["decode_ms"] == 4.0


def test_compiled_column_is_unavailable_on_cpu_with_the_reason(run):
    compiled = run["data"]["decode"]["columns"]["hf_compiled"]
    assert set(compiled) == {"unavailable"} and compiled["unavailable"].startswith("not attempted on cpu")
    assert "HF static+compile: unavailable: not attempted on cpu" in run["printed"]


def test_png_is_a_valid_image_of_sensible_size(run, tmp_path):
    with Image.open(run["folder"] / "latency.png") as img:
        img.verify()
    with Image.open(run["folder"] / "latency.png") as img:
        assert img.format == "PNG" and img.width >= 600 and img.height >= 400
        assert len(img.convert("RGB").getcolors(1 << 20)) > 10  # something was drawn


def test_summary_names_device_and_dtype_on_every_table(run):
    summary = (run["folder"] / "summary.txt").read_text()
    assert summary.splitlines()[0].startswith("Tandem latency benchmark on cpu (")
    titles = [line for line in summary.splitlines()
              if line.startswith(("Decode", "Concurrent", "Prefill", "Vision", "Speculation", "Profile", "Policies"))]
    assert len(titles) == 9
    for title in titles:
        assert ", float32" in title and "on cpu (" in title, title
    assert "transformers 5." in summary and "command: tandem bench" in summary


def test_skip_hf_and_a_subset_of_parts(tmp_path):
    code, printed = _run(["bench", "--quick", "--parts", "decode", "--skip-hf", "--device", "cpu", "--repeats", "1",
                          "--lengths", "2", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert "policies" not in data and "vision" not in data and data["complete"]
    assert data["model"]["preset"] == "2b-like"  # --quick on the CPU: the tiny default
    columns = data["decode"]["columns"]
    assert columns["hf_eager"] == {"unavailable": "skipped (--skip-hf)"} == columns["hf_compiled"]
    assert columns["tandem"]["tokens"] == [[2]]
    assert (tmp_path / "latency.png").is_file() and "HF eager: unavailable: skipped (--skip-hf)" in printed


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    """A part that raises (here prefill, made to fail) becomes {"unavailable": why}; the parts after it run, the
    run completes, and the summary says which part failed and why."""
    from tandem.bench import latency

    def broken(*args):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(latency, "bench_prefill", broken)
    code, printed = _run(["bench", "--quick", "--parts", "decode,prefill,vision", "--skip-hf", "--device", "cpu",
                          "--repeats", "1", "--lengths", "2", "--image-sizes", "64", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench.json").read_text())
    assert code == 0 and data["complete"]
    assert data["prefill"] == {"unavailable": "prefill failed: RuntimeError: injected failure"}
    assert data["decode"]["columns"]["tandem"]["tokens"] == [[2]] and data["vision"]["sizes"] == [64]
    assert "prefill: unavailable: prefill failed: RuntimeError: injected failure" in printed


@pytest.mark.parametrize("args, message", [
    (["--preset", "qwen3-vl-70b"], "unknown preset 'qwen3-vl-70b'"),
    (["--pair", "8b-like,nope"], "unknown preset 'nope'"),
    (["--check-tokens", "4,17"], "check_tokens go up to 16, the longest chunk run as decode rows; got 17"),
])
def test_bad_presets_exit_2_before_any_work(args, message, capsys):
    assert main(["bench", "--quick", "--device", "cpu", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--lengths", "0,4"], ["--parts", "decode,speed"], ["--pair", "8b-like"]])
def test_malformed_lists_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args])
    assert exit_info.value.code == 2
    assert "tandem bench: error:" in capsys.readouterr().err
