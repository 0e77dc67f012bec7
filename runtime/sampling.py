"""Sampling parameters and the sampler, which runs on the logits' device."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from tandem.models.errors import CheckpointError, InputError

DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. Fields left as None take the checkpoint's generation_config.json values (see `resolve`).

    temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off. Generation stops at max_tokens, at the
    checkpoint's end-of-sequence ids (unless ignore_eos) and at any of stop_token_ids.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def resolve(self, defaults: "SamplingParams") -> "SamplingParams":
        """These params with each None taken from `defaults`, then checked."""
        filled = {f.name: getattr(defaults, f.name) for f in fields(self) if getattr(self, f.name) is None}
        out = replace(self, **filled)
        out._check()
        return out

    def _check(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InputError(f"SamplingParams.max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature is not None and self.temperature < 0:
            raise InputError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise InputError(f"SamplingParams.top_k must be an integer >= 0, got {self.top_k!r}")


def checkpoint_defaults(checkpoint_dir: str | Path) -> tuple[SamplingParams, tuple[int, ...]]:
    """(sampling defaults, end-of-sequence ids) from generation_config.json; plain multinomial sampling without one."""
    path = Path(checkpoint_dir) / "generation_config.json"
    if not path.is_file():
        return SamplingParams(temperature=1.0, top_p=1.0, top_k=0), ()
    try:
        raw = json.loads(path.read_text())
        eos = raw.get("eos_token_id", [])
        eos_ids = tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
        greedy = raw.get("do_sample") is False
        defaults = SamplingParams(
            temperature=0.0 if greedy else float(raw.get("temperature", 1.0)),
            top_p=float(raw.get("top_p", 1.0)),
            top_k=int(raw.get("top_k", 0) or 0),
        )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: malformed generation config ({type(e).__name__}: {e})") from e
    return defaults, eos_ids


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, vocab] float32 -> token ids [B], on the logits' device. Filters apply in the order
    temperature, top-k, top-p, as in transformers."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        logits = _top_p_filter(logits, params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (always at least one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # the more likely tokens already reach top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
