"""Tandem: a large and a small Qwen3-VL in one process, cooperating on each question (see DESIGN.md).

One request:
1. The image is decoded once. Each model's vision features come from the vision cache, or from one encode per
   distinct tower (towers with identical weights share it); preprocessing runs at most once.
2. Each model the policy needs prefills its prefix [chat header, image, question] once. Every stage of that model
   forks the prefix's pages (no copy) and prefills only its own suffix (instruction + assistant header).
3. Reasoning transfer: the small model's output ids stay on the device; the token gather kernel writes the large
   model's suffix (template ids + kept reasoning ids + closing ids) and its positions. Nothing is detokenized and
   re-tokenized.
Every page a request took is released when it ends, whether it succeeds or fails.
"""

from __future__ import annotations

import json
import math
import numbers
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tandem.kernels import gather_tokens
from tandem.models.errors import CheckpointError, InputError
from tandem.models.hub import resolve_checkpoint
from tandem.models.config import load_config
from tandem.models.image import image_size, image_tokens, load_image, preprocess_images
from tandem.models.loader import weight_bytes
from tandem.models.positions import mrope_positions
from tandem.models.tokenizer import IncrementalDetokenizer, expand_image_pads
from tandem.runtime.answers import answers_agree, extract_answer
from tandem.runtime.engine import CPU_KV_TOKENS, Engine, Timings, VisionFeatures, parse_device, parse_dtype
from tandem.runtime.kv_cache import PagePool, Sequence, release_all
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.selection import DEFAULT_DELTA, KEEP_MODES, select_key_tokens
from tandem.runtime.vision_cache import VisionCache, image_digest, tower_fingerprint

POLICIES = ("large", "small", "small-reason", "large-reason", "transfer", "verify")
# The models each policy's stages use: their prefixes are checked against the caches before any image is decoded.
POLICY_MODELS = {"large": ("large",), "small": ("small",), "small-reason": ("small",), "large-reason": ("large",),
                 "transfer": ("small", "large"), "verify": ("large", "small")}
DEFAULT_VISION_CACHE_BYTES = 1 << 30


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
    ignore_eos forces every stage to its full length (latency studies)."""

    short_tokens: int = 16
    reason_tokens: int = 512
    temperature: float = 0.0
    ignore_eos: bool = False

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
    kept_indices: list[int] | None = None  # transfer: which reasoning tokens were handed over, of...
    reasoning_tokens: int | None = None  # ...this many
    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    vision_cache_hit: bool | None = None  # on a model's first stage: were its image features cached?

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
        sums = {k: sum(getattr(s, k) for s in self.stages) for k in ("vision_s", "prefill_s", "decode_s")}
        return {**sums, "total_s": self.total_s, "verdict_s": self.verdict_s}

    def to_json(self) -> str:
        stages = [{**asdict(s), "kept_fraction": s.kept_fraction} for s in self.stages]
        return json.dumps({"answer": self.answer, "policy": self.policy, "agreed": self.agreed,
                           "timings": self.timings, "stages": stages}, ensure_ascii=False, indent=2)


@dataclass
class _Prefix:
    """One model's prefix for the current request: its pages, length and M-RoPE offset."""

    seq: Sequence
    rope_delta: int
    vision_s: float
    prefill_s: float
    vision_cache_hit: bool
    first_stage_pending: bool = True


@dataclass
class _Request:
    question: str
    start: float  # time.perf_counter() when the request came in
    image: torch.Tensor | None = None  # decoded uint8 [3, H, W] on the CPU, once every check has passed
    digest: str = ""
    on_text: Callable[[str, str, str], None] | None = None  # (model, role, text piece) as each stage decodes
    inputs: dict = field(default_factory=dict)  # ImageProcessorConfig -> ImageInputs: preprocessed at most once
    prefixes: dict[str, _Prefix] = field(default_factory=dict)  # model -> its prefix in this request
    chat: dict[str, tuple[str, str]] = field(default_factory=dict)  # model -> chat template around the question


class Tandem:
    def __init__(self, large: Engine, small: Engine, prompts: Prompts = Prompts(), budget: Budget = Budget(),
                 vision_cache_bytes: int = DEFAULT_VISION_CACHE_BYTES, overlap: bool | None = None):
        """overlap: run verify's two first stages at once, each model on its own CUDA stream and host thread
        (default: on CUDA, when the two engines are distinct objects)."""
        _check_same_tokenizer(large, small)
        self.engines = {"large": large, "small": small}
        distinct = large is not small
        if overlap and not distinct:
            raise InputError("overlap needs two engines: one engine cannot run two stages at once")
        self.overlap = distinct and large.device.type == "cuda" if overlap is None else overlap
        self.prompts = prompts
        self.budget = budget
        self.vision_cache = VisionCache(vision_cache_bytes)
        self._towers = {name: tower_fingerprint(e.model.visual) for name, e in self.engines.items()}
        self._streams: dict[str, torch.cuda.Stream] = {}  # each model's stage stream under overlap, made once

    @classmethod
    def from_pretrained(cls, large: str | Path, small: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, kv_cache_tokens: int | None = None,
                        kernel_backend: str | None = None, **kwargs) -> "Tandem":
        """Both models on one device. By default each model's KV cache gets the same number of tokens, together
        85% of the device memory the two models' weights leave free (CUDA), or CPU_KV_TOKENS each (CPU)."""
        device = parse_device(device)
        large, small = resolve_checkpoint(large), resolve_checkpoint(small)
        if kv_cache_tokens is None:
            kv_cache_tokens = _shared_kv_tokens([large, small], device, dtype)
        engines = [Engine.from_pretrained(p, device, dtype, kv_cache_tokens, kernel_backend=kernel_backend)
                   for p in (large, small)]
        return cls(*engines, **kwargs)

    def answer(self, image, question: str, policy: str = "verify", keep: str = "all", delta: float = DEFAULT_DELTA,
               on_text: Callable[[str, str, str], None] | None = None) -> TandemResult:
        """Answer `question` about `image` (anything the engine takes as an image: a file path, data URL, bytes,
        PIL image, numpy HWC array or torch CHW tensor) with the given policy. Everything is checked, the image's
        size against both caches included, before the image is decoded. on_text(model, role, piece) receives each
        stage's text as it is decoded (with verify's overlap, from two threads at once)."""
        if policy not in POLICIES:
            raise InputError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
        if keep not in KEEP_MODES:
            raise InputError(f"keep {keep!r} is not one of {', '.join(KEEP_MODES)}")
        if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta <= 1:
            raise InputError(f"delta must be a number in (0, 1], got {delta!r}")
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty" if isinstance(question, str) else
                             f"the question must be a string, got {type(question).__name__}")
        if on_text is not None and not callable(on_text):
            raise InputError(f"on_text must be callable, got {type(on_text).__name__}")
        request = _Request(question.strip(), time.perf_counter(), on_text=on_text)
        size = image_size(image, 0)
        for model in POLICY_MODELS[policy]:
            engine = self.engines[model]
            head, tail = self._chat_parts(request, model)
            pads = image_tokens(*size, engine.image_config, 0)
            prefix = len(engine.tokenizer.encode(head)) - 1 + pads  # the template's one pad becomes the image's run
            engine.check_fits(prefix, prefix)
        request.image = load_image(image, 0)
        request.digest = image_digest(request.image)
        try:
            result = self._run_policy(request, policy, keep, delta)
        finally:
            release_all(prefix.seq for prefix in request.prefixes.values())
        result.total_s = time.perf_counter() - request.start
        return result

    # ---- policies ------------------------------------------------------------------------------------------------
    def _run_policy(self, request: _Request, policy: str, keep: str, delta: float) -> TandemResult:
        if policy in ("large", "small"):
            stage = self._short(request, policy)
            return TandemResult(stage.answer, policy, [stage])
        if policy in ("small-reason", "large-reason"):
            stage, _, _ = self._reason(request, policy.removesuffix("-reason"), scored=False)
            return TandemResult(stage.answer, policy, [stage])
        if policy == "transfer":
            reasoning = self._reason(request, "small", scored=keep == "attention")
            transfer = self._transfer(request, reasoning, delta)
            return TandemResult(transfer.answer, policy, [reasoning[0], transfer])
        short, reasoning = self._both(request, lambda: self._short(request, "large"),
                                      lambda: self._reason(request, "small", scored=keep == "attention"))
        verdict_s = time.perf_counter() - request.start  # both stages' tokens are on the host: their work is done
        if answers_agree(short.text, reasoning[0].text):
            return TandemResult(short.answer, policy, [short, reasoning[0]], agreed=True, verdict_s=verdict_s)
        transfer = self._transfer(request, reasoning, delta)
        return TandemResult(transfer.answer, policy, [short, reasoning[0], transfer], agreed=False, verdict_s=verdict_s)

    def _both(self, request: _Request, large_stage, small_stage) -> tuple:
        """Run a large-model stage and a small-model stage, at once when self.overlap. Both prefixes are built
        first, so the threads share no request state; each thread decodes on its own CUDA stream."""
        if not self.overlap:
            return large_stage(), small_stage()
        self._prefix(request, "large")
        self._prefix(request, "small")
        with ThreadPoolExecutor(max_workers=1) as pool:
            small = pool.submit(_on_own_stream, self._stream("small"), small_stage)
            large = _on_own_stream(self._stream("large"), large_stage)
            return large, small.result()

    def _stream(self, model: str) -> torch.cuda.Stream | None:
        """The model's own CUDA stream for overlapped stages (None off CUDA), created once and kept, so two stages
        never share one from torch's rotating pool."""
        device = self.engines[model].device
        if device.type != "cuda":
            return None
        if model not in self._streams:
            self._streams[model] = torch.cuda.Stream(device)
        return self._streams[model]

    def _short(self, request: _Request, model: str) -> Stage:
        suffix = self._suffix_ids(request, model, "\n" + self.prompts.short)
        stage, _, _ = self._stage(request, model, "answer", suffix, self.budget.short_tokens)
        return stage

    def _reason(self, request: _Request, model: str, scored: bool) -> tuple[Stage, torch.Tensor, torch.Tensor | None]:
        """A reasoning stage -> (stage, its output ids on the device without the stop token, and when `scored` the
        attention each of them received, for key-token selection)."""
        suffix = self._suffix_ids(request, model, "\n" + self.prompts.reason)
        return self._stage(request, model, "reason", suffix, self.budget.reason_tokens, key_mass=scored)

    def _transfer(self, request: _Request, reasoning: tuple[Stage, torch.Tensor, torch.Tensor | None],
                  delta: float) -> Stage:
        """The large model answers with the small model's (kept) reasoning ids spliced into its instruction."""
        _, ids, scores = reasoning
        keep = torch.arange(len(ids), device=ids.device) if scores is None else select_key_tokens(scores, delta)
        before, after = self.prompts.transfer.split("{reasoning}")
        head = self._suffix_ids(request, "large", "\n" + before, close=False)
        tail = self._suffix_ids(request, "large", after)
        prefix = self._prefix(request, "large")
        suffix, positions = gather_tokens(ids, keep, head, tail, prefix.seq.length + prefix.rope_delta)
        stage, _, _ = self._stage(request, "large", "transfer", suffix, self.budget.short_tokens,
                                  positions=positions.expand(3, -1))
        stage.kept_indices = keep.tolist()
        stage.reasoning_tokens = len(ids)
        return stage

    # ---- stages ----------------------------------------------------------------------------------------------
    def _stage(self, request: _Request, model: str, role: str, suffix: torch.Tensor, max_tokens: int,
               key_mass: bool = False, positions: torch.Tensor | None = None,
               ) -> tuple[Stage, torch.Tensor, torch.Tensor | None]:
        """Fork the model's prefix, prefill `suffix`, decode. -> (stage, output ids on the device without the
        stop token, the attention each output token received from later steps when key_mass)."""
        engine = self.engines[model]
        prefix = self._prefix(request, model)
        params = SamplingParams(max_tokens=max_tokens, temperature=self.budget.temperature,
                                ignore_eos=self.budget.ignore_eos).resolve(engine.sampling_defaults)
        # The fork may copy the prefix's partly filled last page before writing: one page more.
        engine.check_fits(prefix.seq.length + len(suffix) + max_tokens, len(suffix) + max_tokens + engine.pool.page_size)
        seq = Sequence(engine.pool)
        try:
            seq.fork_from(prefix.seq)
            if positions is None:
                start = seq.length + prefix.rope_delta
                positions = torch.arange(start, start + len(suffix), device=engine.device).expand(3, -1)
            timings = Timings()
            start_s = engine.now()
            logits = engine.prefill(seq, suffix, positions)
            timings.prefill_s = engine.now() - start_s
            prompt_tokens = seq.length
            mass = torch.zeros(1, prompt_tokens + max_tokens, device=engine.device) if key_mass else None
            out = torch.empty(1, max_tokens, dtype=torch.long, device=engine.device)
            with closing(engine.decode_batch([seq], logits, params, [prefix.rope_delta], [timings], mass, out)) as steps:
                tokens = self._stream_stage(request, model, role, steps, engine.stop_ids(params))
        finally:
            seq.release()
        text_ids, _ = engine.without_stop(tokens, params)
        ids = out[0, : len(text_ids)]  # the same ids, still on the device
        text = engine.tokenizer.decode(text_ids)
        stage = Stage(
            model=model, role=role, input_tokens=prompt_tokens, prefilled_tokens=len(suffix),
            suffix_ids=suffix.tolist(), output_ids=tokens, text=text, answer=extract_answer(text),
            prefill_s=timings.prefill_s, decode_s=timings.decode_s,
        )
        if prefix.first_stage_pending:  # the prefix's cost belongs to the stage that needed it first
            prefix.first_stage_pending = False
            stage.prefilled_tokens += prefix.seq.length
            stage.vision_s, stage.vision_cache_hit = prefix.vision_s, prefix.vision_cache_hit
            stage.prefill_s += prefix.prefill_s
        scores = mass[0, prompt_tokens : prompt_tokens + len(ids)] if mass is not None else None
        return stage, ids, scores

    def _stream_stage(self, request: _Request, model: str, role: str, steps, stop_ids: frozenset[int]) -> list[int]:
        """A stage's output ids, from decode_batch's steps; each piece of its text (stop token excluded) goes to the
        request's on_text callback as it is decoded."""
        tokens: list[int] = []
        detok = IncrementalDetokenizer(self.engines[model].tokenizer) if request.on_text else None
        for (chunk,) in steps:
            tokens += chunk
            if detok is not None:
                for token in chunk:
                    piece = "" if token in stop_ids else detok.add(token)
                    if piece:
                        request.on_text(model, role, piece)
        if detok is not None and (tail := detok.flush()):
            request.on_text(model, role, tail)
        return tokens

    def _prefix(self, request: _Request, model: str) -> _Prefix:
        """The model's [chat header, image, question] in its KV cache, prefilled on first use in the request."""
        if model in request.prefixes:
            return request.prefixes[model]
        engine = self.engines[model]
        start = engine.now()
        features, hit = self._vision(request, model)
        vision_end = engine.now()
        text = self._chat_parts(request, model)[0]
        ids = expand_image_pads(engine.tokenizer.encode(text), features.tokens_per_image, engine.tokenizer.image_pad_id)
        positions, rope_delta = mrope_positions(ids, features.grids, engine.model.config.image_token_id,
                                                features.merge_size)
        engine.check_fits(len(ids), len(ids))
        prefix = _Prefix(Sequence(engine.pool), rope_delta, vision_end - start, 0.0, hit)
        request.prefixes[model] = prefix  # registered before prefill, so its pages are released even if it fails
        engine.prefill(prefix.seq, torch.tensor(ids, device=engine.device), positions.to(engine.device), features,
                       logits=None)
        prefix.prefill_s = engine.now() - vision_end
        return prefix

    def _vision(self, request: _Request, model: str) -> tuple[VisionFeatures, bool]:
        """The image's features for this model's tower: cached, or encoded (and preprocessed at most once)."""
        engine = self.engines[model]
        key = (request.digest, engine.image_config, self._towers[model])
        cached = self.vision_cache.get(key)
        if cached is not None:
            return cached, True
        if engine.image_config not in request.inputs:
            request.inputs[engine.image_config] = preprocess_images(
                [request.image], engine.image_config, engine.device, engine.dtype)
        features = engine.encode_images(request.inputs[engine.image_config])
        self.vision_cache.put(key, features)
        return features, False

    def _suffix_ids(self, request: _Request, model: str, instruction: str, close: bool = True) -> torch.Tensor:
        """ids of `instruction`, then (close=True) the template's end of the user turn and the assistant header."""
        text = instruction + (self._chat_parts(request, model)[1] if close else "")
        return torch.tensor(self.engines[model].tokenizer.encode(text), dtype=torch.long,
                            device=self.engines[model].device)

    def _chat_parts(self, request: _Request, model: str) -> tuple[str, str]:
        """The model's chat template rendered around the question: (everything up to and including the question,
        everything after it up to the assistant's turn). Stage instructions go between the two.

        No marker in the text (a user could type it): the question is rendered with an "a" and with a "b" after
        it, and the two renderings differ exactly where the question ends."""
        if model not in request.chat:
            tokenizer = self.engines[model].tokenizer

            def render(text: str) -> str:
                content = [{"type": "image", "image": "image"}, {"type": "text", "text": text}]
                return tokenizer.render_chat([{"role": "user", "content": content}])

            a, b = render(request.question + "a"), render(request.question + "b")
            end = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            head, tail = a[:end], a[end + 1:]
            if a != head + "a" + tail or b != head + "b" + tail:
                raise CheckpointError("the chat template does not copy the user's text into the prompt verbatim, "
                                      "once: the pipeline cannot place its instructions after the question")
            request.chat[model] = (head, tail)
        return request.chat[model]


def _on_own_stream(stream: torch.cuda.Stream | None, stage):
    """Run `stage` on `stream` (a stream of its own lets the GPU overlap it with the other model's stage), which
    starts after the work already queued (the prefixes). The current stream then waits for it, even when the stage
    fails: its pages are released next, and steps it queued may still be writing to them."""
    if stream is None:
        return stage()
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    try:
        with torch.cuda.stream(stream):
            return stage()
    finally:
        current.wait_stream(stream)


def _check_same_tokenizer(large: Engine, small: Engine) -> None:
    """Token ids pass between the models as they are, so both must mean the same thing by every id."""
    a, b = large.tokenizer.vocab(), small.tokenizer.vocab()
    if a == b:
        return
    differing = sorted(set(a.items()) ^ set(b.items()), key=lambda item: item[1])
    token, token_id = differing[0]
    raise InputError(
        f"the two models' tokenizers differ (e.g. token {token!r} / id {token_id}; vocabularies of {len(a)} and "
        f"{len(b)} tokens): reasoning is handed over as token ids, which needs one tokenizer"
    )


def _shared_kv_tokens(checkpoints: list, device: torch.device, dtype) -> int:
    """KV tokens for each of the models: on CUDA an equal share of 85% of the memory their weights leave free."""
    if device.type != "cuda":
        return CPU_KV_TOKENS
    dtype = parse_dtype(dtype, device)
    free, _ = torch.cuda.mem_get_info(device)
    weights = sum(weight_bytes(c, dtype) for c in checkpoints)
    if weights >= free:
        raise InputError(f"the two models' weights need {weights} bytes, more than the {free} free on {device}")
    per_token = sum(PagePool.bytes_per_token(load_config(c).text, dtype) for c in checkpoints)
    return int((free - weights) * 0.85) // per_token
