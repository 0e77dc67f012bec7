"""Decode steps with everything on the device, captured as CUDA graphs where the kernels allow it.

A step feeds one token to each sequence of a batch. It reads the tokens just sampled, the sequence lengths and
their M-RoPE offsets from device buffers, computes cache slots, context lengths and positions there, runs the
decoder and returns the logits. Nothing is copied from the host during a generation, so the host runs ahead of the
GPU; on CUDA with the Triton kernels each step shape is captured once and replayed (a whole step is then one graph
launch).

A step shape is (batch bucket, block-table width): the batch is padded to a power of two (1, 2, 4, 8, ...) and the
block table to a power of two of pages, so a few shapes cover every request. The buffers of a shape are static and
belong to the engine, reused by every batch that fits it. Padding rows write their K/V into the pool's scratch
page, which no sequence owns, and their logits are never read. The pages for every token a generation may write
are reserved before it starts, so the block table is written once per generation.

A shape's first step runs eagerly on the runner's capture stream (it compiles the kernels and sets up their
workspaces outside any capture), its second is captured. A capture that fails leaves that shape eager, with a
warning, instead of failing the request; TANDEM_CUDA_GRAPHS=0 turns graphs off altogether.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass

import torch

from tandem.kernels import AttentionMetadata, env, use_backend
from tandem.kernels.backend import implementation
from tandem.models.errors import InputError
from tandem.models.qwen3_vl import Qwen3VL
from tandem.runtime.interrupts import uninterrupted
from tandem.runtime.kv_cache import PagePool, Sequence

MIN_WIDTH = 16  # pages: the smallest block-table width captured
# One capture at a time in the process: torch.cuda.graph synchronizes the device on entry, which would break a
# capture another thread (verify's other engine) has under way.
_CAPTURE_LOCK = threading.Lock()


@dataclass
class _Buffers:
    """The static inputs of one step shape (rows = batch bucket)."""

    block_table: torch.Tensor  # [rows, width] int32; unused entries point at the scratch page
    length: torch.Tensor  # [rows] int64: tokens cached before the step
    rope_delta: torch.Tensor  # [rows] int64
    token: torch.Tensor  # [rows] int64: the tokens the step feeds
    cu_query_lens: torch.Tensor  # [rows + 1] int32: one query per row
    key_mass: torch.Tensor  # [rows, width * page_size] float32: the generation's sum so far
    step_mass: torch.Tensor  # [rows, width * page_size] float32: this step's, added to key_mass for live rows
    live: torch.Tensor  # [rows] float32: 1 where the row has not met a stop (its step's mass counts), else 0
    graphs: dict  # key mass on/off -> (CUDAGraph, logits it writes), or None where the capture failed


@dataclass
class _Run:
    seqs: list[weakref.ref]  # the batch's sequences: `end(seqs)` ends this run and no other
    buffers: _Buffers
    key_mass: torch.Tensor | None
    graphs: bool  # replay CUDA graphs (`graphable()` when the run began)


def bucket(n: int) -> int:
    """The smallest power of two >= n: the padded batch size, or block-table width, that a step shape uses."""
    return 1 << (n - 1).bit_length()


class DecodeRunner:
    def __init__(self, model: Qwen3VL, pool: PagePool, kernel_backend: str | None, cuda_graphs: bool | None = None):
        """cuda_graphs None: TANDEM_CUDA_GRAPHS (default on)."""
        self.model, self.pool, self.kernel_backend = model, pool, kernel_backend
        self.cuda_graphs = env.cuda_graphs() if cuda_graphs is None else cuda_graphs
        self._buffers: dict[tuple[int, int], _Buffers] = {}  # (rows, width) -> buffers
        self._run: _Run | None = None
        self._mutex = threading.Lock()  # begin and end take turns: two threads cannot both find the runner free
        self._capture_stream: torch.cuda.Stream | None = None
        self.steps = 0

    def begin(self, seqs: list[Sequence], rope_deltas: list[int], steps: int,
              key_mass: torch.Tensor | None = None) -> None:
        """Prepare up to `steps` steps on the batch `seqs`. With key_mass [len(seqs), n] float32, the attention
        each cached key receives is added to it (at `end`). One generation at a time: the step buffers are shared.
        Call it inside a `try` whose `finally` calls `end(seqs)`."""
        with uninterrupted(), self._mutex:
            if self.busy:
                raise InputError("this engine is already decoding another generation (a stream not yet finished or "
                                 "closed); an engine decodes one at a time: finish or close() the other first, or "
                                 "batch the requests with generate_batch")
            self._run = None
            self._begin(seqs, rope_deltas, steps, key_mass)

    @property
    def busy(self) -> bool:
        """Whether a generation holds the runner. One whose sequences are all gone was abandoned without its `end`
        (a Ctrl-C that landed on the call to it) and holds nothing."""
        run = self._run
        return run is not None and any(ref() is not None for ref in run.seqs)

    def _begin(self, seqs: list[Sequence], rope_deltas: list[int], steps: int, key_mass: torch.Tensor | None) -> None:
        for seq in seqs:
            seq.reserve(steps)
        rows = bucket(len(seqs))
        width = max(MIN_WIDTH, bucket(max(len(seq.pages) for seq in seqs)))
        buf = self._buffers.get((rows, width)) or self._allocate(rows, width)
        # Built on the host and copied once: padding rows and unused entries read and write the scratch page.
        table = torch.full((rows, width), self.pool.scratch_page, dtype=torch.int32)
        lengths = torch.zeros(rows, dtype=torch.long)
        deltas = torch.zeros(rows, dtype=torch.long)
        for row, (seq, delta) in enumerate(zip(seqs, rope_deltas)):
            table[row, : len(seq.pages)] = torch.tensor(seq.pages, dtype=torch.int32)
            lengths[row], deltas[row] = seq.length, delta
        buf.block_table.copy_(table)
        buf.length.copy_(lengths)
        buf.rope_delta.copy_(deltas)
        if key_mass is not None:
            buf.key_mass.zero_()
            buf.live.zero_()
            buf.live[: len(seqs)] = 1.0
        self._run, self.steps = _Run([weakref.ref(s) for s in seqs], buf, key_mass, self.graphable()), 0

    def step(self, tokens: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
        """Feed tokens [batch] (on the device), one to the end of each sequence -> logits [batch, vocab]. With key
        mass, live [batch] bool (on the device) says which rows' attention counts: a row fed its stop token, or
        fed after it, adds nothing."""
        run, batch = self._run, len(self._run.seqs)
        buf = run.buffers
        buf.token[:batch].copy_(tokens)
        with_mass = run.key_mass is not None
        if with_mass and live is not None:
            buf.live[:batch].copy_(live)
        self.steps += 1
        if not run.graphs:
            return self._forward(buf, with_mass)[:batch]
        if with_mass not in buf.graphs:
            if self.steps == 1:  # a first step: eager, on the capture stream, outside any capture
                return self._on_capture_stream(buf, with_mass)[:batch]
            self._capture(buf, with_mass)
        captured = buf.graphs[with_mass]
        if captured is None:  # the capture failed: this shape runs eagerly
            return self._forward(buf, with_mass)[:batch]
        graph, logits = captured
        graph.replay()
        return logits[:batch]

    def end(self, seqs: list[Sequence]) -> None:
        """End the run that `begin(seqs)` started (nothing if it did not start, or is not running): count the fed
        tokens in the host-side sequences, hand out the key mass, free the runner."""
        with uninterrupted(), self._mutex:
            run = self._run
            if run is None or [ref() for ref in run.seqs] != seqs:
                return
            try:
                for seq in seqs:
                    seq.length += self.steps
                if run.key_mass is not None:
                    n = min(run.key_mass.shape[1], run.buffers.key_mass.shape[1])
                    run.key_mass[:, :n] += run.buffers.key_mass[: len(seqs), :n]
            finally:
                self._run = None

    def _capture(self, buf: _Buffers, with_mass: bool) -> None:
        """Record one step of this shape (replay runs it). If the capture fails, the shape runs eagerly from then
        on, with a warning. The other engine's thread may be launching work meanwhile: the capture runs on
        this runner's own stream and checks only this thread's calls; captures take turns."""
        graph = torch.cuda.CUDAGraph()
        try:
            with _CAPTURE_LOCK, torch.cuda.graph(graph, stream=self._stream(), capture_error_mode="thread_local"):
                logits = self._forward(buf, with_mass)
        except RuntimeError as e:
            rows, width = buf.block_table.shape
            warnings.warn(f"capturing the decode step of {rows} rows x {width} pages as a CUDA graph failed, so that "
                          f"shape runs without one (TANDEM_CUDA_GRAPHS=0 turns graphs off): {e}", RuntimeWarning,
                          stacklevel=3)
            buf.graphs[with_mass] = None
            return
        buf.graphs[with_mass] = (graph, logits)

    def _on_capture_stream(self, buf: _Buffers, with_mass: bool) -> torch.Tensor:
        """One eager step on the capture stream, ordered after the current stream's work and before its later work."""
        current, stream = torch.cuda.current_stream(self.pool.kv.device), self._stream()
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            logits = self._forward(buf, with_mass)
        current.wait_stream(stream)
        logits.record_stream(current)  # read there next: its memory must not be reused before that
        return logits

    def _stream(self) -> torch.cuda.Stream:
        """This runner's own stream: high priority, apart from the pool torch.cuda.Stream() hands out."""
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.pool.kv.device, priority=-1)
        return self._capture_stream

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
            hidden = self.model.language_model(self.model.embed(buf.token), positions, self.pool.kv, meta)
            logits = self.model.logits(hidden)
        if with_mass:
            buf.key_mass.addcmul_(buf.step_mass, buf.live[:, None])
        buf.length += 1
        return logits

    def graphable(self) -> bool:
        """Whether decode steps run as CUDA graphs: on CUDA with cuda_graphs set (read at each `begin`) and the
        Triton kernels, which are capturable; the torch references, which read lengths on the host, are not."""
        device = self.pool.kv.device
        if not self.cuda_graphs or device.type != "cuda":
            return False
        with use_backend(self.kernel_backend):
            return implementation(device) == "triton"

    def _allocate(self, rows: int, width: int) -> _Buffers:
        device = self.pool.kv.device
        buf = _Buffers(
            block_table=torch.zeros(rows, width, dtype=torch.int32, device=device),
            length=torch.zeros(rows, dtype=torch.long, device=device),
            rope_delta=torch.zeros(rows, dtype=torch.long, device=device),
            token=torch.zeros(rows, dtype=torch.long, device=device),
            cu_query_lens=torch.arange(rows + 1, dtype=torch.int32, device=device),
            key_mass=torch.zeros(rows, width * self.pool.page_size, dtype=torch.float32, device=device),
            step_mass=torch.zeros(rows, width * self.pool.page_size, dtype=torch.float32, device=device),
            live=torch.zeros(rows, dtype=torch.float32, device=device),
            graphs={},
        )
        self._buffers[rows, width] = buf
        return buf
