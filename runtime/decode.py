"""Decode steps with everything on the device, captured as CUDA graphs where the kernels allow it.

A step reads the token just sampled, the sequence length and its M-RoPE offset from device buffers, computes its
cache slot, context length and position there, runs the decoder and returns the logits. Nothing is copied from
the host during a generation, so the host runs ahead of the GPU; on CUDA with the Triton kernels the step is
captured once per block-table width and replayed (a whole step is then one graph launch).

The buffers are static and belong to the engine: one set per block-table width (a power of two of pages, so a
few widths cover every context), reused by every request whose pages fit it. The pages for every token a
generation may write are reserved before it starts, so its block table is written once per generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.kernels import AttentionMetadata, use_backend
from tandem.kernels.backend import implementation
from tandem.models.qwen3_vl import Qwen3VL
from tandem.runtime.kv_cache import PagePool, Sequence

MIN_WIDTH = 16  # pages: the smallest block-table width captured


@dataclass
class _Buffers:
    block_table: torch.Tensor  # [1, width] int32; unused entries point at page 0 and are never read
    length: torch.Tensor  # [1] int64: tokens cached before the step
    rope_delta: torch.Tensor  # [1] int64
    token: torch.Tensor  # [1] int64: the token the step feeds
    cu_query_lens: torch.Tensor  # [2] int32: one query
    key_mass: torch.Tensor  # [1, width * page_size] float32
    graphs: dict  # key mass on/off -> (CUDAGraph, logits it writes)


class DecodeRunner:
    def __init__(self, model: Qwen3VL, pool: PagePool, kernel_backend: str | None, cuda_graphs: bool = True):
        self.model, self.pool, self.kernel_backend, self.cuda_graphs = model, pool, kernel_backend, cuda_graphs
        self._buffers: dict[int, _Buffers] = {}
        self._run: tuple[Sequence, _Buffers, torch.Tensor | None] | None = None
        self.steps = 0

    def begin(self, seq: Sequence, rope_delta: int, steps: int, key_mass: torch.Tensor | None = None) -> None:
        """Prepare up to `steps` steps on `seq`. With key_mass [1, n] float32, the attention each cached key
        receives is added to it (at `end`)."""
        seq.reserve(steps)
        width = max(MIN_WIDTH, 1 << (len(seq.pages) - 1).bit_length())
        buf = self._buffers.get(width) or self._allocate(width)
        buf.block_table.zero_()
        buf.block_table[0, : len(seq.pages)] = torch.tensor(seq.pages, dtype=torch.int32)
        buf.length.fill_(seq.length)
        buf.rope_delta.fill_(rope_delta)
        if key_mass is not None:
            buf.key_mass.zero_()
        self._run, self.steps = (seq, buf, key_mass), 0

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed `token` [1] (on the device) at the end of the sequence -> logits [1, vocab] for the next one."""
        seq, buf, key_mass = self._run
        buf.token.copy_(token)
        self.steps += 1
        with_mass = key_mass is not None
        if with_mass not in buf.graphs and self.steps > 1 and self._graphable():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the kernels; replay below runs them
                buf.graphs[with_mass] = (graph, self._forward(buf, with_mass))
        if with_mass in buf.graphs:
            graph, logits = buf.graphs[with_mass]
            graph.replay()
            return logits
        return self._forward(buf, with_mass)

    def end(self) -> None:
        """Count the fed tokens in the host-side sequence and hand out the key mass."""
        seq, buf, key_mass = self._run
        seq.length += self.steps
        if key_mass is not None:
            n = min(key_mass.shape[1], buf.key_mass.shape[1])
            key_mass[:, :n] += buf.key_mass[:, :n]
        self._run = None

    def _forward(self, buf: _Buffers, with_mass: bool) -> torch.Tensor:
        page_size = self.pool.page_size
        meta = AttentionMetadata(
            slot_mapping=buf.block_table[0, buf.length // page_size].long() * page_size + buf.length % page_size,
            block_tables=buf.block_table,
            seq_lens=(buf.length + 1).int(),
            cu_query_lens=buf.cu_query_lens,
            max_query_len=1,
            key_mass=buf.key_mass if with_mass else None,
        )
        positions = (buf.length + buf.rope_delta).expand(3, 1)
        with use_backend(self.kernel_backend):
            hidden = self.model.language_model(self.model.embed(buf.token), positions, self.pool.kv, meta)
            logits = self.model.logits(hidden)
        buf.length += 1
        return logits

    def _graphable(self) -> bool:
        """CUDA graphs need every op capturable: the Triton kernels are; the torch references, which read lengths
        on the host, are not. The first step of a width runs eagerly, which also compiles the kernels."""
        device = self.pool.kv.device
        if not self.cuda_graphs or device.type != "cuda":
            return False
        with use_backend(self.kernel_backend):
            return implementation(device) == "triton"

    def _allocate(self, width: int) -> _Buffers:
        device = self.pool.kv.device
        buf = _Buffers(
            block_table=torch.zeros(1, width, dtype=torch.int32, device=device),
            length=torch.zeros(1, dtype=torch.long, device=device),
            rope_delta=torch.zeros(1, dtype=torch.long, device=device),
            token=torch.zeros(1, dtype=torch.long, device=device),
            cu_query_lens=torch.tensor([0, 1], dtype=torch.int32, device=device),
            key_mass=torch.zeros(1, width * self.pool.page_size, dtype=torch.float32, device=device),
            graphs={},
        )
        self._buffers[width] = buf
        return buf
