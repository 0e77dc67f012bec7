"""The pair's vocabulary: its policies, the instructions and budgets its stages run with, and what a request
returns (each stage, with its own Timings, and the answer)."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass

from tandem.models.errors import InputError
from tandem.runtime.request import Timings

POLICIES = ("large", "small", "small-reason", "large-reason", "transfer", "verify")
POLICY_PREFIX = "tandem-"  # a server's model id for a policy: tandem-verify, ...
# The models each policy's stages use: their prefixes are checked against the caches before any image is decoded.
POLICY_MODELS = {"large": ("large",), "small": ("small",), "small-reason": ("small",), "large-reason": ("large",),
                 "transfer": ("small", "large"), "verify": ("large", "small")}


@dataclass(frozen=True)
class Prompts:
    """The instructions appended to the question; transfer's {reasoning} is where the kept reasoning ids go."""

    short: str = "Answer the question using a single word or phrase."
    reason: str = ("Think step by step, then give the final answer in double square brackets, "
                   "like [[answer]].")
    transfer: str = "According to previous thinking: {reasoning}. Answer the question using a single word or phrase."

    def __post_init__(self) -> None:
        for name in ("short", "reason", "transfer"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"Prompts.{name} must be a string, got {type(getattr(self, name)).__name__}")
        if self.transfer.count("{reasoning}") != 1:
            raise InputError("Prompts.transfer must hold {reasoning} exactly once: the reasoning ids go there")


@dataclass(frozen=True)
class Budget:
    """Output tokens per stage kind, and the sampling every stage uses (greedy by default, for reproducibility).
    ignore_eos forces every stage to its full length (latency studies). speculative=k: the large model's stages
    (answer, reasoning, transfer) are drafted by the small model, up to k tokens at a time (0: off)."""

    short_tokens: int = 16
    reason_tokens: int = 512
    temperature: float = 0.0
    ignore_eos: bool = False
    speculative: int = 0

    def __post_init__(self) -> None:
        """Checked here, by the field's own name, as the SamplingParams of each stage would be later."""
        for name in ("short_tokens", "reason_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise InputError(f"Budget.{name} must be a positive integer, got {value!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (math.isfinite(t) and t >= 0):
            raise InputError(f"Budget.temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InputError(f"Budget.ignore_eos must be True or False, got {self.ignore_eos!r}")
        k = self.speculative
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise InputError(f"Budget.speculative must be a number of draft tokens >= 0, got {k!r}")


@dataclass
class Stage:
    model: str  # "large" or "small"
    role: str  # "answer", "reason" or "transfer"
    input_tokens: int  # the whole prompt this stage's model attended to: its prefix + this stage's suffix
    prefilled_tokens: int  # what this stage ran through prefill itself: the prefix only on a model's first stage
    suffix_ids: list[int]  # the ids this stage appended to its model's prefix
    output_ids: list[int]
    text: str
    answer: str
    timings: Timings  # the stage's own; a model's first stage also carries its prefix's queue, vision and prefill
    kept_indices: list[int] | None = None  # transfer: which reasoning tokens were handed over, of...
    reasoning_tokens: int | None = None  # ...this many
    vision_cache_hit: bool | None = None  # on a model's first stage: were its image features cached?
    finish_reason: str = "stop"  # "stop" (a stop token) or "length" (the stage's budget reached)

    @property
    def kept_fraction(self) -> float | None:
        return None if self.kept_indices is None else len(self.kept_indices) / max(self.reasoning_tokens, 1)


@dataclass
class TandemResult:
    answer: str
    policy: str
    stages: list[Stage]
    agreed: bool | None = None  # verify: did the cheap answers agree (so no transfer stage ran)?
    total_s: float = 0.0
    verdict_s: float | None = None  # verify: seconds to the agreement check (the whole cost when they agree)

    @property
    def timings(self) -> dict[str, float]:
        sums = {k: sum(getattr(s.timings, k) for s in self.stages) for k in ("vision_s", "prefill_s", "decode_s")}
        return {**sums, "total_s": self.total_s, "verdict_s": self.verdict_s}

    @property
    def final_stage(self) -> Stage:
        """The stage whose output is the answer: the last one, or verify's short answer when the answers agreed."""
        return self.stages[0] if self.agreed else self.stages[-1]

    def to_dict(self) -> dict:
        stages = [{**asdict(s), "kept_fraction": s.kept_fraction} for s in self.stages]
        return {"answer": self.answer, "policy": self.policy, "agreed": self.agreed, "timings": self.timings,
                "stages": stages}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)
