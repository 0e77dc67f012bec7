"""The check part of `tandem bench`: what a speculation's check costs the target, as decode rows and as a prefill.

A round of speculative decoding ends with the target's forward over its last token and the k drafts (n = k + 1
tokens) after a context of L tokens, keeping the logits of every one (`Engine.submit_verify`). The runner runs
such a chunk (n <= ROWS_CHUNK) either as one decode-shaped step of n rows, each reading the sequence's keys and
values once (on CUDA with graphs, a graph replay), or as a prefill of n tokens (every kernel launched from the
host, the keys read once). Which one costs less depends on n, L and the device: this part measures both at every
(L, n), beside n = 1 (a decode step's work), so that the choice (`ModelRunner.chunk_rows`) rests on numbers.
"""

from __future__ import annotations

import warnings

from tandem.bench.build import Built, text_ids
from tandem.bench.settings import BenchSettings
from tandem.bench.timing import Progress, median, to_ms
from tandem.models.prompt import Prompt
from tandem.runtime.runner import ROWS_CHUNK

MODES = {"rows": ROWS_CHUNK, "prefill": 0}  # the runner's chunk_rows for each way of running the chunk
WARMUPS = 2  # a shape's first step runs eagerly and its second is captured: replays are timed from the third on


def bench_check(built: Built, s: BenchSettings, progress: Progress) -> dict:
    """Per context L: one held sequence of L random text ids, with the pages of its longest chunk reserved (so
    that every chunk runs on one block-table width); then, repeat by repeat (WARMUPS untimed first), every n in
    both modes: submit_verify of n random ids in place, timed whole (the device synchronised around it, as a
    speculation waits for it), then the n tokens cut off again."""
    engine, runner = built.engine, built.engine.runner
    samples = {mode: [[[] for _ in s.check_tokens] for _ in s.check_contexts] for mode in MODES}
    default = runner.chunk_rows
    with warnings.catch_warnings(record=True) as caught:  # (the engine's loop thread warns through it too)
        warnings.simplefilter("always")
        try:
            for i, length in enumerate(s.check_contexts):
                prefix = engine.submit_prefix(Prompt.continuing(text_ids(length, s.seed + length), 0, 0),
                                              stage_tokens=max(s.check_tokens)).result()
                seq = prefix.seq
                try:
                    seq.reserve(max(s.check_tokens))
                    for repeat in range(WARMUPS + s.repeats):
                        for j, n in enumerate(s.check_tokens):
                            chunk = text_ids(n, s.seed + 7 * length + n + repeat)
                            for mode, rows in MODES.items():
                                runner.chunk_rows = rows
                                start = engine.now()
                                engine.submit_verify(seq, Prompt.continuing(chunk, length, 0)).result()
                                elapsed = engine.now() - start
                                seq.truncate(length)
                                if repeat >= WARMUPS:
                                    samples[mode][i][j].append(elapsed)
                                progress.step(f"check {mode} L={length} n={n}")
                finally:  # (on an interrupt, the process is ending: a verify still running does not matter)
                    engine.release(seq)
        finally:
            runner.chunk_rows = default
    for w in caught:  # shown as without the catch; the failed captures also go into the result
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    failed = [str(w.message) for w in caught if "as a CUDA graph failed" in str(w.message)]
    columns = {mode: {"ms": [[to_ms(median(x)) for x in row] for row in samples[mode]],
                      "samples_ms": [[[1000 * v for v in x] for x in row] for row in samples[mode]]}
               for mode in MODES}
    return {"contexts": list(s.check_contexts), "tokens": list(s.check_tokens), "graphs": runner.graphable(),
            "failed_captures": failed, "default_chunk_rows": default, "columns": columns,
            "ratio": [[r / p for r, p in zip(rows, pre)]
                      for rows, pre in zip(columns["rows"]["ms"], columns["prefill"]["ms"])]}
