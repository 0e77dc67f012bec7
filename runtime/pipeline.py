"""Tandem: a large and a small Qwen3-VL in one process, cooperating on each question.

Each policy is an asyncio flow over the two engines' request handles; many requests in flight batch their stages
together in each engine, and verify's two first stages run at once because both engines' loops run at once.
One request:
1. The image is decoded once. Each model's vision features come from the shared vision cache, or from one encode
   per distinct tower (towers with identical weights share the entry).
2. Each model the policy needs prefills its prefix [chat header, image, question] once. Every stage of that model
   forks the prefix's pages (no copy) and prefills only its own suffix (instruction + assistant header).
3. Reasoning transfer: the small model's output ids pass to the large model as ids (never detokenized and
   re-tokenized); the token gather kernel writes the large model's suffix (template ids + kept reasoning ids +
   closing ids) on the device.
Every page a request took is released when it ends, whether it succeeds, fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import functools
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tandem.kernels import gather_tokens
from tandem.models.config import load_config
from tandem.models.errors import InputError
from tandem.models.hub import resolve_checkpoint
from tandem.models.image import image_digest, image_size, image_tokens, load_image
from tandem.models.loader import weight_bytes
from tandem.models.tokenizer import expand_image_pads
from tandem.runtime.answers import answers_agree, extract_answer
from tandem.runtime.config import CPU_KV_TOKENS, CUDA_KV_FRACTION, parse_device, parse_dtype
from tandem.runtime.engine import Engine
from tandem.runtime.kv_cache import PagePool, Sequence
from tandem.runtime.loop import off_loop
from tandem.runtime.request import GenerateOutput, Prefill, Prompt
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.selection import DEFAULT_DELTA, KEEP_MODES, select_key_tokens
from tandem.runtime.speculative import speculate
from tandem.runtime.stages import POLICIES, POLICY_MODELS, Budget, Prompts, Stage, TandemResult
from tandem.runtime.vision_cache import DEFAULT_VISION_CACHE_BYTES, VisionCache

@dataclass
class _Prefix:
    """One model's prefix for the current request: its pages, M-RoPE offset, and what building it cost."""

    seq: Sequence
    rope_delta: int
    prefill: Prefill
    first_stage_pending: bool = True


@dataclass
class _Request:
    question: str
    policy: str
    budget: Budget
    start: float  # time.perf_counter() when the request came in
    image: torch.Tensor | None = None  # decoded uint8 [3, H, W] on the CPU, once every check has passed
    digest: str = ""
    on_text: Callable[[str, str, str], None] | None = None  # (model, role, text piece) as each stage decodes
    prefixes: dict[str, asyncio.Task] = field(default_factory=dict)  # model -> the task building its prefix
    chat: dict[str, tuple[str, str]] = field(default_factory=dict)  # model -> chat template around the question


class Tandem:
    def __init__(self, large: Engine, small: Engine, prompts: Prompts = Prompts(), budget: Budget = Budget(),
                 vision_cache_bytes: int = DEFAULT_VISION_CACHE_BYTES, overlap: bool = True):
        """overlap: run verify's two first stages at once (False: one after the other, to measure the gain)."""
        large.tokenizer.check_same(small.tokenizer, "reasoning is handed over as token ids")
        self.engines = {"large": large, "small": small}
        self.overlap = overlap
        self.prompts = prompts
        self.budget = budget
        self.vision_cache = VisionCache(vision_cache_bytes)
        for engine in self.engines.values():  # towers with identical weights share entries
            engine.vision_cache = self.vision_cache

    @classmethod
    def from_pretrained(cls, large: str | Path, small: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, kv_cache_tokens: int | None = None,
                        prompts: Prompts = Prompts(), budget: Budget = Budget(),
                        vision_cache_bytes: int = DEFAULT_VISION_CACHE_BYTES, overlap: bool = True,
                        **settings) -> "Tandem":
        """Both models on one device (folders or Hugging Face model ids). By default each model's KV cache gets
        the same number of tokens, together CUDA_KV_FRACTION of the device memory the two models' weights leave
        free (CUDA), or CPU_KV_TOKENS each (CPU). `settings`: EngineConfig's other fields, for both engines."""
        device = parse_device(device)
        large, small = resolve_checkpoint(large), resolve_checkpoint(small)
        if kv_cache_tokens is None:
            kv_cache_tokens = shared_kv_tokens([large, small], device, dtype)
        engines = [Engine.from_pretrained(p, device, dtype, kv_cache_tokens=kv_cache_tokens, **settings)
                   for p in (large, small)]
        return cls(*engines, prompts=prompts, budget=budget, vision_cache_bytes=vision_cache_bytes, overlap=overlap)

    def answer(self, image, question: str, policy: str = "verify", keep: str = "all", delta: float = DEFAULT_DELTA,
               on_text: Callable[[str, str, str], None] | None = None, budget: Budget | None = None) -> TandemResult:
        """`answer_async`, run to its end here (not from inside a running event loop: await answer_async there)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.answer_async(image, question, policy, keep, delta, on_text, budget))
        raise InputError("Tandem.answer was called inside a running event loop: await answer_async(...) there")

    async def answer_async(self, image, question: str, policy: str = "verify", keep: str = "all",
                           delta: float = DEFAULT_DELTA, on_text: Callable[[str, str, str], None] | None = None,
                           budget: Budget | None = None) -> TandemResult:
        """Answer `question` about `image` (anything the engine takes as an image: a file path, data URL, bytes,
        PIL image, numpy HWC array or torch CHW tensor) with the given policy. Everything is checked, the image's
        size against both caches included, before the image is decoded. on_text(model, role, piece) receives each
        stage's text as it is decoded (two stages may alternate). `budget` replaces the pair's Budget for this request.
        Cancelling the task stops its stages."""
        request = self._checked(image, question, policy, keep, delta, on_text, budget)
        request.image, request.digest = await off_loop(_decoded, image)
        try:
            result = await self._run_policy(request, policy, keep, delta)
        finally:
            await self._release(request)
        result.total_s = time.perf_counter() - request.start
        return result

    def check(self, image, question: str, policy: str = "verify", keep: str = "all", delta: float = DEFAULT_DELTA,
              budget: Budget | None = None) -> None:
        """Refuse (InputError), as answer_async would, a request that could never run; reads only the image's
        header. For a caller that must answer before the work starts (a server, before a stream's first byte)."""
        self._checked(image, question, policy, keep, delta, None, budget)

    def _checked(self, image, question, policy, keep, delta, on_text, budget) -> "_Request":
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
        if budget is not None and not isinstance(budget, Budget):
            raise InputError(f"budget must be a Budget, got {type(budget).__name__}")
        request = _Request(question.strip(), policy, budget or self.budget, time.perf_counter(), on_text=on_text)
        size = image_size(image, 0)
        drafts = ("small",) if self._speculates(request, "large") and "small" not in POLICY_MODELS[policy] else ()
        for model in (*POLICY_MODELS[policy], *drafts):
            engine = self.engines[model]
            pads = image_tokens(*size, engine.image_config, 0)
            prefix = len(engine.tokenizer.encode(self._chat_parts(request, model)[0])) - 1 + pads
            engine.scheduler.check_fits(prefix, headroom=self._headroom(request, model))  # the one pad becomes the run
        return request

    # ---- policies ------------------------------------------------------------------------------------------------
    async def _run_policy(self, request: _Request, policy: str, keep: str, delta: float) -> TandemResult:
        if policy in ("large", "small"):
            stage, _ = await self._short(request, policy)
            return TandemResult(stage.answer, policy, [stage])
        if policy in ("small-reason", "large-reason"):
            stage, _ = await self._reason(request, policy.removesuffix("-reason"), scored=False)
            return TandemResult(stage.answer, policy, [stage])
        if policy == "transfer":
            reasoning = await self._reason(request, "small", scored=keep == "attention")
            transfer = await self._transfer(request, reasoning, delta)
            return TandemResult(transfer.answer, policy, [reasoning[0], transfer])
        first = (self._short(request, "large"), self._reason(request, "small", scored=keep == "attention"))
        if self.overlap:
            (short, _), reasoning = await _all(*first)
        else:
            (short, _), reasoning = await first[0], await first[1]
        verdict_s = time.perf_counter() - request.start  # both stages' tokens are on the host: their work is done
        if answers_agree(short.text, reasoning[0].text):
            return TandemResult(short.answer, policy, [short, reasoning[0]], agreed=True, verdict_s=verdict_s)
        transfer = await self._transfer(request, reasoning, delta)
        return TandemResult(transfer.answer, policy, [short, reasoning[0], transfer], agreed=False, verdict_s=verdict_s)

    async def _short(self, request: _Request, model: str) -> tuple[Stage, GenerateOutput]:
        suffix = self._suffix_ids(request, model, "\n" + self.prompts.short)
        return await self._stage(request, model, "answer", suffix, request.budget.short_tokens)

    async def _reason(self, request: _Request, model: str, scored: bool) -> tuple[Stage, GenerateOutput]:
        """A reasoning stage; when `scored`, its output carries the attention each token received (key mass)."""
        suffix = self._suffix_ids(request, model, "\n" + self.prompts.reason)
        return await self._stage(request, model, "reason", suffix, request.budget.reason_tokens, key_mass=scored)

    async def _transfer(self, request: _Request, reasoning: tuple[Stage, GenerateOutput], delta: float) -> Stage:
        """The large model answers with the small model's (kept) reasoning ids spliced into its instruction."""
        stage, out = reasoning
        large = self.engines["large"]
        ids = out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids
        if out.ready is not None:  # the key mass was summed on the small engine's stream
            torch.cuda.current_stream(large.device).wait_event(out.ready)
        keep = torch.arange(len(ids)) if out.key_mass is None else select_key_tokens(out.key_mass, delta)
        before, after = self.prompts.transfer.split("{reasoning}")
        head = self._suffix_ids(request, "large", "\n" + before, close=False)
        tail = self._suffix_ids(request, "large", after)
        prefix = await self._prefix(request, "large")
        device = large.device
        suffix, _ = gather_tokens(  # its positions: the text run that Prompt.continuing gives, on the host
            torch.tensor(ids, dtype=torch.long, device=device), keep.to(device), torch.tensor(head, device=device),
            torch.tensor(tail, device=device), prefix.seq.length + prefix.rope_delta)
        ready = None
        if device.type == "cuda":  # made on this thread's stream: the engines' streams wait for it
            ready = torch.cuda.Event()
            ready.record()
        transfer, _ = await self._stage(request, "large", "transfer", suffix, request.budget.short_tokens, ready=ready)
        transfer.kept_indices = keep.tolist()
        transfer.reasoning_tokens = len(ids)
        return transfer

    # ---- stages ----------------------------------------------------------------------------------------------
    async def _stage(self, request: _Request, model: str, role: str, suffix: list[int] | torch.Tensor,
                     max_tokens: int, key_mass: bool = False,
                     ready: torch.cuda.Event | None = None) -> tuple[Stage, GenerateOutput]:
        """Fork the model's prefix, prefill `suffix` on it, decode. (`suffix` on the device: written on the
        caller's stream, which recorded `ready` after it.)"""
        engine = self.engines[model]
        prefix = await self._prefix(request, model)
        params = engine.resolve(SamplingParams(max_tokens=max_tokens, temperature=request.budget.temperature,
                                               ignore_eos=request.budget.ignore_eos))
        prompt = Prompt.continuing(suffix, prefix.seq.length, prefix.rope_delta)
        if self._speculates(request, model) and not key_mass:  # the small model drafts: its own prefix, the same
            draft = await self._prefix(request, "small")  # suffix ids at its positions
            draft_prompt = Prompt.continuing(suffix, draft.seq.length, draft.rope_delta)
            shown = None if request.on_text is None else functools.partial(request.on_text, model, role)
            out = await speculate(engine, self.engines["small"], prompt, draft_prompt, params,
                                  request.budget.speculative, prefix.seq, draft.seq, on_text=shown, ready=ready)
        else:
            handle = engine.submit_stage(prefix.seq, prompt, params, key_mass=key_mass, ready=ready)
            if request.on_text is not None:
                async for piece in handle.stream_async():
                    request.on_text(model, role, piece)
            out: GenerateOutput = await handle.result_async()
        stage = Stage(
            model=model, role=role, input_tokens=prefix.seq.length + len(suffix), prefilled_tokens=len(suffix),
            suffix_ids=suffix.tolist() if isinstance(suffix, torch.Tensor) else list(suffix),
            output_ids=out.token_ids, text=out.text, answer=extract_answer(out.text), timings=replace(out.timings),
            finish_reason=out.finish_reason,
        )
        if prefix.first_stage_pending:  # the prefix's cost belongs to the stage that needed it first
            prefix.first_stage_pending = False
            stage.prefilled_tokens += prefix.seq.length
            stage.vision_cache_hit = prefix.prefill.vision_cache_hit
            paid, t = prefix.prefill.timings, stage.timings
            t.queue_s, t.vision_s, t.prefill_s = t.queue_s + paid.queue_s, paid.vision_s, t.prefill_s + paid.prefill_s
            t.prompt_tokens, t.image_tokens = stage.input_tokens, paid.image_tokens
        return stage, out

    async def _prefix(self, request: _Request, model: str) -> _Prefix:
        """The model's [chat header, image, question] in its KV cache, prefilled once per request (the first
        stage that needs it starts the task; the others await it)."""
        if model not in request.prefixes:
            request.prefixes[model] = asyncio.ensure_future(self._build_prefix(request, model))
        return await asyncio.shield(request.prefixes[model])

    async def _build_prefix(self, request: _Request, model: str) -> _Prefix:
        engine = self.engines[model]
        ids = engine.tokenizer.encode(self._chat_parts(request, model)[0])
        pads = image_tokens(request.image.shape[1], request.image.shape[2], engine.image_config, 0)
        ids = expand_image_pads(ids, [pads], engine.tokenizer.image_pad_id)
        prompt = engine.prompts.of(ids, [request.image], [request.digest])
        handle = engine.submit_prefix(prompt, self._stage_tokens(request, model))
        prefill: Prefill = await handle.handover_async()
        return _Prefix(prefill.seq, prompt.rope_delta, prefill)

    async def _release(self, request: _Request) -> None:
        """Give back every prefix the request built (a prefix still building is cancelled: its engine frees it)."""
        for model, task in request.prefixes.items():
            if not task.done():
                task.cancel()
            try:
                prefix = await task
            except BaseException:  # noqa: BLE001 - cancelled or failed: nothing was handed over
                continue
            self.engines[model].release(prefix.seq)

    def _stage_tokens(self, request: _Request, model: str) -> int:
        """The largest stage the request's policy runs on this model: its suffix and max_tokens (a transfer
        suffix counted with every reasoning token kept)."""
        b, policy = request.budget, request.policy
        sizes = []
        if policy in ("large", "small", "verify") and (model == policy or (policy == "verify" and model == "large")):
            sizes.append(len(self._suffix_ids(request, model, "\n" + self.prompts.short)) + b.short_tokens)
        if policy == f"{model}-reason" or (model == "small" and policy in ("transfer", "verify")):
            sizes.append(len(self._suffix_ids(request, model, "\n" + self.prompts.reason)) + b.reason_tokens)
        if model == "large" and policy in ("transfer", "verify"):
            template = len(self._suffix_ids(request, model, "\n" + self.prompts.transfer.replace("{reasoning}", "")))
            sizes.append(template + 2 + b.reason_tokens + b.short_tokens)  # 2: the split may cost a merge each side
        if model == "small" and self._speculates(request, "large"):  # the draft follows the large model's stages
            sizes.append(self._stage_tokens(request, "large"))
        return max(sizes)

    @staticmethod
    def _speculates(request: _Request, model: str) -> bool:
        """Do this request's large-model stages (answer, reasoning, transfer) run drafted by the small model?"""
        return model == "large" and request.budget.speculative > 0 and request.policy not in ("small", "small-reason")

    def _headroom(self, request: _Request, model: str) -> int:
        size = self.engines[model].pool.page_size
        return -(-self._stage_tokens(request, model) // size) + 1

    def _suffix_ids(self, request: _Request, model: str, instruction: str, close: bool = True) -> list[int]:
        """ids of `instruction`, then (close=True) the template's end of the user turn and the assistant header."""
        text = instruction + (self._chat_parts(request, model)[1] if close else "")
        return self.engines[model].tokenizer.encode(text)

    def _chat_parts(self, request: _Request, model: str) -> tuple[str, str]:
        """The model's chat template around the question (PromptBuilder.split), once per request and model."""
        if model not in request.chat:
            request.chat[model] = self.engines[model].prompts.split(request.question)
        return request.chat[model]


def _decoded(image) -> tuple[torch.Tensor, str]:
    decoded = load_image(image, 0)
    return decoded, image_digest(decoded)


async def _all(*coroutines):
    """Run coroutines at once; if one fails, cancel the others (and wait for them) before raising its error."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def shared_kv_tokens(checkpoints: list, device: torch.device, dtype) -> int:
    """KV tokens for each of the models: on CUDA an equal share of the memory their weights leave free."""
    if device.type != "cuda":
        return CPU_KV_TOKENS
    dtype = parse_dtype(dtype, device)
    free, _ = torch.cuda.mem_get_info(device)
    weights = sum(weight_bytes(c, dtype) for c in checkpoints)
    if weights >= free:
        raise InputError(f"the two models' weights need {weights} bytes, more than the {free} free on {device}")
    per_token = sum(PagePool.bytes_per_token(load_config(c).text, dtype) for c in checkpoints)
    return int((free - weights) * CUDA_KV_FRACTION) // per_token
