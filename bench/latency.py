"""`tandem bench`: the latency study, with transformers and the bandwidth floor side by side in one run.

Every model is a real-size (or tiny) Qwen3-VL config with random weights, built directly on the device in the
benchmark dtype by transformers' own `Qwen3VLForConditionalGeneration` (weights overwritten by
`tandem.models.tiny.perturb_weights`, seeded); Tandem's model is loaded from that model's `state_dict()`, so every column
runs the same config and the same weights on the same device. Latency does not depend on weight values.

Method (DESIGN.md, "Performance method"): every timed region starts and ends with the device synchronised
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
- profile (tandem.bench.profiling): where the time goes, for a missed target. torch.profiler over
  profile_steps decode steps at batch 1 (with CUDA graphs and, on a GPU, without), and over one first-token request
  with one image of the policies' size: the top kernels (operators on the CPU) per step, device busy time vs wall.
"""

from __future__ import annotations

import copy
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tandem.bench.latency_report import write_outputs
from tandem.bench.profiling import forced_greedy, profile_decode, profile_first_token
from tandem.kernels.backend import implementation, use_backend
from tandem.models.config import parse_config
from tandem.models.errors import InputError
from tandem.models.image import ImageProcessorConfig, preprocess_images
from tandem.models.loader import load_model_from_state_dict
from tandem.models.qwen3_vl import Qwen3VL
from tandem.models.tiny import GENERATION_CONFIG, PRESETS, perturb_weights, write_support_files
from tandem.models.tokenizer import Tokenizer
from tandem.runtime.config import DEFAULT_PAGE_SIZE, EngineConfig, parse_dtype
from tandem.runtime.engine import Engine, device_clock
from tandem.runtime.kv_cache import PagePool
from tandem.runtime.pipeline import POLICIES, Budget, Tandem
from tandem.runtime.sampling import checkpoint_defaults

PARTS = ("decode", "batch", "prefill", "vision", "profile", "policies")
SEQUENTIAL_VERIFY = "verify (sequential)"  # verify with its two first stages one after the other: the overlap's gain
FULL_LENGTHS = tuple(2**i for i in range(11))  # 1 .. 1024 output tokens
QUICK_LENGTHS = (1, 4, 16)
FULL_IMAGE_SIZES = (224, 448, 672, 896, 1120, 1344)
QUICK_IMAGE_SIZES = (224, 448)
FULL_PROMPT_LENGTHS = (128, 256, 512, 1024, 2048, 4096)
QUICK_PROMPT_LENGTHS = (128, 512)
DECODE_PROMPT_TOKENS = 128
FULL_BATCH_SIZES = (1, 2, 4, 8)
QUICK_BATCH_SIZES = (1, 3)
FULL_BATCH_TOKENS = 128
QUICK_BATCH_TOKENS = 6
FULL_PROFILE_STEPS = 64
QUICK_PROFILE_STEPS = 8
POLICY_IMAGE_SIZE = 448
QUESTION = "What is the main object in this picture, and what color is it?"
TEXT_ID_LIMIT = 151643  # ids below this are ordinary byte-pair tokens (no special or image-pad id)
PAD_ID = GENERATION_CONFIG["pad_token_id"]
COPY_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20, "cpu-quick": 16 << 20}
COPY_SAMPLES = 20
STOP_CHECK_TOKENS = 16  # the stop check's reply length ...
STOP_POSITION = 4  # ... and the 1-based position of the token that becomes its stop id


@dataclass
class BenchSettings:
    """What one `tandem bench` run measures. `resolve` fills the device-, dtype- and --quick-dependent defaults."""

    preset: str | None = None  # the single-model parts' model (default qwen3-vl-2b; 2b-like with --quick or on CPU)
    pair: tuple[str, str] | None = None  # (large, small) for the policies (default qwen3-vl-8b + qwen3-vl-2b)
    device: str | None = None
    dtype: str | None = None
    parts: tuple[str, ...] = PARTS
    quick: bool = False
    repeats: int | None = None
    lengths: tuple[int, ...] | None = None
    image_sizes: tuple[int, ...] | None = None
    prompt_lengths: tuple[int, ...] | None = None
    batch_sizes: tuple[int, ...] | None = None
    batch_tokens: int | None = None
    profile_steps: int | None = None
    decode_prompt_tokens: int = DECODE_PROMPT_TOKENS
    short_tokens: int = 4
    reason_tokens: int | None = None
    policy_image_size: int = POLICY_IMAGE_SIZE
    skip_hf: bool = False
    skip_compile: bool = False
    kernel_backend: str | None = None
    copy_bytes: int | None = None
    seed: int = 0

    def resolve(self) -> BenchSettings:
        s = copy.copy(self)
        if s.device is None:
            s.device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(s.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {s.device!r} requested, but torch sees no CUDA device")
        if device.type not in ("cuda", "cpu"):
            raise InputError(f"device {s.device!r}: the benchmark runs on cuda or cpu")
        s.dtype = str(parse_dtype(s.dtype, device)).removeprefix("torch.")
        tiny = s.quick or device.type == "cpu"
        s.preset = s.preset or ("2b-like" if tiny else "qwen3-vl-2b")
        s.pair = tuple(s.pair) if s.pair else (("8b-like", "2b-like") if tiny else ("qwen3-vl-8b", "qwen3-vl-2b"))
        s.repeats = s.repeats or (2 if s.quick else 3)
        s.lengths = tuple(s.lengths or (QUICK_LENGTHS if s.quick else FULL_LENGTHS))
        s.image_sizes = tuple(s.image_sizes or (QUICK_IMAGE_SIZES if s.quick else FULL_IMAGE_SIZES))
        s.prompt_lengths = tuple(s.prompt_lengths or (QUICK_PROMPT_LENGTHS if s.quick else FULL_PROMPT_LENGTHS))
        s.reason_tokens = s.reason_tokens or (32 if s.quick else 256)
        s.batch_sizes = tuple(s.batch_sizes or (QUICK_BATCH_SIZES if s.quick else FULL_BATCH_SIZES))
        s.batch_tokens = s.batch_tokens or (QUICK_BATCH_TOKENS if s.quick else FULL_BATCH_TOKENS)
        s.profile_steps = s.profile_steps or (QUICK_PROFILE_STEPS if s.quick else FULL_PROFILE_STEPS)
        s.copy_bytes = s.copy_bytes or COPY_BYTES["cuda" if device.type == "cuda" else "cpu-quick" if s.quick else "cpu"]
        s.parts = tuple(p for p in PARTS if p in s.parts)  # measurement order is fixed
        s._check()
        return s

    def _check(self) -> None:
        for name in (self.preset, *self.pair):
            if name not in PRESETS:
                raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        if len(self.pair) != 2:
            raise InputError(f"--pair takes LARGE,SMALL, got {','.join(self.pair)!r}")
        if not self.parts:
            raise InputError(f"no part to run; choose from {', '.join(PARTS)}")
        if self.repeats < 1:
            raise InputError(f"repeats must be at least 1, got {self.repeats}")
        for name in ("lengths", "image_sizes", "prompt_lengths", "batch_sizes"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise InputError(f"{name} must be positive integers, got {list(values)}")
        if min(self.image_sizes) < 32 or self.policy_image_size < 32:
            raise InputError("image sizes must be at least 32 pixels")
        if self.short_tokens < 1 or self.reason_tokens < 1 or self.decode_prompt_tokens < 1:
            raise InputError("token budgets and the decode prompt length must be positive")
        if self.profile_steps < 1:
            raise InputError(f"profile_steps must be positive, got {self.profile_steps}")
        if self.batch_tokens < 2:
            raise InputError(f"batch_tokens must be at least 2 (one decode step), got {self.batch_tokens}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype, self.torch_device)


# ---- timing ------------------------------------------------------------------------------------------------------
def median(samples: list[float | None]) -> float | None:
    values = [s for s in samples if s is not None]
    return statistics.median(values) if values else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


class _StepClock:
    """A transformers StoppingCriteria that never stops: it reads the synchronised clock after every sampled token."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs) -> torch.Tensor:
        self.times.append(device_clock(self.device))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class Progress:
    """One tqdm bar over every run of the benchmark (warm-ups included)."""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="run", desc="tandem bench", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True)

    def step(self, what: str, n: int = 1) -> None:
        self.bar.set_postfix_str(what, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _planned_runs(s: BenchSettings) -> int:
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
    if "prefill" in s.parts:
        total += (1 + hf) * per_config * len(s.prompt_lengths)
    if "vision" in s.parts:
        total += (2 + hf) * per_config * len(s.image_sizes)
    if "profile" in s.parts:
        total += 3 if s.torch_device.type == "cuda" else 2  # decode with (and on a GPU without) graphs; first token
    if "policies" in s.parts:
        total += 2 + (len(POLICIES) + 1) * per_config
    return total


# ---- models ------------------------------------------------------------------------------------------------------
@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@dataclass
class Built:
    preset: str
    engine: Engine
    hf: Any  # transformers' Qwen3VLForConditionalGeneration with the same weights, or None once dropped
    parameters: int
    weight_bytes: int
    decode_weight_bytes: int


def decode_weight_bytes(model: Qwen3VL) -> int:
    """Bytes of weights one decode step reads: the text decoder (layers, final norm), the output head and one
    embedding row (a tied head is the embedding table, read whole as the head)."""
    tied = model.config.tie_word_embeddings
    total = sum(p.numel() * p.element_size() for name, p in model.language_model.named_parameters()
                if tied or not name.startswith("embed_tokens."))
    if not tied:
        head = model.lm_head.weight
        total += head.numel() * head.element_size() + head.shape[1] * head.element_size()
    return total


def build_models(preset: str, device: torch.device, dtype: torch.dtype, seed: int, files: Path, kv_tokens: int,
                 kernel_backend: str | None = None, keep_hf: bool = True) -> Built:
    """transformers' model with random weights, built on `device` in `dtype`, and Tandem's Engine on the same weights."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device, _default_dtype(dtype):
        torch.manual_seed(seed)
        hf = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**copy.deepcopy(PRESETS[preset])))
        perturb_weights(hf)
    if any(p.dtype != dtype for p in hf.parameters()):  # every parameter was created in `dtype`; this is a guard
        hf = hf.to(dtype)
    hf = hf.eval().requires_grad_(False)  # buffers (rotary inv_freq) stay float32, as from_pretrained leaves them
    hf.generation_config.eos_token_id = None  # forced lengths, as Tandem's ignore_eos
    hf.generation_config.pad_token_id = PAD_ID
    config = parse_config(hf.config.to_dict())
    model = load_model_from_state_dict(config, hf.state_dict(), device, dtype)
    defaults, eos_ids = checkpoint_defaults(files)
    pool = PagePool(config.text, -(-kv_tokens // DEFAULT_PAGE_SIZE) + 2, DEFAULT_PAGE_SIZE, device, dtype)
    engine = Engine(model, Tokenizer.from_pretrained(files), ImageProcessorConfig.from_checkpoint(files), pool,
                    defaults, eos_ids, EngineConfig(kernel_backend=kernel_backend))
    parameters = sum(p.numel() for p in model.parameters())
    built = Built(preset, engine, hf if keep_hf else None, parameters,
                  sum(p.numel() * p.element_size() for p in model.parameters()), decode_weight_bytes(model))
    if not keep_hf:
        del hf
        _free(device)
    return built


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def image_question(image: np.ndarray) -> list[dict]:
    """The one-image request of the first-token measurements: the image and QUESTION in one user turn."""
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def text_ids(n: int, seed: int) -> list[int]:
    """n seeded random ordinary-token ids (no special or image-pad id)."""
    return torch.randint(0, TEXT_ID_LIMIT, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def bench_image(size: int, seed: int) -> np.ndarray:
    """A square HWC uint8 image with structure (gradients) and seeded noise: other seed, other pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 // max(size - 1, 1), y * 255 // max(size - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)


# ---- measurements ------------------------------------------------------------------------------------------------
def measure_floor(device: torch.device, nbytes: int, weight_bytes: int) -> dict:
    """Copy bandwidth (2 x bytes / median copy time, 3 untimed copies first) and the decode floor it implies."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    samples = []
    for _ in range(COPY_SAMPLES):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            samples.append(time.perf_counter() - t0)
    del src, dst
    _free(device)
    copy_s = statistics.median(samples)
    bandwidth = 2 * nbytes / copy_s
    return {
        "copy_bytes": nbytes, "copy_ms": 1000 * copy_s, "copy_samples_ms": [1000 * s for s in samples],
        "timer": "cuda events" if device.type == "cuda" else "perf_counter",
        "bandwidth_gb_s": bandwidth / 1e9, "decode_weight_bytes": weight_bytes,
        "ms_per_token": 1000 * weight_bytes / bandwidth,
    }


def _tandem_decode(engine: Engine, ids: list[int], length: int) -> dict:
    params = forced_greedy(length)
    start = engine.now()
    out = engine.generate(prompt_token_ids=ids, sampling=params)
    total = engine.now() - start
    t = out.timings
    return {"total_s": total, "per_token_s": t.decode_s / (length - 1) if length > 1 else None,
            "first_token_s": t.prefill_s, "tokens": len(out.token_ids)}


def _hf_decode(hf, ids: torch.Tensor, length: int, device: torch.device, cache=None, compile_config=None) -> dict:
    from transformers import StoppingCriteriaList

    clock = _StepClock(device)
    kwargs: dict[str, Any] = {}
    if cache is not None:
        cache.reset()
        kwargs = {"past_key_values": cache, "compile_config": compile_config}
    start = device_clock(device)
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length, min_new_tokens=length,
                      do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=PAD_ID,
                      stopping_criteria=StoppingCriteriaList([clock]), **kwargs)
    total = device_clock(device) - start
    steps = clock.times
    return {"total_s": total, "per_token_s": (steps[-1] - steps[0]) / (len(steps) - 1) if len(steps) > 1 else None,
            "first_token_s": steps[0] - start if steps else None, "tokens": out.shape[1] - ids.shape[1]}


def _column(lengths: tuple[int, ...], runs: dict[int, list[dict]], floor_ms: float | None) -> dict:
    """Medians per length of a decode column's runs, with the raw samples and the ratio to the floor."""
    per_token = [_ms(median([r["per_token_s"] for r in runs[L]])) for L in lengths]
    return {
        "per_token_ms": per_token,
        "total_ms": [_ms(median([r["total_s"] for r in runs[L]])) for L in lengths],
        "first_token_ms": [_ms(median([r["first_token_s"] for r in runs[L]])) for L in lengths],
        "ratio_to_floor": [None if v is None or not floor_ms else v / floor_ms for v in per_token],
        "tokens": [sorted({r["tokens"] for r in runs[L]}) for L in lengths],
        "samples": {"per_token_ms": [[_ms(r["per_token_s"]) for r in runs[L]] for L in lengths],
                    "total_ms": [[_ms(r["total_s"]) for r in runs[L]] for L in lengths]},
    }


def _unavailable(reason: str) -> dict:
    return {"unavailable": reason}


def _error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:400]}"


def bench_decode(built: Built, s: BenchSettings, progress: Progress, floor_ms: float | None) -> dict:
    """Tandem and transformers eager, interleaved repeat by repeat (the compiled column comes later, on its own)."""
    engine, device = built.engine, s.torch_device
    ids = text_ids(s.decode_prompt_tokens, s.seed)
    ids_t = torch.tensor([ids], device=device)
    runners = {"tandem": lambda L: _tandem_decode(engine, ids, L)}
    if built.hf is not None:
        runners["hf_eager"] = lambda L: _hf_decode(built.hf, ids_t, L, device)
    # Tandem warms up at every length: each block-table width compiles its kernels and captures its CUDA graph once.
    for L in s.lengths:
        runners["tandem"](L)
    progress.step("decode warm-up tandem")
    if "hf_eager" in runners:  # nothing to compile: one short run
        runners["hf_eager"](min(max(s.lengths), 16))
        progress.step("decode warm-up hf_eager")
    runs: dict[str, dict[int, list[dict]]] = {name: {L: [] for L in s.lengths} for name in runners}
    for rep in range(s.repeats):
        for L in s.lengths:
            for name, run in runners.items():
                runs[name][L].append(run(L))
                progress.step(f"decode {name} {L} tokens ({rep + 1}/{s.repeats})")
    columns = {name: _column(s.lengths, r, floor_ms) for name, r in runs.items()}
    if built.hf is None:
        columns["hf_eager"] = _unavailable("skipped (--skip-hf)")
    stop = measure_stop(engine, ids)
    progress.step("decode stop check")
    return {"prompt_tokens": s.decode_prompt_tokens, "lengths": list(s.lengths), "columns": columns, "stop": stop}


def measure_stop(engine: Engine, ids: list[int]) -> dict:
    """Decode steps run past a stop: a greedy reply of STOP_CHECK_TOKENS tokens, then the same request with the
    reply's STOP_POSITION-th token as its stop id (ignore_eos: no other id stops it). The reply now ends at that
    id's first occurrence, and the steps the engine ran after the one that sampled it were wasted:
    steps_past_stop = decode_steps - (output_tokens - 1), as the first token comes out of the prefill."""
    free = engine.generate(prompt_token_ids=ids, sampling=forced_greedy(STOP_CHECK_TOKENS)).token_ids
    stop = free[STOP_POSITION - 1]
    out = engine.generate(prompt_token_ids=ids,
                          sampling=replace(forced_greedy(STOP_CHECK_TOKENS), stop_token_ids=(stop,)))
    steps = out.timings.decode_steps
    return {"max_tokens": STOP_CHECK_TOKENS, "stop_position": STOP_POSITION, "stop_token_id": stop,
            "expected_tokens": free.index(stop) + 1, "output_tokens": len(out.token_ids),
            "finish_reason": out.finish_reason, "decode_steps": steps,
            "steps_past_stop": steps - (len(out.token_ids) - 1)}


def bench_decode_compiled(built: Built, s: BenchSettings, progress: Progress, floor_ms: float | None) -> dict:
    """transformers with a static cache and its compiled decode forward; "unavailable: why" where it cannot run."""
    device = s.torch_device
    planned = 1 + s.repeats * len(s.lengths)
    if built.hf is None:
        return _unavailable("skipped (--skip-hf)")
    if s.skip_compile:
        return _unavailable("skipped (--skip-compile)")
    if device.type != "cuda":
        return _unavailable(f"not attempted on {device.type}: transformers compiles the decode forward for CUDA "
                            "(inductor, CUDA graphs); this column is measured on a GPU only")
    done = 0
    try:
        from transformers import CompileConfig, StaticCache

        ids = torch.tensor([text_ids(s.decode_prompt_tokens, s.seed)], device=device)
        cache = StaticCache(config=built.hf.config, max_cache_len=s.decode_prompt_tokens + max(s.lengths))
        compile_config = CompileConfig()
        start = time.perf_counter()
        for _ in range(2):  # the first call compiles; the second records the CUDA graphs (reduce-overhead)
            _hf_decode(built.hf, ids, min(max(s.lengths), 16), device, cache, compile_config)
        warmup_s = time.perf_counter() - start
        done += 1
        progress.step("decode warm-up hf_compiled (compiling)")
        if getattr(built.hf, "_compiled_call", None) is None:
            raise RuntimeError("transformers did not compile the decode forward (its auto-compile criteria were not met)")
        runs: dict[int, list[dict]] = {L: [] for L in s.lengths}
        for rep in range(s.repeats):
            for L in s.lengths:
                runs[L].append(_hf_decode(built.hf, ids, L, device, cache, compile_config))
                done += 1
                progress.step(f"decode hf_compiled {L} tokens ({rep + 1}/{s.repeats})")
        column = _column(s.lengths, runs, floor_ms)
        column["compile"] = {"config": {k: str(v) for k, v in compile_config.to_dict().items()},
                             "static_cache_tokens": s.decode_prompt_tokens + max(s.lengths),
                             "warmup_s_including_compilation": warmup_s}
        return column
    except Exception as e:  # noqa: BLE001 - any failure of the compiled path is reported, never fatal
        progress.step("hf_compiled failed", planned - done)
        torch._dynamo.reset()
        _free(device)
        return _unavailable(_error_text(e))


def bench_batch(built: Built, s: BenchSettings, progress: Progress, floor_ms: float | None) -> dict:
    """Tandem's decode step at each batch size: B prompts of P random text ids (other ids per row), exactly
    batch_tokens greedy tokens each, decoded together by `Engine.generate_batch`."""
    engine = built.engine
    prompts = {B: [engine.prepare(None, text_ids(s.decode_prompt_tokens, s.seed + row)) for row in range(B)]
               for B in s.batch_sizes}
    params = forced_greedy(s.batch_tokens)

    def run(B: int) -> dict:
        outs = engine.generate_batch(prompts[B], params)
        return {"step_s": outs[0].timings.decode_s / (s.batch_tokens - 1),
                "tokens": sorted({len(o.token_ids) for o in outs})}

    for B in s.batch_sizes:
        run(B)
        progress.step(f"batch warm-up {B}")
    runs: dict[int, list[dict]] = {B: [] for B in s.batch_sizes}
    for rep in range(s.repeats):
        for B in s.batch_sizes:
            runs[B].append(run(B))
            progress.step(f"batch {B} x {s.batch_tokens} tokens ({rep + 1}/{s.repeats})")
    step_ms = [_ms(median([r["step_s"] for r in runs[B]])) for B in s.batch_sizes]
    return {
        "prompt_tokens": s.decode_prompt_tokens, "output_tokens": s.batch_tokens, "batch_sizes": list(s.batch_sizes),
        "step_ms": step_ms, "ratio_to_floor": [v / floor_ms if floor_ms else None for v in step_ms],
        "tokens_per_s": [1000 * B / v for B, v in zip(s.batch_sizes, step_ms)],
        "tokens": [sorted({n for r in runs[B] for n in r["tokens"]}) for B in s.batch_sizes],
        "samples": {"step_ms": [[_ms(r["step_s"]) for r in runs[B]] for B in s.batch_sizes]},
    }


def bench_prefill(built: Built, s: BenchSettings, progress: Progress) -> dict:
    engine, device = built.engine, s.torch_device
    params = forced_greedy(1)
    tandem, hf = [], []
    for n in s.prompt_lengths:
        ids = text_ids(n, s.seed + n)
        samples = []
        for i in range(1 + s.repeats):
            out = engine.generate(prompt_token_ids=ids, sampling=params)
            if i:
                samples.append(out.timings.prefill_s)
            progress.step(f"prefill tandem {n} tokens")
        tandem.append(samples)
        if built.hf is not None:
            ids_t = torch.tensor([ids], device=device)
            samples = []
            for i in range(1 + s.repeats):
                with torch.no_grad():
                    start = device_clock(device)
                    built.hf(input_ids=ids_t, use_cache=True, logits_to_keep=1)
                    elapsed = device_clock(device) - start
                if i:
                    samples.append(elapsed)
                progress.step(f"prefill hf_eager {n} tokens")
            hf.append(samples)
    columns = {"tandem": _simple_column(tandem, s.prompt_lengths)}
    columns["hf_eager"] = _simple_column(hf, s.prompt_lengths) if built.hf is not None else _unavailable("skipped (--skip-hf)")
    return {"prompt_tokens": list(s.prompt_lengths), "columns": columns}


def _simple_column(samples: list[list[float]], tokens: tuple[int, ...] | None = None) -> dict:
    column = {"ms": [_ms(median(x)) for x in samples], "samples_ms": [[1000 * v for v in x] for x in samples]}
    if tokens is not None:
        column["tokens_per_s"] = [n / (ms / 1000) for n, ms in zip(tokens, column["ms"])]
    return column


def bench_vision(built: Built, s: BenchSettings, progress: Progress) -> dict:
    engine, device, dtype = built.engine, s.torch_device, s.torch_dtype
    tandem, hf, preprocess, first_token, resized, patches, tokens = [], [], [], [], [], [], []
    one_token = forced_greedy(1)
    for size in s.image_sizes:
        image = bench_image(size, s.seed + size)
        pre, enc = [], []
        for i in range(1 + s.repeats):
            start = engine.now()
            inputs = preprocess_images([image], engine.image_config, device, dtype)
            mid = engine.now()
            with torch.inference_mode(), use_backend(s.kernel_backend):  # the tower alone, as the engine runs it
                engine.model.visual(inputs.pixel_values, [tuple(g) for g in inputs.grid_thw.tolist()])
            end = engine.now()
            if i:
                pre.append(mid - start)
                enc.append(end - mid)
            progress.step(f"vision tandem {size}px")
        preprocess.append(pre)
        tandem.append(enc)
        question = image_question(image)
        first = []
        for i in range(1 + s.repeats):
            start = engine.now()
            engine.generate(question, one_token)
            if i:
                first.append(engine.now() - start)
            progress.step(f"first token tandem {size}px")
        first_token.append(first)
        _, h, w = inputs.grid_thw[0].tolist()
        resized.append([h * engine.image_config.patch_size, w * engine.image_config.patch_size])
        patches.append(h * w)
        tokens.append(inputs.tokens_per_image[0])
        if built.hf is not None:
            grid = inputs.grid_thw.to(device)
            samples = []
            for i in range(1 + s.repeats):
                with torch.no_grad():
                    start = device_clock(device)
                    built.hf.model.visual(inputs.pixel_values, grid_thw=grid)
                    elapsed = device_clock(device) - start
                if i:
                    samples.append(elapsed)
                progress.step(f"vision hf_eager {size}px")
            hf.append(samples)
    columns = {"tandem": {**_simple_column(tandem), "preprocess_ms": [_ms(median(x)) for x in preprocess],
                          "first_token_ms": [_ms(median(x)) for x in first_token],
                          "first_token_samples_ms": [[_ms(v) for v in x] for x in first_token]}}
    columns["hf_eager"] = _simple_column(hf) if built.hf is not None else _unavailable("skipped (--skip-hf)")
    return {"sizes": list(s.image_sizes), "resized": resized, "patches": patches, "image_tokens": tokens,
            "columns": columns}


def bench_profiles(built: Built, s: BenchSettings, progress: Progress) -> dict:
    """torch.profiler views of a decode step (with CUDA graphs and, where the engine uses them, without) and of a
    first token with one image; see tandem.bench.profiling."""
    engine = built.engine
    ids = text_ids(s.decode_prompt_tokens, s.seed)
    decode = {}
    for name, graphs in (("cuda graphs", True), ("eager launches", False)):
        if graphs and not engine.runner.graphable():
            continue
        decode[name] = profile_decode(engine, ids, s.profile_steps, graphs)
        progress.step(f"profile decode, {name}")
    first_token = profile_first_token(engine, image_question(bench_image(s.policy_image_size, s.seed + 7)))
    progress.step("profile first token")
    return {"prompt_tokens": s.decode_prompt_tokens, "decode": decode, "first_token": first_token,
            "image_size": [s.policy_image_size, s.policy_image_size], "question": QUESTION}


def bench_policies(s: BenchSettings, files: Path, progress: Progress) -> dict:
    device, dtype = s.torch_device, s.torch_dtype
    large_name, small_name = s.pair
    side = -(-s.policy_image_size // 32) * 32
    kv_tokens = (side // 32) ** 2 + 2 * s.reason_tokens + 2 * s.short_tokens + 1024
    built = []
    for role, name, seed in (("large", large_name, s.seed + 1), ("small", small_name, s.seed + 2)):
        built.append(build_models(name, device, dtype, seed, files, kv_tokens, s.kernel_backend, keep_hf=False))
        progress.step(f"built {role} {name}")
    budget = Budget(short_tokens=s.short_tokens, reason_tokens=s.reason_tokens, temperature=0.0, ignore_eos=True)
    pair = Tandem(built[0].engine, built[1].engine, budget=budget)
    overlap = pair.overlap  # the default where the run happens (two CUDA streams on a GPU)
    engine = built[0].engine
    runs: dict[str, list[dict]] = {p: [] for p in (*POLICIES, SEQUENTIAL_VERIFY)}
    for i in range(1 + s.repeats):
        for j, name in enumerate(runs):
            image = bench_image(s.policy_image_size, s.seed + 1000 * (i + 1) + j)  # new pixels: the vision cache misses
            pair.overlap = overlap and name != SEQUENTIAL_VERIFY
            start = engine.now()
            result = pair.answer(image, QUESTION, policy=name.removesuffix(" (sequential)"))
            total = engine.now() - start
            if i:
                runs[name].append(_policy_run(result, total, budget))
            progress.step(f"policy {name}" + ("" if i else " (warm-up)"))
    results = {p: _policy_summary(r) for p, r in runs.items()}
    del pair, built, engine
    _free(device)
    return {"large": large_name, "small": small_name, "budget": asdict(budget), "question": QUESTION,
            "image_size": [s.policy_image_size, s.policy_image_size], "verify_overlap": overlap, "results": results}


def _policy_run(result, total_s: float, budget: Budget) -> dict:
    stages = []
    for st in result.stages:
        expected = budget.reason_tokens if st.role == "reason" else budget.short_tokens
        stages.append({
            "model": st.model, "role": st.role, "input_tokens": st.input_tokens, "prefilled_tokens": st.prefilled_tokens,
            "output_tokens": len(st.output_ids), "expected_tokens": expected,
            "kept_tokens": None if st.kept_indices is None else len(st.kept_indices),
            # A stage that reused its model's prefix encoded nothing (None, not 0); one output token has no decode step.
            "vision_ms": None if st.vision_cache_hit is None else 1000 * st.timings.vision_s,
            "prefill_ms": 1000 * st.timings.prefill_s,
            "decode_ms": 1000 * st.timings.decode_s if len(st.output_ids) > 1 else None,
            "vision_cache_hit": st.vision_cache_hit,
        })
    branch = None
    if result.agreed is not None:
        branch = "agreed: no transfer stage" if result.agreed else "disagreed: transfer stage ran"
    verdict_ms = None if result.verdict_s is None else 1000 * result.verdict_s
    return {"total_ms": 1000 * total_s, "verdict_ms": verdict_ms, "branch": branch, "stages": stages}


def _policy_summary(runs: list[dict]) -> dict:
    """Medians over the runs. Stage medians are taken over the runs of the most frequent stage sequence (verify's
    branch depends on the random models' answers); `branches` counts every branch seen."""
    signature = lambda r: tuple((st["model"], st["role"]) for st in r["stages"])  # noqa: E731
    common, _ = Counter(signature(r) for r in runs).most_common(1)[0]
    same = [r for r in runs if signature(r) == common]
    stages = []
    for k, (model, role) in enumerate(common):
        rows = [r["stages"][k] for r in same]
        stage = {key: rows[0][key] for key in ("model", "role", "input_tokens", "prefilled_tokens", "expected_tokens")}
        stage["output_tokens"] = sorted({row["output_tokens"] for row in rows})
        for key in ("vision_ms", "prefill_ms", "decode_ms"):
            stage[key] = median([row[key] for row in rows])
        stages.append(stage)
    branches = Counter(r["branch"] for r in runs if r["branch"] is not None)
    return {"total_ms": median([r["total_ms"] for r in runs]), "total_samples_ms": [r["total_ms"] for r in runs],
            "verdict_ms": median([r.get("verdict_ms") for r in runs]), "branches": dict(branches), "stage_runs": len(same), "stages": stages, "runs": runs}


# ---- the whole run -----------------------------------------------------------------------------------------------
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


def _measured(name: str, part, *args) -> dict:
    """A part's result, or {"unavailable": why} when it fails (a transformers call that breaks on one device, a
    profiler that cannot start): the failure is reported, with its traceback on stderr, and later parts still run."""
    try:
        return part(*args)
    except Exception as e:  # noqa: BLE001 - reported in bench.json and the summary
        traceback.print_exc()
        return _unavailable(f"{name} failed: {_error_text(e)}")


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
                kv = max(s.decode_prompt_tokens + max(*s.lengths, STOP_CHECK_TOKENS), max(s.prompt_lengths) + 1,
                         (max(s.image_sizes) // 32 + 2) ** 2 + 256,
                         max(s.batch_sizes) * (s.decode_prompt_tokens + s.batch_tokens + DEFAULT_PAGE_SIZE),
                         s.decode_prompt_tokens + s.profile_steps + 64,  # + the polls around the profile's window
                         (s.policy_image_size // 32 + 2) ** 2 + 256)
                built = build_models(s.preset, device, dtype, s.seed, files, kv, s.kernel_backend, keep_hf=not s.skip_hf)
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
                         "prefill": (bench_prefill,), "vision": (bench_vision,)}
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
                _free(device)
            if "policies" in s.parts:
                result["policies"] = _measured("policies", bench_policies, s, files, bar)
        result["complete"] = True
        save()
    finally:
        bar.close()
    return result
