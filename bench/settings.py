"""What one `tandem bench` run measures: its parts, in measurement order, and BenchSettings, whose `resolve` fills
the device-, dtype- and --quick-dependent defaults."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from tandem.models.errors import InputError
from tandem.models.tiny import PRESETS
from tandem.runtime.config import parse_dtype
from tandem.runtime.runner import ROWS_CHUNK

PARTS = ("decode", "batch", "concurrency", "prefill", "vision", "check", "profile", "policies")
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
FULL_CONCURRENCY = (1, 8, 32)
TINY_CONCURRENCY = (1, 16)  # --quick or the CPU
FULL_CONCURRENCY_TOKENS = 128
QUICK_CONCURRENCY_TOKENS = 16
FULL_CHECK_CONTEXTS = (256, 1024, 4096)
QUICK_CHECK_CONTEXTS = (64, 256)
FULL_CHECK_TOKENS = (1, 2, 4, 8, 16)
QUICK_CHECK_TOKENS = (1, 4)
FULL_PROFILE_STEPS = 64
QUICK_PROFILE_STEPS = 8
POLICY_IMAGE_SIZE = 448
COPY_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20, "cpu-quick": 16 << 20}


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
    concurrency: tuple[int, ...] | None = None  # the concurrency part's request counts
    concurrency_tokens: int | None = None
    concurrency_repeats: int | None = None  # default: repeats (its one-at-a-time runs cost C requests each)
    check_contexts: tuple[int, ...] | None = None  # the check part's context lengths
    check_tokens: tuple[int, ...] | None = None  # the check part's chunk sizes (a speculation's k + 1)
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
        s.concurrency = tuple(s.concurrency or (TINY_CONCURRENCY if tiny else FULL_CONCURRENCY))
        s.concurrency_tokens = s.concurrency_tokens or (
            QUICK_CONCURRENCY_TOKENS if s.quick else FULL_CONCURRENCY_TOKENS)
        s.concurrency_repeats = s.concurrency_repeats or s.repeats
        s.check_contexts = tuple(s.check_contexts or (QUICK_CHECK_CONTEXTS if s.quick else FULL_CHECK_CONTEXTS))
        s.check_tokens = tuple(s.check_tokens or (QUICK_CHECK_TOKENS if s.quick else FULL_CHECK_TOKENS))
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
        if self.repeats < 1 or self.concurrency_repeats < 1:
            raise InputError(f"repeats must be at least 1, got {self.repeats} and {self.concurrency_repeats}")
        for name in ("lengths", "image_sizes", "prompt_lengths", "batch_sizes", "concurrency", "check_contexts",
                     "check_tokens"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise InputError(f"{name} must be positive integers, got {list(values)}")
        if max(self.check_tokens) > ROWS_CHUNK:
            raise InputError(f"check_tokens go up to {ROWS_CHUNK}, the longest chunk run as decode rows; got "
                             f"{max(self.check_tokens)}")
        if min(self.image_sizes) < 32 or self.policy_image_size < 32:
            raise InputError("image sizes must be at least 32 pixels")
        if self.short_tokens < 1 or self.reason_tokens < 1 or self.decode_prompt_tokens < 1:
            raise InputError("token budgets and the decode prompt length must be positive")
        if self.profile_steps < 1:
            raise InputError(f"profile_steps must be positive, got {self.profile_steps}")
        for name in ("batch_tokens", "concurrency_tokens"):
            if getattr(self, name) < 2:
                raise InputError(f"{name} must be at least 2 (one decode step), got {getattr(self, name)}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype, self.torch_device)
