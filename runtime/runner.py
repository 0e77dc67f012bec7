"""ModelRunner: one engine step on the device. Prefill chunks, the batched decode step, sampling, and the tokens'
way back to the host, none of which waits for the GPU.

A decode step feeds one token to each sequence of the running batch. Its inputs live in static device buffers of the
step's shape, (batch bucket, block-table width): the batch is padded to a power of two (1, 2, 4, 8, ...) and the
block table to a power of two of pages, so a few shapes cover every batch, and on CUDA with the Triton kernels each
shape is captured once as a CUDA graph and replayed. The step computes cache slots and positions from the buffers,
advances the lengths itself, and the sampler draws every row with its own params: nothing comes from the host
while the batch stays the same. When a request joins or leaves, the buffers are rewritten once from the host's
view of every row, and the tokens and stop flags only the device knows are carried over by a gather. Padding rows
write into the pool's scratch page, which no sequence owns; their logits are never read.

Where steps replay graphs, a short text chunk (a speculation's drafts to check, a round's first draft step, a short
prompt) runs in the same shape: one row per token, every row on the sequence's block table at its own length, in
buffers of its own. So it replays a graph too, where a prefill would launch every kernel of the model from the
host, at the cost of reading the sequence's keys and values once per row. (On the CPU, without graphs, the
prefill is cheaper: `chunk_rows` is 0 there.)

A shape's first step runs eagerly on the capture stream, its second is captured; a capture that fails leaves that
shape eager, with a warning. TANDEM_CUDA_GRAPHS=0 (EngineConfig.cuda_graphs) turns graphs off.
"""

from __future__ import annotations

import threading
import warnings
from collections import deque
from dataclasses import dataclass

import torch

from tandem.kernels import AttentionMetadata, env, use_backend
from tandem.kernels.backend import implementation
from tandem.models.qwen3_vl import Qwen3VL, VisualTokens
from tandem.runtime.kv_cache import PagePool, Sequence
from tandem.runtime.request import Request
from tandem.runtime.sampling import SamplingParams, SamplingRows, sample, sample_keeping, seed_key, to_device

MIN_WIDTH = 16  # pages: the smallest block-table width captured
ROWS_CHUNK = 16  # a text chunk of at most this many tokens runs as a decode-shaped step, one row per token
# One capture at a time in the process: torch.cuda.graph synchronizes the device on entry, which would break a
# capture another engine's loop thread has under way.
_CAPTURE_LOCK = threading.Lock()


def bucket(n: int) -> int:
    """The smallest power of two >= n: the padded batch size, or block-table width, that a step shape uses."""
    return 1 << (n - 1).bit_length()


@dataclass
class _Buffers:
    """The static inputs of one decode step shape (rows = batch bucket)."""

    block_table: torch.Tensor  # [rows, width] int32; unused entries point at the scratch page
    length: torch.Tensor  # [rows] int64: tokens cached before the step
    rope_delta: torch.Tensor  # [rows] int64
    token: torch.Tensor  # [rows] int64: the tokens the next step feeds
    cu_query_lens: torch.Tensor  # [rows + 1] int32: one query per row
    stopped: torch.Tensor  # [rows] bool: the row has drawn a stop id (its later attention no longer counts)
    wants_mass: torch.Tensor  # [rows] float32: 1 where the request adds up its key mass
    key_mass: torch.Tensor  # [rows, width * page_size] float32: the batch's sum since it was last flushed
    step_mass: torch.Tensor  # [rows, width * page_size] float32: one step's, added for live rows
    graphs: dict  # key mass on/off -> (CUDAGraph, logits it writes), or None where the capture failed
    warm: set  # key mass on/off values that have run one eager step (a capture comes after one)


class ModelRunner:
    def __init__(self, model: Qwen3VL, pool: PagePool, kernel_backend: str | None, cuda_graphs: bool | None):
        self.model, self.pool, self.kernel_backend = model, pool, kernel_backend
        self.cuda_graphs = env.cuda_graphs() if cuda_graphs is None else cuda_graphs
        self.device = pool.kv.device
        self.vocab = model.config.text.vocab_size
        self._buffers: dict[tuple[int, int], _Buffers] = {}  # the decode batch's step shapes
        self._chunk_buffers: dict[tuple[int, int], _Buffers] = {}  # short chunks' (apart: the batch's carry its state)
        self._batch: list[Request] = []  # the decode batch in row order
        self._buf: _Buffers | None = None
        self._rows: SamplingRows | None = None
        self._stops: torch.Tensor | None = None  # [batch, most stop ids of a row], -1 padded
        self._with_mass = False
        self._logit_rows: list[int] = []  # the batch's rows that keep each step's logits (token_logits)
        self._logit_index: torch.Tensor | None = None  # the same rows on the device, set with the batch
        self._capture_stream: torch.cuda.Stream | None = None
        self._graph_pool = None
        # The longest text chunk run as decode rows: only where steps replay graphs (on the CPU a prefill costs less).
        self.chunk_rows = ROWS_CHUNK if self.graphable() else 0

    # ---- prefill ----------------------------------------------------------------------------------------------
    def prefill(self, request: Request, start: int, end: int) -> torch.Tensor | None:
        """Run prompt tokens [start, end) of `request` into its sequence, whose pages are reserved. Returns the
        logits [1, vocab] of the last prompt position when this chunk ends the prompt ([end - start, vocab] with
        prompt_logits), else None."""
        prompt, seq = request.prompt, request.seq
        n, device = end - start, self.device
        ids = _on(prompt.token_ids[start:end], torch.long, device)
        image_embeds, visual = None, None
        if request.vision is not None:
            before = sum(1 for t in prompt.token_ids[:start] if t == self.model.config.image_token_id)
            mask = ids == self.model.config.image_token_id
            count = sum(1 for t in prompt.token_ids[start:end] if t == self.model.config.image_token_id)
            if count:
                image_embeds = request.vision.embeds[before : before + count]
                visual = VisualTokens(mask, [f[before : before + count] for f in request.vision.deepstack])
        positions = prompt.positions[:, start:end]
        if image_embeds is None and n <= self.chunk_rows and _continuing(positions, seq.length + prompt.rope_delta):
            logits = self._prefill_rows(seq, ids, prompt.rope_delta)
            return logits if request.prompt_logits else logits[-1:] if end == len(prompt) else None
        # Every input goes up through pinned memory, in stream order: a prefill never waits for the steps queued before it.
        meta = AttentionMetadata(
            slot_mapping=to_device(seq.append_slots(n).tolist(), torch.long, device),
            block_tables=to_device([seq.pages], torch.int32, device),
            seq_lens=to_device([seq.length], torch.int32, device),
            cu_query_lens=to_device([0, n], torch.int32, device),
            max_query_len=n,
        )
        positions = _on(positions, torch.long, device)
        with use_backend(self.kernel_backend):
            hidden = self.model(ids, positions, self.pool.kv, meta, image_embeds, visual)
        if request.prompt_logits:
            return self.model.logits(hidden)
        return self.model.logits(hidden[-1:]) if end == len(prompt) else None

    def _prefill_rows(self, seq: Sequence, ids: torch.Tensor, rope_delta: int) -> torch.Tensor:
        """A short text chunk as one decode-shaped step: row i feeds token i at the sequence's length + i over the
        sequence's block table, so it attends to the tokens before it (every row's K/V is stored before any row
        attends). Its shapes are a decode step's: on CUDA it replays a graph, where a prefill would launch every
        kernel from the host. -> logits [n, vocab], a copy (a graph's output is overwritten by its next replay)."""
        n, length, scratch = len(ids), seq.length, self.pool.scratch_page
        seq.append_slots(n)  # its pages own (a shared last page copied first), the tokens counted
        rows, width = bucket(n), max(MIN_WIDTH, bucket(len(seq.pages)))
        buf = self._chunk_buffers.get((rows, width)) or self._allocate(rows, width, self._chunk_buffers)
        table = [*seq.pages, *[scratch] * (width - len(seq.pages))]
        buf.block_table.copy_(to_device([table] * n + [[scratch] * width] * (rows - n), torch.int32, self.device))
        buf.length.copy_(to_device([*range(length, length + n), *[0] * (rows - n)], torch.int64, self.device))
        buf.rope_delta.fill_(rope_delta)
        buf.token[:n].copy_(ids)
        return self._step(buf, with_mass=False)[:n].clone()

    def sample_first(self, requests: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """Each request's first token from its prompt's last logits [len(requests), vocab] -> [len(requests)]."""
        rows = SamplingRows.of([r.params for r in requests], [seed_key(r.seed) for r in requests],
                               [0] * len(requests), self.vocab, self.device)
        return self._sample(requests, logits, rows, [i for i, r in enumerate(requests) if r.token_logits])

    # ---- decode -----------------------------------------------------------------------------------------------
    def decode(self, batch: list[Request]) -> torch.Tensor:
        """One decode step over `batch` (each request's next token fed, its next token drawn) -> tokens [B] on the
        device. Each request in the batch must have been fed every step since it joined (its `next_token` holds
        the first token when it joins)."""
        if batch != self._batch:
            self._set_batch(batch)
        buf, count = self._buf, len(batch)
        logits = self._step(buf, self._with_mass)[:count]
        tokens = self._sample(batch, logits, self._rows, self._logit_rows, self._logit_index)
        self._rows.step += 1
        buf.stopped[:count] |= (tokens[:, None] == self._stops).any(-1)
        buf.token[:count].copy_(tokens)
        return tokens

    def _sample(self, requests: list[Request], logits: torch.Tensor, rows: SamplingRows, keep: list[int],
                index: torch.Tensor | None = None):
        """Draw each request's next token; the rows in `keep` (token_logits; `index`: them on the device, when
        already there) add what they were drawn from to their request's logits."""
        if not keep:
            return sample(logits, rows)
        if index is None:
            index = to_device(keep, torch.int64, self.device)
        tokens, weights = sample_keeping(logits, rows, index)
        for i, row in enumerate(keep):
            requests[row].logits.append(weights[i : i + 1])
        return tokens

    def reset(self) -> None:
        """Forget the decode batch (its requests failed with a step): the next batch sets its buffers afresh."""
        self._batch, self._buf, self._rows = [], None, None

    def flush_mass(self, request: Request) -> None:
        """Add the key mass the batch gathered for `request` to request.mass (its row's sum since the batch last
        changed), and zero it there. A request not in the batch has gathered none since it last left it."""
        row = next((i for i, r in enumerate(self._batch) if r is request), None)
        if row is None:
            return
        n = min(request.mass.shape[0], self._buf.key_mass.shape[1])
        request.mass[:n] += self._buf.key_mass[row, :n]
        self._buf.key_mass[row].zero_()

    def _set_batch(self, batch: list[Request]) -> None:
        """Rewrite the step buffers for a new batch: the host's view of every row, and a gather of what only the
        device knows (each row's next token and stop flag) from the old rows and the newcomers' first tokens."""
        old, old_buf = self._batch, self._buf
        for request in old:
            if request.key_mass and request.mass is not None:
                self.flush_mass(request)
        if not batch:
            self._batch, self._buf, self._rows = [], None, None
            return
        where = {id(r): i for i, r in enumerate(old)}
        newcomers = [r for r in batch if id(r) not in where]
        index = [where[id(r)] if id(r) in where else len(old) + newcomers.index(r) for r in batch]
        old_tokens = old_buf.token[: len(old)] if old else torch.empty(0, dtype=torch.long, device=self.device)
        old_stopped = old_buf.stopped[: len(old)] if old else torch.empty(0, dtype=torch.bool, device=self.device)
        gather = to_device(index, torch.int64, self.device)
        tokens = torch.cat([old_tokens, *[r.next_token for r in newcomers]])[gather]
        stopped = torch.cat([old_stopped, torch.zeros(len(newcomers), dtype=torch.bool, device=self.device)])[gather]

        rows = bucket(len(batch))
        width = max(MIN_WIDTH, bucket(max(len(r.seq.pages) for r in batch)))
        buf = self._buffers.get((rows, width)) or self._allocate(rows, width, self._buffers)
        table = torch.full((rows, width), self.pool.scratch_page, dtype=torch.int32)
        for row, request in enumerate(batch):
            table[row, : len(request.seq.pages)] = torch.tensor(request.seq.pages, dtype=torch.int32)
        pad = rows - len(batch)
        buf.block_table.copy_(to_device(table.tolist(), torch.int32, self.device))
        buf.length.copy_(to_device([r.seq.length for r in batch] + [0] * pad, torch.int64, self.device))
        buf.rope_delta.copy_(to_device([r.prompt.rope_delta for r in batch] + [0] * pad, torch.int64, self.device))
        buf.wants_mass.copy_(to_device([float(r.key_mass) for r in batch] + [0.0] * pad, torch.float32, self.device))
        buf.token[: len(batch)].copy_(tokens)
        buf.stopped.zero_()
        buf.stopped[: len(batch)].copy_(stopped)
        buf.key_mass.zero_()
        self._rows = SamplingRows.of([r.params for r in batch], [seed_key(r.seed) for r in batch],
                                     [1 + r.fed for r in batch], self.vocab, self.device)
        most = max(1, max(len(r.stop_ids) for r in batch))
        self._stops = to_device([sorted(r.stop_ids) + [-1] * (most - len(r.stop_ids)) for r in batch], torch.int64,
                                self.device)
        self._with_mass = any(r.key_mass for r in batch)
        self._logit_rows = [row for row, r in enumerate(batch) if r.token_logits]
        self._logit_index = to_device(self._logit_rows, torch.int64, self.device) if self._logit_rows else None
        for request in newcomers:
            request.next_token = None
        self._batch, self._buf = list(batch), buf

    def _step(self, buf: _Buffers, with_mass: bool) -> torch.Tensor:
        if not self.graphable():
            return self._forward(buf, with_mass)
        if with_mass not in buf.graphs:
            if with_mass not in buf.warm:  # a variant's first step: eager, on the capture stream, outside any
                buf.warm.add(with_mass)  # capture, so that its kernels are compiled and loaded before one
                return self._on_capture_stream(buf, with_mass)
            self._capture(buf, with_mass)
        captured = buf.graphs[with_mass]
        if captured is None:  # its capture failed: this shape runs eagerly
            return self._forward(buf, with_mass)
        graph, logits = captured
        graph.replay()
        return logits

    def _forward(self, buf: _Buffers, with_mass: bool) -> torch.Tensor:
        page_size = self.pool.page_size
        rows = torch.arange(buf.length.shape[0], device=buf.length.device)
        meta = AttentionMetadata(
            slot_mapping=buf.block_table[rows, buf.length // page_size].long() * page_size + buf.length % page_size,
            block_tables=buf.block_table,
            seq_lens=(buf.length + 1).int(),
            cu_query_lens=buf.cu_query_lens,
            max_query_len=1,
            key_mass=buf.step_mass if with_mass else None,
        )
        positions = (buf.length + buf.rope_delta).expand(3, -1)
        if with_mass:
            buf.step_mass.zero_()
        with use_backend(self.kernel_backend):
            logits = self.model.logits(self.model(buf.token, positions, self.pool.kv, meta))
        if with_mass:  # a row fed its stop token, or fed after it, adds nothing
            buf.key_mass.addcmul_(buf.step_mass, (buf.wants_mass * ~buf.stopped)[:, None])
        buf.length += 1
        return logits

    def _capture(self, buf: _Buffers, with_mass: bool) -> None:
        """Record one step of this shape (replay runs it). If the capture fails, the shape runs eagerly from then
        on, with a warning. Another engine's loop may be launching work meanwhile: the capture runs on this
        runner's own stream and checks only this thread's calls; captures take turns."""
        graph, current = torch.cuda.CUDAGraph(), torch.cuda.current_stream(self.device)
        if self._graph_pool is None:  # one memory pool for all of this runner's graphs: they replay one at a time
            self._graph_pool = torch.cuda.graph_pool_handle()
        try:
            with _CAPTURE_LOCK, torch.cuda.graph(graph, pool=self._graph_pool, stream=self._stream(),
                                                 capture_error_mode="thread_local"):
                logits = self._forward(buf, with_mass)
        except Exception as e:  # Triton's errors are not all RuntimeErrors
            torch.cuda.set_stream(current)  # a failed capture_end leaves the capture stream current
            rows, width = buf.block_table.shape
            kind = "decode step" if any(b is buf for b in self._buffers.values()) else "short-chunk step"
            warnings.warn(f"capturing the {kind} of {rows} rows x {width} pages as a CUDA graph failed, so that "
                          f"shape runs without one (TANDEM_CUDA_GRAPHS=0 turns graphs off): {e}", RuntimeWarning,
                          stacklevel=3)
            buf.graphs[with_mass] = None
            return
        buf.graphs[with_mass] = (graph, logits)

    def _on_capture_stream(self, buf: _Buffers, with_mass: bool) -> torch.Tensor:
        """One eager step on the capture stream, ordered after the current stream's work and before its later work."""
        current, stream = torch.cuda.current_stream(self.device), self._stream()
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            logits = self._forward(buf, with_mass)
        current.wait_stream(stream)
        logits.record_stream(current)  # read there next: its memory must not be reused before that
        return logits

    def _stream(self) -> torch.cuda.Stream:
        """This runner's own capture stream: high priority, apart from the pool torch.cuda.Stream() hands out."""
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.device, priority=-1)
        return self._capture_stream

    def graphable(self) -> bool:
        """Whether decode steps run as CUDA graphs: on CUDA with cuda_graphs set and the Triton kernels, which are
        capturable; the torch references, which read lengths on the host, are not."""
        if not self.cuda_graphs or self.device.type != "cuda":
            return False
        with use_backend(self.kernel_backend):
            return implementation(self.device) == "triton"

    def _allocate(self, rows: int, width: int, shapes: dict) -> _Buffers:
        """A step shape's buffers, kept in `shapes` (short chunks sum no key mass: their mass buffers hold no slot)."""
        device, slots = self.device, width * self.pool.page_size if shapes is self._buffers else 0
        buf = _Buffers(
            block_table=torch.zeros(rows, width, dtype=torch.int32, device=device),
            length=torch.zeros(rows, dtype=torch.long, device=device),
            rope_delta=torch.zeros(rows, dtype=torch.long, device=device),
            token=torch.zeros(rows, dtype=torch.long, device=device),
            cu_query_lens=torch.arange(rows + 1, dtype=torch.int32, device=device),
            stopped=torch.zeros(rows, dtype=torch.bool, device=device),
            wants_mass=torch.zeros(rows, dtype=torch.float32, device=device),
            key_mass=torch.zeros(rows, slots, dtype=torch.float32, device=device),
            step_mass=torch.zeros(rows, slots, dtype=torch.float32, device=device),
            graphs={},
            warm=set(),
        )
        shapes[rows, width] = buf
        return buf


def _on(values: list | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A prompt's ids or positions on the device. A tensor already there was written on the caller's stream (a
    transfer stage's suffix): its memory must outlive this stream's reads of it, even if the caller is cancelled."""
    if not isinstance(values, torch.Tensor) or values.device.type != device.type:
        return to_device(values if isinstance(values, list) else values.tolist(), dtype, device)
    if device.type == "cuda":
        values.record_stream(torch.cuda.current_stream(device))
    return values


def _continuing(positions: torch.Tensor, start: int) -> bool:
    """Are these [3, n] M-RoPE positions a text run from `start` on, as a decode step computes them? (Checked on the
    host only: positions already on the device take the prefill.)"""
    if positions.device.type != "cpu":
        return False
    return torch.equal(positions, torch.arange(start, start + positions.shape[1]).expand(3, -1))


class Readout:
    """Each step's tokens on their way to the host. On CUDA a step's tokens are copied into pinned memory behind an
    event; the host reads a step once its event has completed, and waits for one only when `lag` newer steps are
    already queued behind it: the GPU never waits for the host, and at most `lag` steps run past a stop."""

    def __init__(self, device: torch.device, lag: int):
        self.cuda, self.lag = device.type == "cuda", lag
        self._pending: deque = deque()  # (requests, pinned tokens, event), oldest first

    def push(self, requests: list[Request], tokens: torch.Tensor) -> None:
        """tokens [len(requests)] on the device: each request's newest token."""
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=self.cuda)
        host.copy_(tokens, non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append((list(requests), host, event))

    def ready(self, drain: bool = False) -> list[tuple[list[Request], list[int]]]:
        """The steps the host can read now, oldest first: every one but the newest `lag` (waiting for those if
        need be), and newer ones whose copies have already completed; every one when `drain`."""
        out = []
        while self._pending:
            requests, host, event = self._pending[0]
            if drain or len(self._pending) > self.lag:
                if event is not None:
                    event.synchronize()
            elif event is None or not event.query():
                break  # on the CPU (no event) the lag is kept as is, so that it runs the same code as CUDA
            self._pending.popleft()
            out.append((requests, host.tolist()))
        return out

    def clear(self) -> None:
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._pending)


__all__ = ["ModelRunner", "Readout", "SamplingParams", "bucket"]
