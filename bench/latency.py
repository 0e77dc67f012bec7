"""`tandem bench`: the latency study, with transformers and the bandwidth floor side by side in one run.

Every model is a real-size (or tiny) Qwen3-VL config with random weights, built directly on the device in the
benchmark dtype by transformers' own `Qwen3VLForConditionalGeneration` (weights overwritten by
`tandem.models.tiny.perturb_weights`, seeded); Tandem's model is loaded from that model's `state_dict()`, so every column
runs the same config and the same weights on the same device. Latency does not depend on weight values.

Method: every timed region starts and ends with the device synchronised
(`Engine.now()`; transformers' side uses the same synchronise + `time.perf_counter`; the copy bandwidth uses CUDA
events on CUDA); every configuration is warmed up untimed first; each number is the median over `repeats` timed
runs, and the raw samples are kept in bench.json. Repeats are interleaved (repeat 1 of every length and column,
then repeat 2, ...), so slow drift hits every column alike.

Columns:
- decode, Tandem: `Engine.generate(prompt_token_ids=P random text ids, SamplingParams(max_tokens=L, temperature=0,
  ignore_eos=True))`, one request per output length L. Per-token = Timings.decode_s / (L - 1) (decode_s runs from
  the prefill's logits to the L-th sampled token: L - 1 forward passes); total = the synchronised wall time of the
  whole `generate` call (prefill, decode, detokenization); first_token_ms = Timings.prefill_s.
- decode, transformers eager: `generate(max_new_tokens=L, min_new_tokens=L, do_sample=False)` on the same ids, its
  end-of-sequence id unset (Tandem's ignore_eos), default attention implementation, no compilation. Per-step timing:
  a StoppingCriteria that never stops synchronises and reads the clock after every sampled token; per-token =
  (time of token L - time of token 1) / (L - 1), the same L - 1 forward passes Tandem's decode_s covers. Total =
  wall time of the `generate` call; first_token_ms = from the call's start to the first token (setup included).
- decode, transformers static cache + torch.compile: the same call with `past_key_values=StaticCache(max_cache_len=
  P + max L)` (one cache for every L, reset before each call, so shapes never change) and `compile_config=
  CompileConfig()` (transformers compiles its forward for the decode steps: inductor, mode reduce-overhead). CUDA
  only; where it is not run, or fails, or transformers declines to compile, the column says "unavailable: <why>".
- decode, steps past a stop (Tandem): a greedy reply of 16 tokens; its 4th token becomes the stop id of the same
  request run again (ignore_eos); steps_past_stop = Timings.decode_steps - (output tokens - 1): the decode steps
  the engine ran after the one that sampled the stop token.
- floor: bytes of every weight one decode step reads (the text decoder's layers and final norm, the output head,
  one embedding row) / device copy bandwidth (2 x buffer bytes / median time of `dst.copy_(src)` on a 1 GiB
  buffer, smaller on the CPU). The KV cache the step also reads is not counted: the floor is a lower bound.
  ratio = column value / floor.
- batch, Tandem only: `Engine.generate_batch` of B prompts (P random text ids each, other ids per row), exactly
  batch_tokens greedy tokens each. ms per step = Timings.decode_s / (batch_tokens - 1): one step feeds one token to
  each of the B sequences; tokens/s = B / step; ratio = step / floor (a step reads the weights once, whatever B).
- concurrency, Tandem only: for each level C, C requests of P random text ids (other ids per request), exactly
  concurrency_tokens greedy tokens each, run one at a time (each `Engine.generate` after the previous returned) and
  at once (every `Engine.submit` from one thread, then every `result()`: the engine's loop batches them as they
  arrive). Each run is timed whole; tokens/s = C x concurrency_tokens / its time; ratio = tokens/s at once / one at
  a time; decode_steps = the engine's decode steps the run took (EngineStats.decode_steps): C x (tokens - 1) one at
  a time. Warm-up: one request alone (the shapes of every one-at-a-time run), then each level at once; the repeats
  are concurrency_repeats (default: repeats).
- prefill: Timings.prefill_s of `generate(max_tokens=1)` on P random text ids; transformers: one forward of the same
  ids with use_cache=True and logits_to_keep=1.
- vision: the vision tower alone (`model.visual`, as the engine runs it) on one square image preprocessed by Tandem
  (its preprocessing is timed separately); transformers: `model.visual(pixel_values, grid_thw)` on the same pixels. First token, Tandem:
  the synchronised wall time of `generate` with max_tokens=1 on the chat message (that image as an array + a
  one-line question): tokenization, preprocessing, vision encoder, prefill and the first sampled token.
- policies: `Tandem(large, small, budget=Budget(short, reason, temperature=0, ignore_eos=True))`, every policy on one
  square image, a fresh image (same size, other pixels) for every run so the vision cache never hits. Total = the
  synchronised wall time of `answer()`; per stage its own vision / prefill / decode seconds and token counts.
  verify also reports its verdict time (TandemResult.verdict_s: from the call to the agreement check, what the whole
  request costs when the answers agree; random models rarely agree, so the transfer stage usually runs after it),
  and runs a second time with its two first stages one after the other ("verify (sequential)"): the gain of
  running them at once, each in its engine's loop (on a GPU, on two CUDA streams).
- check (tandem.bench.check): what a speculation's check costs the target. For each context length L, a held
  sequence of L random text ids; for each chunk size n, `Engine.submit_verify` of n random ids in place (logits at
  every position), the device synchronised around it, then the n tokens cut off again: once with the runner's
  chunk_rows = 16 (the chunk runs as one decode-shaped step of n rows, replaying a CUDA graph where decode steps
  do) and once with chunk_rows = 0 (a prefill). Two untimed warm-ups per configuration (a shape's first step
  runs eagerly, its second is captured). ratio = rows / prefill; n = 1 is a decode step's work.
- profile (tandem.bench.profiling): where the time goes, for a missed target. torch.profiler over
  profile_steps decode steps at batch 1 (with CUDA graphs and, on a GPU, without), and over one first-token request
  with one image of the policies' size: the top kernels (operators on the CPU) per step, device busy time vs wall.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tandem.bench.build import build_models, free_memory
from tandem.bench.check import MODES, WARMUPS, bench_check
from tandem.bench.concurrency import bench_concurrency
from tandem.bench.decode import STOP_CHECK_TOKENS, bench_batch, bench_decode, bench_decode_compiled, measure_floor
from tandem.bench.latency_report import write_outputs
from tandem.bench.policies import bench_policies
from tandem.bench.prefill import bench_prefill, bench_vision
from tandem.bench.profiling import bench_profiles
from tandem.bench.settings import BenchSettings
from tandem.bench.timing import Progress, error_text, unavailable
from tandem.kernels.backend import implementation, use_backend
from tandem.models.tiny import write_support_files
from tandem.runtime.config import DEFAULT_PAGE_SIZE
from tandem.runtime.pipeline import POLICIES


def run_benchmark(settings: BenchSettings, command: str, out_dir: Path | None = None, progress: bool = True) -> dict:
    """Run every requested part; write bench.json / summary.txt / latency.png under out_dir after each part (a run
    cut short keeps what it measured, with "complete": false). Returns the result dictionary."""
    s = settings.resolve()
    device, dtype = s.torch_device, s.torch_dtype
    settings_json = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()}
    result: dict[str, Any] = {
        "benchmark": "tandem bench", "complete": False, "command": command, "process_argv": shlex.join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device), "dtype": s.dtype, "settings": settings_json, "kernels": _kernels(s),
        "method": __doc__.split("\n\n", 1)[1].strip(),
    }
    bar = Progress(_planned_runs(s), progress)
    save = (lambda: write_outputs(result, out_dir)) if out_dir is not None else (lambda: None)
    try:
        with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp:
            files = write_support_files(Path(tmp))
            single = [p for p in s.parts if p != "policies"]
            if single:
                built = build_models(s.preset, device, dtype, s.seed, files, _kv_tokens(s), s.kernel_backend,
                                     keep_hf=not s.skip_hf)
                bar.step(f"built {s.preset}")
                result["model"] = {
                    "preset": s.preset, "weights": f"random (seed {s.seed}), identical for every column",
                    "parameters": built.parameters, "weight_bytes": built.weight_bytes,
                    "decode_weight_bytes": built.decode_weight_bytes,
                    "hf_attn_implementation": getattr(built.hf.config, "_attn_implementation", None) if built.hf else None,
                }
                floor_ms = None
                if {"decode", "batch"} & set(s.parts):
                    result["floor"] = measure_floor(device, s.copy_bytes, built.decode_weight_bytes)
                    floor_ms = result["floor"]["ms_per_token"]
                    bar.step("copy bandwidth")
                parts = {"decode": (bench_decode, floor_ms), "batch": (bench_batch, floor_ms),
                         "concurrency": (bench_concurrency,), "prefill": (bench_prefill,), "vision": (bench_vision,),
                         "check": (bench_check,)}
                for name, (part, *extra) in parts.items():
                    if name in s.parts:
                        result[name] = _measured(name, part, built, s, bar, *extra)
                        save()
                if "columns" in result.get("decode", {}):
                    result["decode"]["columns"]["hf_compiled"] = bench_decode_compiled(built, s, bar, floor_ms)
                    save()
                if "profile" in s.parts:  # last: no CUDA graph is captured after a profiler session
                    result["profile"] = _measured("profile", bench_profiles, built, s, bar)
                    save()
                del built
                free_memory(device)
            if "policies" in s.parts:
                result["policies"] = _measured("policies", bench_policies, s, files, bar)
        result["complete"] = True
        save()
    finally:
        bar.close()
    return result


def _kv_tokens(s: BenchSettings) -> int:
    """KV cache of the single-model parts' engine: room for the largest of them at once."""
    return max(s.decode_prompt_tokens + max(*s.lengths, STOP_CHECK_TOKENS), max(s.prompt_lengths) + 1,
               (max(s.image_sizes) // 32 + 2) ** 2 + 256,
               max(s.batch_sizes) * (s.decode_prompt_tokens + s.batch_tokens + DEFAULT_PAGE_SIZE),
               max(s.concurrency) * (s.decode_prompt_tokens + s.concurrency_tokens + DEFAULT_PAGE_SIZE),
               max(s.check_contexts) + max(s.check_tokens) + DEFAULT_PAGE_SIZE,
               s.decode_prompt_tokens + s.profile_steps + 64,  # + the polls around the profile's window
               (s.policy_image_size // 32 + 2) ** 2 + 256)


def _planned_runs(s: BenchSettings) -> int:
    """The progress bar's total: every run the parts will make, warm-ups included."""
    per_config = 1 + s.repeats  # one warm-up, then the timed repeats
    hf = 0 if s.skip_hf else 1
    compiled = hf and not s.skip_compile and s.torch_device.type == "cuda"
    total = 0
    if set(s.parts) - {"policies"}:
        total += 1  # build
    if {"decode", "batch"} & set(s.parts):
        total += 1  # copy bandwidth
    if "decode" in s.parts:
        total += (1 + hf + compiled) * (1 + s.repeats * len(s.lengths)) + 1  # + the stop check
    if "batch" in s.parts:
        total += per_config * len(s.batch_sizes)
    if "concurrency" in s.parts:  # one request alone, each level at once; then both ways per level and repeat
        total += 1 + len(s.concurrency) + 2 * s.concurrency_repeats * len(s.concurrency)
    if "prefill" in s.parts:
        total += (1 + hf) * per_config * len(s.prompt_lengths)
    if "vision" in s.parts:
        total += (2 + hf) * per_config * len(s.image_sizes)
    if "check" in s.parts:
        total += len(MODES) * (WARMUPS + s.repeats) * len(s.check_contexts) * len(s.check_tokens)
    if "profile" in s.parts:
        total += 3 if s.torch_device.type == "cuda" else 2  # decode with (and on a GPU without) graphs; first token
    if "policies" in s.parts:
        total += 2 + (len(POLICIES) + 1) * per_config
    return total


def _measured(name: str, part, *args) -> dict:
    """A part's result, or {"unavailable": why} when it fails (a transformers call that breaks on one device, a
    profiler that cannot start): the failure is reported, with its traceback on stderr, and later parts still run."""
    try:
        return part(*args)
    except Exception as e:  # noqa: BLE001 - reported in bench.json and the summary
        traceback.print_exc()
        return unavailable(f"{name} failed: {error_text(e)}")


# ---- where it ran ------------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"device": device.type, "torch": torch.__version__, "triton": triton_version,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda, "driver": None}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["device_name"] = torch.cuda.get_device_name(index)
        info["device_memory_gib"] = torch.cuda.get_device_properties(index).total_memory / 2**30
        try:
            out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["driver"] = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        info["device_name"] = _cpu_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _kernels(s: BenchSettings) -> dict:
    with use_backend(s.kernel_backend):
        return {"requested": s.kernel_backend or os.environ.get("TANDEM_KERNEL_BACKEND", "auto"),
                "ops": implementation(s.torch_device), "vision_attention": implementation(s.torch_device, has_flash=True)}
