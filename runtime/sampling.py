"""Sampling parameters and the sampler, which runs on the logits' device.

Two samplers: `sample`, in torch (the default), and the CUDA op of csrc/sampling.cu, which TANDEM_SAMPLER=cuda
selects for logits on CUDA where it builds (see `sampler_choice`). `Sampler` runs one generation's steps with
whichever applies. The CUDA op stays opt-in until a GPU measurement shows it faster (csrc/README.md).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from tandem.kernels import env
from tandem.kernels.csrc import load_sampling_op, sampling_op_error
from tandem.models.errors import CheckpointError, InputError

DEFAULT_MAX_TOKENS = 256
GREEDY_BELOW = 1e-5  # temperatures under this decode greedily
SAMPLERS = ("torch", "cuda")


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. Fields left as None take the checkpoint's generation_config.json values (see `resolve`).

    temperature 0 is greedy, and so is any temperature below GREEDY_BELOW (1e-5, as in vLLM: dividing logits by
    less overflows float32 and would sample from infinities); top_k 0 and top_p 1 switch those filters off.
    Generation stops at max_tokens, at the checkpoint's end-of-sequence ids (unless ignore_eos) and at any of
    stop_token_ids.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        """Check every field that is set, types included, so a bad value is refused where it is written."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InputError(f"SamplingParams.max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature is not None and not (_is_real(self.temperature) and math.isfinite(self.temperature)
                                                 and self.temperature >= 0):
            raise InputError(f"SamplingParams.temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_p is not None and not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            raise InputError(f"SamplingParams.top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise InputError(f"SamplingParams.top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise InputError(f"SamplingParams.seed must be an integer in [0, 2**64), got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InputError(f"SamplingParams.ignore_eos must be True or False, got {self.ignore_eos!r}")
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not isinstance(stops, (list, tuple, set, frozenset)):
            raise InputError(f"SamplingParams.stop_token_ids must be a list of token ids, got {stops!r}")
        for i, token in enumerate(stops):
            if not _is_int(token) or token < 0:
                raise InputError(f"SamplingParams.stop_token_ids[{i}] = {token!r} is not a token id")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stops))

    def resolve(self, defaults: "SamplingParams") -> "SamplingParams":
        """These params with each None taken from `defaults` (a temperature below GREEDY_BELOW becomes 0)."""
        filled = {f.name: getattr(defaults, f.name) for f in fields(self) if getattr(self, f.name) is None}
        out = replace(self, **filled)
        tiny = out.temperature is not None and 0 < out.temperature < GREEDY_BELOW
        return replace(out, temperature=0.0) if tiny else out


def _is_int(value) -> bool:
    """An integer (a numpy integer too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


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
    """logits [B, vocab] float32 -> token ids [B], on the logits' device, without a host sync. Filters apply in the
    order temperature, top-k, top-p, as in transformers. A top-k filter keeps k candidates (torch.topk, no sort of
    the row) and top-p then works on those; top-p alone sorts the whole row."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    top_p = 1.0 if params.top_p is None else params.top_p
    if params.top_k and params.top_k < logits.shape[-1]:
        values, candidates = logits.topk(params.top_k, dim=-1)  # sorted, most likely first
        if top_p < 1.0:
            values = values.masked_fill(_beyond_top_p(values, top_p), float("-inf"))
        return candidates.gather(-1, race(values.softmax(dim=-1), generator)[:, None]).squeeze(-1)
    if top_p < 1.0:
        values, order = logits.sort(dim=-1, descending=True)
        drop = _beyond_top_p(values, top_p)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return race(logits.softmax(dim=-1), generator)


def race(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of probs [B, n]: argmax(p / E) with E ~ Exp(1) independent per entry is distributed as p (the
    first of independent exponential clocks with rates p to ring). Unlike torch.multinomial, it never syncs the host."""
    clocks = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / clocks.clamp_min_(1e-30)).argmax(dim=-1)  # the CPU's exponential_ can return 0


def _beyond_top_p(sorted_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """For logits sorted most likely first: True past the smallest prefix whose probability reaches top_p (the first
    token is always kept)."""
    probs = sorted_logits.softmax(dim=-1)
    return probs.cumsum(dim=-1) - probs >= top_p  # the more likely tokens already reach top_p


def sampler_choice(device: torch.device) -> tuple[str, str]:
    """("torch" or "cuda", why): the sampler `Sampler` runs for logits on `device` under TANDEM_SAMPLER (torch, the
    default, or cuda). cuda falls back to torch for logits off CUDA or where the op cannot be built; the reason
    says which. On a GPU, the first cuda answer builds the op (about a minute, once per machine)."""
    name = env.sampler()
    if name not in SAMPLERS:
        raise ValueError(f"TANDEM_SAMPLER={name!r} is not one of {', '.join(SAMPLERS)}")
    if name == "torch":
        return "torch", "TANDEM_SAMPLER is torch (the default)"
    if device.type != "cuda":
        return "torch", f"TANDEM_SAMPLER=cuda, but the logits are on {device.type}"
    if load_sampling_op() is None:
        return "torch", f"TANDEM_SAMPLER=cuda, but the CUDA op is unavailable: {sampling_op_error()}"
    return "cuda", "TANDEM_SAMPLER=cuda"


class Sampler:
    """Draws one generation's tokens, step after step, with the sampler `sampler_choice` picks.

    The CUDA op draws with counter-based random numbers (Philox keyed by a seed and an offset), not a generator's
    state: the seed comes from `generator` once, at the first sampled (non-greedy) step, the one host sync this
    costs per generation; every step then passes the next offset, a host counter, so no step waits for the device.
    Seeded requests repeat under either sampler, but the two samplers draw different tokens from one seed. The
    choice is made once, for the logits' `device`, not per step."""

    def __init__(self, params: SamplingParams, generator: torch.Generator | None, device: torch.device):
        self.params, self.generator = params, generator
        self.op = load_sampling_op() if sampler_choice(device)[0] == "cuda" else None
        self._seed: int | None = None
        self._offset = 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.op is None:
            return sample(logits, self.params, self.generator)
        p = self.params
        if p.temperature and self._seed is None:
            self._seed = int(torch.randint(2**63 - 1, (), device=logits.device, generator=self.generator))
        top_p = 1.0 if p.top_p is None else p.top_p
        tokens = self.op.sample(logits, p.temperature, p.top_k or 0, top_p, self._seed or 0, self._offset)
        self._offset += 1
        return tokens
