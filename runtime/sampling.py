"""Sampling parameters and the sampler: one batched draw, each row with its own params, on the logits' device.

Every row draws with the Gumbel-max trick: the token is the argmax of its filtered, temperature-scaled logits plus
Gumbel noise. The noise comes from a counter-based hash of (the request's seed, the token's index in its reply,
the token id): nothing syncs the host, and no row's noise or filters depend on another row. So a seeded request
draws the same tokens alone or in any batch wherever its logits are the same; on the CPU they are, while on CUDA
the decode attention's split count and cuBLAS's algorithm follow the batch's size, so its logits may differ in
the last bits and a near-tie may go the other way. Filters apply in the order temperature, top-k, top-p, as in
transformers: top-k keeps k candidates (torch.topk, no sort of the row); top-p alone sorts the row.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from tandem.models.errors import CheckpointError, InputError

DEFAULT_MAX_TOKENS = 256
GREEDY_BELOW = 1e-5  # temperatures under this decode greedily


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. Fields left as None take the checkpoint's generation_config.json values (see `resolve`).

    temperature 0 is greedy, and so is any temperature below GREEDY_BELOW (1e-5, as in vLLM: dividing logits by
    less overflows float32 and would sample from infinities); top_k 0 and top_p 1 switch those filters off.
    Generation stops at max_tokens, at the checkpoint's end-of-sequence ids (unless ignore_eos), at any of
    stop_token_ids, and where any of the `stop` strings first appears in the text (which is cut before it).
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    stop: tuple[str, ...] = field(default_factory=tuple)
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
        texts = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(texts, (list, tuple)):
            raise InputError(f"SamplingParams.stop must be a list of strings, got {self.stop!r}")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text:
                raise InputError(f"SamplingParams.stop[{i}] = {text!r} is not a non-empty string")
        object.__setattr__(self, "stop", tuple(texts))

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


@dataclass
class SamplingRows:
    """The per-row sampling params of one batch, on the device, and what the whole batch needs (host-side, so that
    sampling needs no sync to decide its shape)."""

    temperature: torch.Tensor  # [B] float32; 0 = greedy
    top_k: torch.Tensor  # [B] int64; 0 = off
    top_p: torch.Tensor  # [B] float32; 1 = off
    key: torch.Tensor  # [B] int64: seed_key(the request's seed)
    step: torch.Tensor  # [B] int64: the index, in its reply, of the token the row draws next
    candidates: int  # columns to draw among: the largest top_k, or the vocabulary
    filtered: bool  # some row has a top-k or top-p filter
    greedy: bool  # every row is greedy: an argmax is all

    @classmethod
    def of(cls, params: list[SamplingParams], keys: list[int], steps: list[int], vocab: int,
           device: torch.device) -> "SamplingRows":
        """Rows for resolved params (each temperature, top_k and top_p set)."""
        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        sampled = [p.temperature > 0 for p in params]
        filtered = any(s and (k or p.top_p < 1) for s, k, p in zip(sampled, top_k, params))
        # A row that samples with top-p but no top-k, or with no filter beside a filtered row, needs every column.
        whole_row = any(s and not k for s, k in zip(sampled, top_k))
        candidates = vocab if whole_row or not filtered else max(k for s, k in zip(sampled, top_k) if s)

        return cls(to_device([p.temperature for p in params], torch.float32, device),
                   to_device(top_k, torch.int64, device), to_device([p.top_p for p in params], torch.float32, device),
                   to_device(keys, torch.int64, device), to_device(steps, torch.int64, device), candidates, filtered,
                   not any(sampled))


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor without a host sync: on CUDA through pinned memory, copied in stream
    order (a pageable copy would wait for the stream's queued work)."""
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def sample(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """logits [B, vocab] float32 -> token ids [B], each row drawn with its own params; never syncs the host."""
    return sample_keeping(logits, rows, None)[0]


def sample_keeping(logits: torch.Tensor, rows: SamplingRows,
                   keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sample`, and for the rows `keep` (a device index) the weights each was drawn from: [len(keep), vocab]
    float32, its temperature-scaled logits inside its filters and -inf outside (a greedy row: its raw logits), so
    that their softmax is exactly the distribution of its draw (a sampled speculation's q)."""
    greedy = logits.argmax(dim=-1)
    if rows.greedy:
        return greedy, None if keep is None else logits.index_select(0, keep)
    values, ids = _filtered(logits, rows)
    token_ids = ids if ids is not None else torch.arange(logits.shape[-1], device=logits.device).expand_as(values)
    choice = (values + gumbel_noise(rows.key, rows.step, token_ids)).argmax(dim=-1)
    drawn = choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)
    tokens = torch.where(rows.temperature == 0, greedy, drawn)
    if keep is None:
        return tokens, None
    weights = _dense(values.index_select(0, keep), None if ids is None else ids.index_select(0, keep), logits.shape[-1])
    greedy_rows = (rows.temperature.index_select(0, keep) == 0)[:, None]
    return tokens, torch.where(greedy_rows, logits.index_select(0, keep), weights)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `sample` draws from, for resolved sampled params: logits [n, vocab] -> probabilities
    [n, vocab] float64 (0 outside the top-k / top-p filters)."""
    n, vocab = logits.shape
    values, ids = _filtered(logits.float(), SamplingRows.of([params] * n, [0] * n, [0] * n, vocab, logits.device))
    return _dense(values, ids, vocab).double().softmax(dim=-1)


def _dense(values: torch.Tensor, ids: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """Filtered values over the candidate columns `ids` (None: every column, in order) as whole rows, -inf in the
    columns that were not candidates."""
    if ids is None:
        return values
    rows = torch.full((values.shape[0], vocab), float("-inf"), dtype=values.dtype, device=values.device)
    return rows.scatter_(1, ids, values)


def _filtered(logits: torch.Tensor, rows: SamplingRows) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The temperature-scaled logits with -inf outside each row's top-k and top-p, over the candidate columns
    `ids` [B, candidates] (None: every column, in order)."""
    vocab = logits.shape[-1]
    scaled = logits / rows.temperature.clamp_min(GREEDY_BELOW)[:, None]  # greedy rows are replaced by the caller
    ids = None
    if rows.candidates < vocab:
        values, ids = scaled.topk(rows.candidates, dim=-1)  # sorted, most likely first
    elif rows.filtered:
        values, ids = scaled.sort(dim=-1, descending=True)
    else:
        values = scaled
    if rows.filtered:
        column = torch.arange(values.shape[-1], device=values.device)
        values = values.masked_fill(column >= torch.where(rows.top_k > 0, rows.top_k, vocab)[:, None], float("-inf"))
        probs = values.softmax(dim=-1)
        beyond = (probs.cumsum(dim=-1) - probs >= rows.top_p[:, None]) & (rows.top_p < 1)[:, None]
        values = values.masked_fill(beyond, float("-inf"))  # past the smallest prefix that reaches top_p
    return values, ids


# ---- counter-based noise -----------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def gumbel_noise(key: torch.Tensor, step: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise [B, K] float32, a pure function of (key[b], step[b], token_ids[b, k])."""
    row = _mix32(key ^ _mix32(step))
    bits = _mix32(_mix32(row[:, None] ^ token_ids) ^ 0x9E3779B9)
    uniform = ((bits >> 8).float() + 0.5) * 2.0**-24  # 24 bits: exact in float32, never 0 or 1
    return -torch.log(-torch.log(uniform))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer hash on int64 tensors holding 32-bit values; products split so nothing overflows."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def seed_key(seed: int) -> int:
    """A request's 64-bit seed folded into the 32-bit key its noise is drawn with (the same hash, on the host)."""
    def mix(x: int) -> int:
        x &= _M32
        x ^= x >> 16
        x = (x * 0x7FEB352D) & _M32
        x ^= x >> 15
        x = (x * 0x846CA68B) & _M32
        return x ^ (x >> 16)

    return mix((seed & _M32) ^ mix(((seed >> 32) & _M32) ^ 0x5851F42D))
