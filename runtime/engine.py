"""Engine: one Qwen3-VL model on one device, with its paged KV cache, prefill and decode, sampling and streaming."""

from __future__ import annotations

import numbers
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tandem.kernels import BACKENDS, AttentionMetadata, use_backend
from tandem.kernels.backend import implementation
from tandem.models.config import load_config
from tandem.models.errors import InputError
from tandem.models.hub import resolve_checkpoint
from tandem.models.image import ImageInputs, ImageProcessorConfig, image_size, image_tokens, preprocess_images
from tandem.models.loader import load_model
from tandem.models.positions import mrope_positions
from tandem.models.qwen3_vl import Qwen3VL, VisualTokens
from tandem.models.tokenizer import (IncrementalDetokenizer, Tokenizer, build_prompt_ids, expand_image_pads,
                                     extract_images, validate_messages)
from tandem.runtime.decode import DecodeRunner
from tandem.runtime.kv_cache import PagePool, Sequence, release_all
from tandem.runtime.sampling import Sampler, SamplingParams, checkpoint_defaults

Messages = list[dict] | str  # chat messages, or one user message's text
TokenIds = list[int] | torch.Tensor | np.ndarray  # one 1-D sequence of integer ids
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_PAGE_SIZE = 16
CPU_KV_TOKENS = 65536  # CPU default: room for one long request; the tests' tiny models need ~1.5 KB per token


@dataclass
class Timings:
    """Wall-clock seconds per phase (the device is synchronised at each boundary) and token counts."""

    vision_s: float = 0.0  # image preprocessing + vision encoder
    prefill_s: float = 0.0  # the prompt's forward pass, up to the first sampled token
    decode_s: float = 0.0  # every later token
    prompt_tokens: int = 0
    image_tokens: int = 0
    output_tokens: int = 0
    decode_steps: int = 0  # decode forward passes run (a batch's rows share them); steps past a stop included

    @property
    def decode_ms_per_token(self) -> float:
        steps = self.output_tokens - 1  # the first token comes out of prefill
        return 1000 * self.decode_s / steps if steps > 0 else 0.0


@dataclass
class GenerateOutput:
    text: str
    token_ids: list[int]  # the generated ids, including the stop token when one ended generation
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens reached)
    timings: Timings


@dataclass
class VisionFeatures:
    """The vision tower's output for some images: the rows that replace their pad tokens, in order, and the
    DeepStack features added after the first decoder layers. The unit the pipeline's vision cache stores."""

    embeds: torch.Tensor  # [image tokens, hidden]
    deepstack: list[torch.Tensor]  # each [image tokens, hidden]
    grids: list[tuple[int, int, int]]  # (t, h, w) in patches, per image
    merge_size: int

    @property
    def tokens_per_image(self) -> list[int]:
        return [t * h * w // self.merge_size**2 for t, h, w in self.grids]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.embeds, *self.deepstack))


@dataclass
class EngineStats:
    """Work done since the engine was built: what tests and the pipeline's reports count."""

    prefill_tokens: int = 0
    image_prefills: int = 0  # forward passes that placed image features (an image prefilled once counts once)
    decode_steps: int = 0


@dataclass
class Prompt:
    """A request ready for the model: expanded token ids, preprocessed images and their M-RoPE positions."""

    token_ids: list[int]
    images: ImageInputs | None
    positions: torch.Tensor  # [3, len(token_ids)]
    rope_delta: int  # generated token i (counting the prompt) sits at position i + rope_delta
    preprocess_s: float = 0.0  # image decoding and preprocessing, counted in Timings.vision_s


class Engine:
    def __init__(self, model: Qwen3VL, tokenizer: Tokenizer, image_config: ImageProcessorConfig, pool: PagePool,
                 sampling_defaults: SamplingParams, eos_ids: tuple[int, ...], kernel_backend: str | None = None,
                 cuda_graphs: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.pool = pool
        self.sampling_defaults = sampling_defaults
        self.eos_ids = eos_ids or tokenizer.eos_ids
        self.kernel_backend = kernel_backend  # None: TANDEM_KERNEL_BACKEND, else auto (see tandem.kernels.backend)
        self.device = model.lm_head_weight.device
        self.dtype = model.lm_head_weight.dtype
        self.stats = EngineStats()
        self.decoder = DecodeRunner(model, pool, kernel_backend, cuda_graphs)
        # How many steps behind the device the host reads the sampled tokens. On CUDA 1: the next step is queued
        # before the host waits for this one's tokens, so the GPU never waits for the host, and at most one step
        # runs past a stop. On the CPU, where nothing runs ahead, 0.
        self.read_lag = 1 if self.device.type == "cuda" else 0
        self._generator = torch.Generator(self.device)
        self._generator.seed()

    @classmethod
    def from_pretrained(
        cls, checkpoint_dir: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
        kv_cache_tokens: int | None = None, page_size: int = DEFAULT_PAGE_SIZE, kernel_backend: str | None = None,
        cuda_graphs: bool | None = None,
    ) -> "Engine":
        """Load a Qwen3-VL checkpoint: a folder, or a Hugging Face model id (see tandem.models.hub). device/dtype default to cuda + bfloat16 when available, else cpu + float32.
        kv_cache_tokens sizes the KV page pool; by default from free device memory (CUDA) or CPU_KV_TOKENS.
        kernel_backend ("torch", "triton" or "auto") overrides TANDEM_KERNEL_BACKEND for this engine; cuda_graphs
        replays each decode step as a CUDA graph where the kernels allow it (CUDA + Triton); None:
        TANDEM_CUDA_GRAPHS, on by default."""
        device = parse_device(device)
        dtype = parse_dtype(dtype, device)
        for name, value in (("kv_cache_tokens", kv_cache_tokens), ("page_size", page_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if kernel_backend is not None and kernel_backend not in BACKENDS:
            raise InputError(f"kernel_backend {kernel_backend!r} is not one of {', '.join(BACKENDS)}")
        try:  # the backend must be able to run on this device (and TANDEM_KERNEL_BACKEND must be valid)
            with use_backend(kernel_backend):
                implementation(device)
        except ValueError as e:
            raise InputError(f"kernel backend on {device}: {e}") from e
        checkpoint_dir = resolve_checkpoint(checkpoint_dir)
        config = load_config(checkpoint_dir)  # cheap checks first: fail before loading any weight
        tokenizer = Tokenizer.from_pretrained(checkpoint_dir)
        tokenizer.check_model(config, checkpoint_dir)
        image_config = ImageProcessorConfig.from_checkpoint(checkpoint_dir)
        defaults, eos_ids = checkpoint_defaults(checkpoint_dir)
        model = load_model(checkpoint_dir, device, dtype, config)
        text = model.config.text
        if kv_cache_tokens is None:
            kv_cache_tokens = _default_kv_tokens(device, PagePool.bytes_per_token(text, dtype), text.max_position_embeddings)
        pool = PagePool(text, -(-kv_cache_tokens // page_size), page_size, device, dtype)
        return cls(model, tokenizer, image_config, pool, defaults, eos_ids, kernel_backend, cuda_graphs)

    # ---- public API --------------------------------------------------------------------------------------------
    def generate(self, messages: Messages | None = None, sampling: SamplingParams | None = None, *,
                 prompt_token_ids: TokenIds | None = None, images: list | None = None) -> GenerateOutput:
        """Generate a reply to chat `messages` (a plain string is one user message), or to ready
        `prompt_token_ids` with `images`. Every input is checked before any work."""
        params = self.resolve(sampling)
        return self._generate([self.prepare(messages, prompt_token_ids, images, max_tokens=params.max_tokens)],
                              params)[0]

    def generate_batch(self, requests: list[Messages | Prompt], sampling: SamplingParams | None = None
                       ) -> list[GenerateOutput]:
        """Generate a reply to each request (chat messages, or a Prompt from `prepare`), decoding them together:
        each step feeds one token to every unfinished reply. Every request is checked before any work; the
        sampling params are shared. A reply's tokens are those it would get alone under greedy decoding."""
        params = self.resolve(sampling)
        if not isinstance(requests, (list, tuple)):
            raise InputError(f"generate_batch takes a list of requests, got {type(requests).__name__}")
        prompts = [r if isinstance(r, Prompt) else self.prepare(r, max_tokens=params.max_tokens) for r in requests]
        return self._generate(prompts, params) if prompts else []

    def stream(self, messages: Messages | None = None, sampling: SamplingParams | None = None, *,
               prompt_token_ids: TokenIds | None = None, images: list | None = None) -> Iterator[str]:
        """Yield the reply's text piece by piece as tokens are decoded (never half a UTF-8 character). Bad input
        is refused at the call, before the first piece is asked for."""
        params = self.resolve(sampling)
        prompt = self.prepare(messages, prompt_token_ids, images, max_tokens=params.max_tokens)
        return self._stream(prompt, params)

    def _stream(self, prompt: Prompt, params: SamplingParams) -> Iterator[str]:
        stop_ids = self.stop_ids(params)
        detok = IncrementalDetokenizer(self.tokenizer, prompt.token_ids)
        with closing(self._token_chunks([prompt], params, [Timings()])) as chunks:
            for (chunk,) in chunks:
                for token in chunk:
                    if token in stop_ids:
                        break
                    piece = detok.add(token)
                    if piece:
                        yield piece
        tail = detok.flush()  # text held back waiting for the rest of a character that never came
        if tail:
            yield tail

    def prepare(self, messages: Messages | None, prompt_token_ids: TokenIds | None = None,
                images: list | None = None, *, max_tokens: int = 0) -> Prompt:
        """Tokenize and preprocess a request. Exactly one of messages / prompt_token_ids; images go with the ids.
        Everything is checked before any image is decoded: the messages' structure, the ids, each image's size
        (read from its header) and whether the prompt, with `max_tokens` more, fits the context and the cache."""
        if (messages is None) == (prompt_token_ids is None):
            raise InputError("pass either messages or prompt_token_ids, not both and not neither")
        if messages is not None:
            if images is not None:
                raise InputError("images go inside messages as {'type': 'image', 'image': ...} parts")
            messages = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
            validate_messages(messages)
            images = extract_images(messages)
        elif images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            raise InputError(f"images must be a list, got {type(images).__name__}")
        per_image = [image_tokens(*image_size(image, i), self.image_config, i) for i, image in enumerate(images)]
        if messages is not None:
            ids = build_prompt_ids(self.tokenizer, messages, per_image)
        else:
            ids = expand_image_pads(self._check_ids(prompt_token_ids), per_image, self.tokenizer.image_pad_id)
        self.check_fits(len(ids) + max_tokens, len(ids) + max_tokens)
        start = self.now()
        inputs = preprocess_images(images, self.image_config, self.device, self.dtype) if images else None
        preprocess_s = self.now() - start
        assert per_image == (inputs.tokens_per_image if inputs else []), "image token count changed on decoding"
        grids = [tuple(g) for g in inputs.grid_thw.tolist()] if inputs else []
        positions, rope_delta = mrope_positions(ids, grids, self.model.config.image_token_id, self.image_config.merge_size)
        return Prompt(ids, inputs, positions.to(self.device), rope_delta, preprocess_s)

    def prompt_logits(self, prompt: Prompt) -> torch.Tensor:
        """Logits [len(prompt), vocab] (float32) at every prompt position, from one prefill pass."""
        self.check_fits(len(prompt.token_ids), len(prompt.token_ids))
        seq = Sequence(self.pool)
        try:
            return self._prefill_prompt(seq, prompt, Timings(), logits="all")
        finally:
            seq.release()

    # ---- building blocks (also used by tandem.runtime.pipeline) ------------------------------------------------
    def encode_images(self, images: ImageInputs) -> VisionFeatures:
        """The vision tower's output for preprocessed images: what replaces their pad tokens, and DeepStack's."""
        grids = [tuple(g) for g in images.grid_thw.tolist()]
        with torch.inference_mode(), use_backend(self.kernel_backend):
            embeds, deepstack = self.model.visual(images.pixel_values, grids)
        return VisionFeatures(embeds, deepstack, grids, images.merge_size)

    def prefill(self, seq: Sequence, ids: torch.Tensor, positions: torch.Tensor,
                vision: VisionFeatures | None = None, logits: str | None = "last") -> torch.Tensor | None:
        """Append ids [n] (on the device) to `seq` in one forward pass: a whole prompt, or a suffix on top of a
        prefix that `seq` forked. `vision` fills the image pads among ids, in order. logits: "last" -> [1, vocab],
        "all" -> [n, vocab], None -> nothing (a prefix that only later suffixes read)."""
        visual = None
        image_embeds = None
        if vision is not None:
            image_embeds = vision.embeds
            visual = VisualTokens(ids == self.model.config.image_token_id, vision.deepstack)
            self.stats.image_prefills += 1
        self.stats.prefill_tokens += len(ids)
        with torch.inference_mode():
            hidden = self._forward(seq, ids, positions, image_embeds, visual)
            if logits is None:
                return None
            return self.model.logits(hidden[-1:] if logits == "last" else hidden)

    def decode_batch(self, seqs: list[Sequence], logits: torch.Tensor, params: SamplingParams,
                     rope_deltas: list[int], timings: list[Timings], key_mass: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> Iterator[list[list[int]]]:
        """Sample from the prefills' last logits [B, vocab], then feed each sequence its token back, until every
        sequence has met a stop id or params.max_tokens. Yields, once per token, each sequence's new token ids on
        the host (none once it has stopped; its stop token is the last it yields). The host reads them `read_lag`
        steps behind the device, never stalling it; steps run past a stop are counted in Timings.decode_steps.
        key_mass [B, >= final length] float32: every step adds the attention each cached key receives (summed over
        heads and layers), for rows not yet stopped. out [B, >= max_tokens] long: receives the sampled ids on the
        device (past a row's stop too), for callers that hand them on without a round trip through the host."""
        batch, steps = len(seqs), params.max_tokens
        stop_ids = self.stop_ids(params)
        stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=self.device)
        generator = self._generator if params.seed is None else torch.Generator(self.device).manual_seed(params.seed)
        sampler = Sampler(params, generator, self.device)
        host = _HostTokens(steps, batch, self.device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=self.device)
        finished = [False] * batch  # a stop token was yielded
        emitted = [0] * batch
        start = self.now()
        queued = 0  # tokens sampled on the device, per row

        def sampled(logits: torch.Tensor, index: int) -> torch.Tensor:
            tokens = sampler(logits)
            stopped.logical_or_(_is_stop(tokens, stops))
            if out is not None:
                out[:, index] = tokens
            host.push(index, tokens)
            return tokens

        try:
            self.decoder.begin(seqs, rope_deltas, steps - 1, key_mass)
            with torch.inference_mode():
                tokens = sampled(logits, 0)
            queued, read = 1, 0  # read: tokens the host has read, per row
            while True:
                # Inference mode around the device work only: the caller's code between yields runs as it would.
                with torch.inference_mode():
                    while queued < min(read + 1 + self.read_lag, steps):
                        live = ~stopped if key_mass is not None else None
                        tokens = sampled(self.decoder.step(tokens, live), queued)
                        queued += 1
                        self.stats.decode_steps += 1
                row_tokens = host.read(read)
                read += 1
                elapsed = time.perf_counter() - start  # the token is on the host now: no device sync needed
                chunks = []
                for b, token in enumerate(row_tokens):
                    if finished[b]:
                        chunks.append([])
                        continue
                    chunks.append([token])
                    emitted[b] += 1
                    finished[b] = token in stop_ids
                    timings[b].output_tokens, timings[b].decode_s = emitted[b], elapsed
                yield chunks
                if all(finished) or read == steps:
                    return
        finally:
            for t in timings:
                t.decode_steps = max(queued - 1, 0)  # the first token came from the prefill
            self.decoder.end(seqs)

    # ---- internals ---------------------------------------------------------------------------------------------
    def _generate(self, prompts: list[Prompt], params: SamplingParams) -> list[GenerateOutput]:
        timings = [Timings() for _ in prompts]
        ids: list[list[int]] = [[] for _ in prompts]
        # closing(): an exception here (Ctrl-C) must end the generation now, not when its traceback is freed.
        with closing(self._token_chunks(prompts, params, timings)) as steps:
            for chunks in steps:
                for row, chunk in zip(ids, chunks):
                    row += chunk
        outputs = []
        for row, t in zip(ids, timings):
            text_ids, finished = self.without_stop(row, params)
            outputs.append(GenerateOutput(self.tokenizer.decode(text_ids), row, "stop" if finished else "length", t))
        return outputs

    def _token_chunks(self, prompts: list[Prompt], params: SamplingParams,
                      timings: list[Timings]) -> Iterator[list[list[int]]]:
        """Encode each prompt's images and prefill it, then decode the batch until every reply has met a stop id
        or max_tokens (params: resolved); yields each reply's new token ids (see `decode_batch`). Pages are
        released when the generator ends, however it ends."""
        totals = [len(p.token_ids) + params.max_tokens for p in prompts]
        size = self.pool.page_size
        self.check_fits(max(totals), sum(-(-total // size) * size for total in totals))
        seqs = [Sequence(self.pool) for _ in prompts]
        try:
            logits = [self._prefill_prompt(seq, prompt, t) for seq, prompt, t in zip(seqs, prompts, timings)]
            deltas = [p.rope_delta for p in prompts]
            yield from self.decode_batch(seqs, torch.cat(logits), params, deltas, timings)
        finally:
            release_all(seqs)

    def _prefill_prompt(self, seq: Sequence, prompt: Prompt, timings: Timings, logits: str = "last") -> torch.Tensor:
        """Encode the prompt's images and prefill it into `seq` -> logits (see `prefill`: "last" [1, vocab] or
        "all" [n, vocab])."""
        timings.prompt_tokens = len(prompt.token_ids)
        start = self.now()
        vision = self.encode_images(prompt.images) if prompt.images else None
        prefill_start = self.now()
        timings.vision_s = prompt.preprocess_s + prefill_start - start
        timings.image_tokens = sum(vision.tokens_per_image) if vision else 0
        out = self.prefill(seq, torch.tensor(prompt.token_ids, device=self.device), prompt.positions, vision, logits)
        timings.prefill_s = self.now() - prefill_start
        return out

    def _forward(self, seq: Sequence, ids: torch.Tensor, positions: torch.Tensor,
                 image_embeds: torch.Tensor | None = None, visual: VisualTokens | None = None) -> torch.Tensor:
        """Run new tokens of one sequence through the decoder, appending their K/V to its pages."""
        slots = seq.append_slots(len(ids)).to(self.device)
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=seq.block_table(self.device),
            seq_lens=torch.tensor([seq.length], dtype=torch.int32, device=self.device),
            cu_query_lens=torch.tensor([0, len(ids)], dtype=torch.int32, device=self.device),
            max_query_len=len(ids),
        )
        with use_backend(self.kernel_backend):
            x = self.model.embed(ids, image_embeds)
            return self.model.language_model(x, positions, self.pool.kv, meta, visual)

    def without_stop(self, ids: list[int], sampling: SamplingParams | None) -> tuple[list[int], bool]:
        """(generated ids without the stop token that ended them, whether one did)."""
        finished = int(ids[-1]) in self.stop_ids(sampling)
        return (ids[:-1] if finished else ids), finished

    def stop_ids(self, sampling: SamplingParams | None) -> frozenset[int]:
        """The ids that end generation under these params: the checkpoint's eos ids (unless ignore_eos) and
        the params' stop_token_ids."""
        params = sampling or SamplingParams()
        return frozenset(() if params.ignore_eos else self.eos_ids) | frozenset(params.stop_token_ids)

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

    def _check_ids(self, ids: TokenIds) -> list[int]:
        """prompt_token_ids as a list of ints: a list or tuple of ints, or a 1-D integer tensor or numpy array."""
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            kind = str(ids.dtype).removeprefix("torch.")
            integer = not ids.dtype.is_floating_point and not ids.dtype.is_complex if isinstance(ids, torch.Tensor) \
                else ids.dtype.kind in "iu"
            if not integer or kind == "bool":
                raise InputError(f"prompt_token_ids is a {type(ids).__name__} of {kind}: token ids are integers")
            if ids.ndim != 1:
                raise InputError(f"prompt_token_ids has shape {list(ids.shape)}: pass one sequence of ids (1-D)")
            ids = ids.tolist()
        elif not isinstance(ids, (list, tuple)):
            raise InputError(f"prompt_token_ids must be a list of token ids, got {type(ids).__name__}")
        if not ids:
            raise InputError("prompt_token_ids is empty")
        vocab = self.model.config.text.vocab_size
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab:
                raise InputError(f"prompt_token_ids[{i}] = {t!r} is not a token id in [0, {vocab})")
        return [int(t) for t in ids]

    def check_fits(self, total: int, new: int) -> None:
        """Refuse, before any work, a sequence that would reach `total` tokens (prompt + max_tokens) with `new` of
        them needing fresh cache pages (a batch: the sum over its sequences, each rounded up to whole pages):
        beyond the model's context or the cache's free pages."""
        limit = self.model.config.text.max_position_embeddings
        if total > limit:
            raise InputError(f"prompt + max_tokens = {total} tokens exceeds the model's context of {limit} tokens")
        size = self.pool.page_size
        pages = -(-new // size)
        if pages > self.pool.free_pages:
            raise InputError(f"prompt + max_tokens needs {pages * size} tokens of KV cache ({pages} pages of {size}), "
                             f"more than the {self.pool.free_pages * size} free (capacity {self.pool.capacity_tokens}; "
                             f"raise kv_cache_tokens (--kv-cache-tokens) or lower max_tokens)")

    def now(self) -> float:
        """A clock reading after the device has finished this stream's work (see device_clock)."""
        return device_clock(self.device)


class _HostTokens:
    """The host's copy of each step's sampled tokens [steps, rows]. On CUDA each step's row is copied into pinned
    memory behind an event, and `read` waits for that event only: the steps queued after it keep the GPU busy."""

    def __init__(self, steps: int, rows: int, device: torch.device):
        cuda = device.type == "cuda"
        self.tokens = torch.empty(steps, rows, dtype=torch.long, pin_memory=cuda)
        # A ring of events suffices: the decode loop reads step i before it pushes step i + 2.
        self.events = [torch.cuda.Event(), torch.cuda.Event()] if cuda else None

    def push(self, step: int, tokens: torch.Tensor) -> None:
        self.tokens[step].copy_(tokens, non_blocking=self.events is not None)
        if self.events is not None:
            self.events[step % 2].record()

    def read(self, step: int) -> list[int]:
        if self.events is not None:
            self.events[step % 2].synchronize()
        return self.tokens[step].tolist()


def _is_stop(tokens: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """Which of `tokens` are stop ids, on the device without a host sync (torch.isin syncs for 10+ ids)."""
    return (tokens[..., None] == stops).any(-1)


def device_clock(device: torch.device) -> float:
    """A clock reading after the current stream has finished its queued work: phase timings mean device time.
    Only the current stream, so two engines running on two streams do not wait for each other."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return time.perf_counter()


def parse_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: CUDA when available by default. Refuses, in one line, a name torch does not know and
    a CUDA device this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device {device!r} is not a device name: use cuda, cuda:N or cpu") from e
    if parsed.type not in ("cuda", "cpu"):
        raise InputError(f"device {device!r}: Tandem runs on cuda or cpu")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise InputError(f"device {device!r}: torch sees no CUDA device (torch {torch.__version__}, {build}); "
                             "run on the CPU instead (device='cpu', --device cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise InputError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")


def _default_kv_tokens(device: torch.device, bytes_per_token: int, max_positions: int) -> int:
    """CUDA: 85% of the memory still free after the weights (the rest is headroom for activations). CPU: a fixed
    CPU_KV_TOKENS, which the tests' tiny models and a single long request fit in."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.85) // bytes_per_token
    return min(CPU_KV_TOKENS, max_positions)
