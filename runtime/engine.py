"""Engine: one Qwen3-VL model on one device, serving many requests at once.

The caller's thread checks and prepares a request (tokens, decoded images, positions) and submits it; the engine's
loop, in a thread of its own (on CUDA, on a stream of its own), does all the device work: each step the scheduler
admits requests and hands out prompt chunks, the runner prefills them and runs one decode step over the running
batch, and the tokens reach the host a step behind the device, where finished requests leave the batch and their
handles learn the outcome. Calls from many threads, and asyncio tasks, share one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.kernels import use_backend
from tandem.kernels.backend import implementation
from tandem.models.config import load_config
from tandem.models.errors import InputError
from tandem.models.hub import resolve_checkpoint
from tandem.models.image import ImageProcessorConfig
from tandem.models.loader import load_model
from tandem.models.qwen3_vl import Qwen3VL
from tandem.models.prompt import Messages, Prompt, PromptBuilder, TokenIds
from tandem.models.tokenizer import Tokenizer
from tandem.runtime.config import EngineConfig, default_kv_tokens, parse_device, parse_dtype
from tandem.runtime.kv_cache import PagePool, Sequence
from tandem.runtime.loop import Closed, Loop, free_idle_cpu_workers, iterate
from tandem.runtime.request import (DeviceSpan, GenerateOutput, Phase, Prefill, QueueFullError, Request,
                                    RequestAborted, RequestHandle)
from tandem.runtime.reply_text import ReplyText
from tandem.runtime.runner import ModelRunner, Readout
from tandem.runtime.sampling import SamplingParams, checkpoint_defaults
from tandem.runtime.scheduler import Scheduler
from tandem.runtime.speculative import check_speculation, speculate
from tandem.runtime.vision_cache import VisionCache, encode, tower_fingerprint

class Engine:
    def __init__(self, model: Qwen3VL, tokenizer: Tokenizer, image_config: ImageProcessorConfig, pool: PagePool,
                 sampling_defaults: SamplingParams, eos_ids: tuple[int, ...], config: EngineConfig = EngineConfig(),
                 vision_cache: VisionCache | None = None):
        """vision_cache: shared with another engine (a pair's); by default the engine's own."""
        self.model, self.tokenizer, self.image_config, self.pool = model, tokenizer, image_config, pool
        self.sampling_defaults, self.config = sampling_defaults, config
        self.eos_ids = eos_ids or tokenizer.eos_ids
        self.device = model.lm_head_weight.device
        self.dtype = model.lm_head_weight.dtype
        self.prompts = PromptBuilder(tokenizer, image_config, model.config.image_token_id, model.config.text.vocab_size)
        self.vision_cache = vision_cache if vision_cache is not None else VisionCache()
        self.tower = tower_fingerprint(model.visual)
        self.runner = ModelRunner(model, pool, config.kernel_backend, config.cuda_graphs)
        self.scheduler = Scheduler(pool, config, model.config.text.max_position_embeddings)
        self.stats = EngineStats()
        # The device work runs in the loop's thread, fed by ("add", Request) / ("abort", request id) messages.
        self.loop = Loop(f"tandem-engine-{id(self):x}", self._step, self._loop_context, self._fail_all)
        pool.on_free = self.loop.wake  # requests waiting for pages are admitted as soon as they come back
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._readout = Readout(self.device, lag=1 if self.device.type == "cuda" else 0)
        self._requests: dict[int, Request] = {}  # every request in the loop's hands, by id
        self._seeds = random.Random()

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, *, vision_cache: VisionCache | None = None,
                        kv_weights_reserved: int = 0, **settings) -> "Engine":
        """Load a Qwen3-VL checkpoint: a folder, or a Hugging Face model id (see tandem.models.hub). device/dtype
        default to cuda + bfloat16 when available, else cpu + float32. `settings` are EngineConfig's fields
        (kv_cache_tokens, page_size, kernel_backend, cuda_graphs, max_running, max_waiting, prefill_chunk_tokens).
        Everything that can be checked is checked before any weight is read."""
        config = EngineConfig(**settings)
        device = parse_device(device)
        dtype = parse_dtype(dtype, device)
        try:  # the backend must be able to run on this device (and TANDEM_KERNEL_BACKEND must be valid)
            with use_backend(config.kernel_backend):
                implementation(device)
        except ValueError as e:
            raise InputError(f"kernel backend on {device}: {e}") from e
        checkpoint = resolve_checkpoint(checkpoint)
        model_config = load_config(checkpoint)
        tokenizer = Tokenizer.from_pretrained(checkpoint)
        tokenizer.check_model(model_config, checkpoint)
        image_config = ImageProcessorConfig.from_checkpoint(checkpoint)
        defaults, eos_ids = checkpoint_defaults(checkpoint)
        model = load_model(checkpoint, device, dtype, model_config)
        text = model.config.text
        tokens = config.kv_cache_tokens or default_kv_tokens(
            device, PagePool.bytes_per_token(text, dtype), text.max_position_embeddings, kv_weights_reserved)
        pool = PagePool(text, -(-tokens // config.page_size), config.page_size, device, dtype)
        if device.type == "cpu":
            free_idle_cpu_workers()  # the team loading made would throttle the loop's (a server's thread never submits)
        return cls(model, tokenizer, image_config, pool, defaults, eos_ids, config, vision_cache)

    @property
    def read_lag(self) -> int:
        """How many steps behind the device the host reads the tokens: on CUDA one, so the next step is queued
        before the host waits and at most one step runs past a stop; on the CPU, where nothing runs ahead, none."""
        return self._readout.lag

    @read_lag.setter
    def read_lag(self, lag: int) -> None:
        self._readout.lag = lag

    def now(self) -> float:
        """A clock reading once this engine's stream, and the caller's, have finished their queued work."""
        if self._stream is not None:
            self._stream.synchronize()
        return device_clock(self.device)

    # ---- the public API ---------------------------------------------------------------------------------------
    def submit(self, messages: Messages | Prompt | None = None, sampling: SamplingParams | None = None, *,
               prompt_token_ids: TokenIds | None = None, images: list | None = None) -> RequestHandle:
        """Check and prepare a request (or take a Prompt from `prepare`), queue it, and return its handle at once;
        the loop does the work. Bad input raises here, before any work."""
        params = self.resolve(sampling)
        if isinstance(messages, Prompt):
            if prompt_token_ids is not None or images is not None:
                raise InputError("a prepared Prompt already holds its token ids and images: pass neither again")
            return self._submit(messages, params)  # which refuses one that can never fit
        return self._submit(self.prepare(messages, prompt_token_ids, images, max_tokens=params.max_tokens), params)

    def generate(self, messages: Messages | None = None, sampling: SamplingParams | None = None, *,
                 prompt_token_ids: TokenIds | None = None, images: list | None = None,
                 draft: "Engine | None" = None, speculative: int = 0) -> GenerateOutput:
        """Generate a reply to chat `messages` (a plain string is one user message), or to ready
        `prompt_token_ids` with `images`. With a `draft` engine (a smaller model with the same tokenizer) and
        speculative=k, the draft proposes up to k tokens at a time and this engine checks them in one forward
        (runtime/speculative.py): the same output (greedy: the same tokens; sampled: the same distribution), in
        fewer of this model's forwards."""
        if draft is not None or speculative:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return asyncio.run(self.generate_async(messages, sampling, prompt_token_ids=prompt_token_ids,
                                                       images=images, draft=draft, speculative=speculative))
            raise InputError("Engine.generate was called inside a running event loop: await generate_async there")
        return self.submit(messages, sampling, prompt_token_ids=prompt_token_ids, images=images).result()

    def stream(self, messages: Messages | None = None, sampling: SamplingParams | None = None, *,
               prompt_token_ids: TokenIds | None = None, images: list | None = None,
               draft: "Engine | None" = None, speculative: int = 0) -> Iterator[str]:
        """The reply's text piece by piece as it is decoded (never half a UTF-8 character); with a draft, round by
        round. Bad input is refused at the call; closing the iterator aborts the request."""
        if draft is not None or speculative:  # its rounds run on an event loop in a thread of their own
            return iterate(self.stream_async(messages, sampling, prompt_token_ids=prompt_token_ids, images=images,
                                             draft=draft, speculative=speculative))
        return self.submit(messages, sampling, prompt_token_ids=prompt_token_ids, images=images).stream()

    def generate_batch(self, requests: list[Messages | Prompt],
                       sampling: SamplingParams | list[SamplingParams] | None = None) -> list[GenerateOutput]:
        """A reply to each request (chat messages, or a Prompt from `prepare`), with one SamplingParams for all or
        one per request. All are checked, then submitted together, so they share decode steps."""
        if not isinstance(requests, (list, tuple)):
            raise InputError(f"generate_batch takes a list of requests, got {type(requests).__name__}")
        if isinstance(sampling, (list, tuple)):
            if len(sampling) != len(requests):
                raise InputError(f"generate_batch got {len(requests)} requests but {len(sampling)} SamplingParams")
            params = [self.resolve(s) for s in sampling]
        else:
            params = [self.resolve(sampling)] * len(requests)
        prompts = [r if isinstance(r, Prompt) else self.prepare(r, max_tokens=p.max_tokens)
                   for r, p in zip(requests, params)]
        handles = [self._submit(prompt, p) for prompt, p in zip(prompts, params)]
        return [h.result() for h in handles]

    async def generate_async(self, messages: Messages | None = None, sampling: SamplingParams | None = None, *,
                             prompt_token_ids: TokenIds | None = None, images: list | None = None,
                             draft: "Engine | None" = None, speculative: int = 0) -> GenerateOutput:
        """generate() for asyncio: many calls in flight share the engine's batch; cancelling the task aborts."""
        if draft is not None or speculative:
            return await speculate(*self._drafted(messages, sampling, prompt_token_ids, images, draft, speculative))
        handle = self.submit(messages, sampling, prompt_token_ids=prompt_token_ids, images=images)
        return await handle.result_async()

    def stream_async(self, messages: Messages | None = None, sampling: SamplingParams | None = None, *,
                     prompt_token_ids: TokenIds | None = None, images: list | None = None,
                     draft: "Engine | None" = None, speculative: int = 0) -> AsyncIterator[str]:
        """stream() for asyncio: `async for piece in engine.stream_async(...)`."""
        if draft is not None or speculative:
            return _speculative_stream(self._drafted(messages, sampling, prompt_token_ids, images, draft, speculative))
        return self.submit(messages, sampling, prompt_token_ids=prompt_token_ids, images=images).stream_async()

    def _drafted(self, messages, sampling, prompt_token_ids, images, draft, speculative) -> tuple:
        """Check and prepare a generation drafted by `draft` -> speculate's arguments."""
        if not isinstance(draft, Engine) or not speculative:
            raise InputError("speculative decoding takes another Engine as draft and speculative=k > 0 draft tokens")
        self.tokenizer.check_same(draft.tokenizer, "the draft's tokens are checked as token ids")
        params = self.resolve(sampling)
        check_speculation(self, draft, params, speculative)  # before the images are decoded
        prompt = self.prepare(messages, prompt_token_ids, images, max_tokens=params.max_tokens)
        if draft.image_config == self.image_config:  # the draft reads the very ids and images: decoded once
            draft.scheduler.check_fits(len(prompt) + params.max_tokens)
            draft_prompt = draft.prompts.of(prompt.token_ids, prompt.images, prompt.digests)
        else:
            draft_prompt = draft.prepare(messages, prompt_token_ids, images, max_tokens=params.max_tokens)
        return self, draft, prompt, draft_prompt, params, speculative

    def abort(self, request_id: int) -> None:
        """Stop a request: it leaves the batch at the next step and its pages are freed. Safe from any thread."""
        self.loop.post(("abort", request_id))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop: every request in flight ends with RequestAborted. A later submission starts it again."""
        self.loop.close(timeout)

    def prompt_logits(self, prompt: Prompt) -> torch.Tensor:
        """Logits [len(prompt), vocab] (float32) at every prompt position."""
        done = self._submit(prompt, None, prompt_logits=True).result()
        if done.ready is not None:
            done.ready.synchronize()
        return done.logits

    # ---- building blocks of the pair pipeline -----------------------------------------------------------------
    def submit_prefix(self, prompt: Prompt, stage_tokens: int = 0) -> RequestHandle:
        """Prefill `prompt` into a sequence of its own and hand it over (the handle's result, a Prefill): later
        requests fork it (`submit_stage`); give it back with `release`. It is admitted only while room for
        `stage_tokens` more (its largest stage: suffix and max_tokens) stays free, so that prefixes can never fill
        the cache and leave their stages waiting for ever."""
        headroom = -(-stage_tokens // self.pool.page_size) + 1 if stage_tokens else 0  # + a copied last page
        return self._submit(prompt, None, keep_sequence=True, headroom=headroom)

    def submit_stage(self, parent: Sequence | None, prompt: Prompt, params: SamplingParams, key_mass: bool = False,
                     ready: torch.cuda.Event | None = None, keep_sequence: bool = False, room: int = 0,
                     in_place: bool = False, token_logits: bool = False) -> RequestHandle:
        """Continue `parent` (a prefix; None: start afresh) with `prompt` (its token ids may be a device tensor,
        whose `ready` event the loop waits for) and decode. With key_mass, the result's key_mass holds the
        attention each output token received from the later steps (summed over heads and layers). With
        keep_sequence, the result's seq hands the sequence over (every fed token in it; the last token drawn is
        not fed): give it back with `release`. room: cache slots reserved in it past the request's own, admitted
        with it, for later requests in place. in_place: write into `parent` itself (handed over by an earlier
        request; this one must be the only one using it), not into a fork; the caller keeps it, whatever the
        request's outcome, and gives it back. token_logits: the result's logits hold the weights each output token
        was drawn from, whose softmax is its exact distribution (a sampled speculation's draft distributions q)."""
        return self._submit(prompt, params, parent=parent, key_mass=key_mass, ready=ready,
                            keep_sequence=keep_sequence, room=room, in_place=in_place, token_logits=token_logits)

    def submit_verify(self, seq: Sequence, prompt: Prompt) -> RequestHandle:
        """Prefill `prompt` into `seq` itself (in place, as submit_stage's), keeping the logits of every one of
        its positions: a speculation's check of its drafts. The result's seq (a Prefill's) is `seq`, handed back."""
        return self._submit(prompt, None, parent=seq, in_place=True, keep_sequence=True, prompt_logits=True)

    def release(self, seq: Sequence) -> None:
        """Give a prefix's pages back, now. Its forks keep the pages they share until they end, and device work
        already queued with them runs before any later request can write to them (one stream per engine)."""
        seq.release()

    # ---- preparing a request (the caller's thread) ---------------------------------------------------------------
    def prepare(self, messages: Messages | None, prompt_token_ids: TokenIds | None = None,
                images: list | None = None, *, max_tokens: int = 0) -> Prompt:
        """Tokenize a request and decode its images (see PromptBuilder.build): everything is checked, and whether
        the prompt with `max_tokens` more can ever fit the context and the cache, before any image is decoded."""
        return self.prompts.build(messages, prompt_token_ids, images, fits=lambda n: self.scheduler.check_fits(n + max_tokens))

    def resolve(self, sampling: SamplingParams | None) -> SamplingParams:
        """The params a generation runs with: the checkpoint's defaults filled in, every field checked (stop ids
        against this model's vocabulary). Refuses anything but a SamplingParams."""
        if sampling is None:
            sampling = SamplingParams()
        elif not isinstance(sampling, SamplingParams):
            raise InputError(f"sampling must be a SamplingParams, got {type(sampling).__name__} "
                             "(e.g. SamplingParams(max_tokens=64, temperature=0.0))")
        params = sampling.resolve(self.sampling_defaults)
        vocab = self.model.config.text.vocab_size
        for i, token in enumerate(params.stop_token_ids):
            if not 0 <= token < vocab:
                raise InputError(f"SamplingParams.stop_token_ids[{i}] = {token} is not a token id in [0, {vocab})")
        return params

    def stop_ids(self, params: SamplingParams) -> frozenset[int]:
        """The ids that end generation under these params: the checkpoint's eos ids (unless ignore_eos) and
        the params' stop_token_ids."""
        return frozenset(() if params.ignore_eos else self.eos_ids) | frozenset(params.stop_token_ids)

    def _submit(self, prompt: Prompt, params: SamplingParams | None, **kind) -> RequestHandle:
        if len(self.scheduler.waiting) + len(self.loop) >= self.config.max_waiting:
            raise QueueFullError(f"the engine's queue is full ({self.config.max_waiting} requests waiting, "
                                 "max_waiting); try again later")
        stop_ids = self.stop_ids(params) if params is not None else frozenset()
        seed = params.seed if params is not None and params.seed is not None else self._seeds.getrandbits(64)
        request = Request(prompt, params, stop_ids, seed, **kind)
        if params is not None and params.stop:
            request.text = ReplyText(self.tokenizer, prompt.token_ids if isinstance(prompt.token_ids, list) else [],
                                     stop_ids, params.stop)
        # Never queue what cannot fit: it would wait for ever.
        self.scheduler.check_fits(request.total_tokens + (request.max_tokens > 0),
                                  None if request.in_place else request.parent, request.headroom)
        handle = RequestHandle(request, self.tokenizer, self.abort)
        request.handle = weakref.ref(handle)
        request.timings.prompt_tokens, request.timings.image_tokens = len(prompt), prompt.image_tokens
        if self.device.type == "cpu":
            free_idle_cpu_workers()
        self.loop.post(("add", request))
        return handle

    # ---- the loop (the engine's thread) -----------------------------------------------------------------------
    def _loop_context(self) -> contextlib.ExitStack:
        """What the loop's thread runs inside: the engine's CUDA stream, inference mode, its kernel backend."""
        stack = contextlib.ExitStack()
        if self._stream is not None:
            stack.enter_context(torch.cuda.stream(self._stream))
        stack.enter_context(torch.inference_mode())
        stack.enter_context(use_backend(self.config.kernel_backend))
        return stack

    def _step(self, loop: Loop) -> None:
        self._take(loop.take(block=False))
        plan = self.scheduler.schedule()
        if not plan and not len(self._readout):
            self._take(loop.take(block=True))  # nothing to do until a request or an abort arrives
            return
        now = time.perf_counter()
        for request in plan.admitted:
            request.timings.queue_s = now - request.submitted
            if request.key_mass:
                request.mass = torch.zeros(request.seq.length + len(request.prompt) + request.max_tokens,
                                           device=self.device)
        finished = []
        for request, start, end in plan.prefill:
            try:
                logits = self._prefill(request, start, end)
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                self._finish(request, e)
                continue
            if logits is not None and request.params is not None:
                finished.append((request, logits))
        if finished:
            requests = [r for r, _ in finished]
            tokens = self.runner.sample_first(requests, torch.cat([logits for _, logits in finished]))
            for i, request in enumerate(requests):
                request.next_token = tokens[i : i + 1]
                self.scheduler.prefilled(request)
            self._readout.push(requests, tokens)
        batch = [r for r in plan.decode if r.phase is Phase.DECODE and 1 + r.fed < r.max_tokens]
        if batch:
            try:
                tokens = self.runner.decode(batch)
            except Exception as e:  # noqa: BLE001 - the whole batch fails; the runner starts afresh
                self.runner.reset()
                for request in batch:
                    self._finish(request, e)
            else:
                self.stats.decode_steps += 1
                for request in batch:
                    request.fed += 1
                    request.seq.length += 1
                self._readout.push(batch, tokens)
        more = any(1 + r.fed < r.max_tokens for r in self.scheduler.decoding) or bool(self.scheduler.prefilling)
        for requests, tokens in self._readout.ready(drain=not more):
            self._read(requests, tokens)

    def _take(self, messages: list[tuple]) -> None:
        for kind, value in messages:
            if kind == "add":
                self._requests[value.id] = value
                self.scheduler.add(value)
            else:
                request = self._requests.get(value)
                if request is not None:
                    self._finish(request, RequestAborted(f"request {value} was aborted"))

    def _prefill(self, request: Request, start: int, end: int) -> torch.Tensor | None:
        if start == 0:
            if request.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(request.ready)
            if request.prompt.images:
                span = DeviceSpan(self.device)
                request.vision, cached = encode(self.model, request.prompt.images, request.prompt.digests,
                                                self.image_config, self.vision_cache, self.tower)
                request.spans.append(("vision_s", span.stop()))
                request.vision_cache_hit = cached == len(request.prompt.images)
                self.stats.image_prefills += 1
        span = DeviceSpan(self.device)
        logits = self.runner.prefill(request, start, end)
        request.spans.append(("prefill_s", span.stop()))
        self.stats.prefill_tokens += end - start
        request.prefilled = end
        if request.prompt_logits:
            request.logits.append(logits)
        if end == len(request.prompt):
            request.vision = None  # the features are in the cache, or no longer needed
            if request.params is None:
                self._finish(request, None)
        return logits

    def _read(self, requests: list[Request], tokens: list[int]) -> None:
        """One step's tokens on the host: published to the handles; finished requests leave."""
        now = time.perf_counter()
        for request, token in zip(requests, tokens):
            if request.phase is Phase.DONE:
                continue  # aborted or failed meanwhile: a token computed past its end
            request.tokens.append(token)
            handle = request.handle()
            if handle is not None:
                handle.publish([token])
            if len(request.tokens) == 1:
                request.timings.first_token_s = now - request.submitted
                request.first_read = now
            request.timings.decode_s = now - request.first_read
            if request.text is not None:
                request.text.add([token])
            stop_text = request.text is not None and request.text.stopped
            if token in request.stop_ids or len(request.tokens) == request.max_tokens or stop_text:
                self._finish(request, None)

    def _finish(self, request: Request, error: BaseException | None) -> None:
        """A request leaves: out of the batch, its pages freed (unless handed over), its handle told."""
        if request.phase is Phase.DONE:
            return
        if request.key_mass and request.mass is not None and request.phase is Phase.DECODE and error is None:
            self.runner.flush_mass(request)
        self.scheduler.remove(request)
        self._requests.pop(request.id, None)
        value: object = error
        try:  # device work (a span's event, a copy) may raise after a device error: the request still ends
            timings = request.timings
            timings.output_tokens, timings.decode_steps = len(request.tokens), request.fed
            for name, span in request.spans:  # device-timed: their work is done once the request's tokens are read
                setattr(timings, name, getattr(timings, name) + span.seconds())
            if error is None and request.params is None:
                value = Prefill(request.seq if request.keep_sequence else None,
                                torch.cat(request.logits) if request.prompt_logits else None, timings,
                                request.vision_cache_hit)
                if value.logits is not None:
                    value.best = value.logits.argmax(dim=-1)
            elif error is None:
                value = request.output(self.tokenizer)
                value.seq = request.seq if request.keep_sequence else None
            if error is None and self._stream is not None and (request.prompt_logits or request.token_logits
                                                                or request.key_mass):
                value.ready = torch.cuda.Event()  # device results: the caller's stream waits for this one's work
                value.ready.record(torch.cuda.current_stream(self.device))
        except Exception as e:
            value = e
        finally:
            failed = isinstance(value, BaseException)
            if request.seq is not None and not request.in_place and not (request.keep_sequence and not failed):
                request.seq.release()  # (a sequence lent in place stays its holder's to give back)
            handle = request.handle()
            if handle is not None:
                handle.finish(value)

    def _fail_all(self, error: BaseException) -> None:
        """Fail every request in flight with `error` (an exception in the loop itself; on close, RequestAborted);
        the engine goes on."""
        if isinstance(error, Closed):
            error = RequestAborted("the engine was closed")
        with contextlib.suppress(Exception):
            self.runner.reset()
        try:
            self._readout.ready(drain=True)
        except Exception:
            self._readout.clear()  # a step that can never be read must not keep the loop from waiting
        for request in list(self._requests.values()):
            with contextlib.suppress(Exception):
                self._finish(request, error)


@dataclass
class EngineStats:
    """Work done since the engine was built (the loop counts; any thread may read)."""

    prefill_tokens: int = 0
    image_prefills: int = 0  # prompts whose images were placed (an image prefilled once counts once)
    decode_steps: int = 0


async def _speculative_stream(drafted: tuple) -> AsyncIterator[str]:
    """speculate(*drafted)'s text as it settles; closing the stream early stops the generation and waits until
    its sequences are back."""
    pieces: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(speculate(*drafted, on_text=pieces.put_nowait))
    task.add_done_callback(lambda _: pieces.put_nowait(None))
    try:
        while (piece := await pieces.get()) is not None:
            yield piece
        task.result()  # its error, after the text that came before it
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # taken: a stream closed after a failure logs no "never retrieved"


def device_clock(device: torch.device) -> float:
    """A clock reading after the current stream has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return time.perf_counter()
