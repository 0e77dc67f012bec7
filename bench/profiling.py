"""Where the time goes: torch.profiler traces of a decode step and of a first token, for `tandem bench`.

- decode: a window of whole decode steps of one greedy request at batch 1. The prefill and the first poll run
  before the window opens, and the same request is run once untimed first, so that kernels are compiled and CUDA
  graphs captured outside it. On a GPU with CUDA graphs it runs twice: as the engine runs it (graph replays) and
  with graphs off (every kernel launched from Python), which shows what the graphs save.
- first token: one request with one image and a question, max_tokens=1, split into preparation on the host
  (chat template, tokenization, image preprocessing) and the engine's vision encoder and prefill, with the same
  profile of the whole call.

Rows are the device's kernels summed by name on CUDA, the operators' self time on the CPU, slowest first (all of
them in bench.json, the top ones in the summary). busy = the sum over every row; wall = the synchronised window,
profiler overhead included (so it reads above the un-profiled figures of the other parts). On a GPU, wall - busy
is time the device spent waiting for the host.
"""

from __future__ import annotations

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from tandem.runtime.engine import Engine
from tandem.runtime.sampling import SamplingParams


def forced_greedy(tokens: int) -> SamplingParams:
    """Exactly `tokens` greedy tokens: every timed or profiled Tandem generation decodes a forced length."""
    return SamplingParams(max_tokens=tokens, temperature=0.0, top_p=1.0, top_k=0, ignore_eos=True)


def profile_decode(engine: Engine, prompt_ids: list[int], steps: int, graphs: bool) -> dict:
    """Profile at least `steps` decode steps (whole polls) of a forced-length greedy reply to `prompt_ids`.
    `graphs` turns the engine's CUDA graphs on or off meanwhile."""
    params = forced_greedy(steps + 8)  # the first piece, the window, and room for pieces that hold no text yet
    previous = engine.decoder.cuda_graphs
    engine.decoder.cuda_graphs = graphs
    replays = engine.decoder.graphable()
    try:
        engine.generate(prompt_token_ids=prompt_ids, sampling=params)  # compiles and captures outside the window
        pieces = engine.stream(prompt_token_ids=prompt_ids, sampling=params)
        try:
            next(pieces)  # the prefill and the first poll's steps
            first = engine.stats.decode_steps
            with profile(activities=_activities(engine.device)) as prof:
                start = engine.now()
                for _ in pieces:
                    if engine.stats.decode_steps - first >= steps:
                        break
                wall = engine.now() - start
            done = engine.stats.decode_steps - first
        finally:
            pieces.close()
    finally:
        engine.decoder.cuda_graphs = previous
    rows, busy = _rows(prof, engine.device, done)
    return {"steps": done, "cuda_graphs": replays, "wall_ms_per_step": 1000 * wall / done, "busy_ms_per_step": busy,
            "rows": rows}


def profile_first_token(engine: Engine, messages: list[dict]) -> dict:
    """Profile one request's first token (max_tokens=1) after an untimed run of the same shapes."""
    params = forced_greedy(1)
    engine.generate(messages, params)
    with profile(activities=_activities(engine.device)) as prof:
        start = engine.now()
        prompt = engine.prepare(messages)
        prepared = engine.now()
        (out,) = engine.generate_batch([prompt], params)
        wall = engine.now() - start
    t = out.timings
    rows, busy = _rows(prof, engine.device, 1)
    return {
        "wall_ms": 1000 * wall, "busy_ms": busy,
        "prepare_ms": 1000 * (prepared - start),  # chat template, tokenization and image preprocessing
        "preprocess_ms": 1000 * prompt.preprocess_s,  # the image part of prepare
        "vision_encoder_ms": 1000 * (t.vision_s - prompt.preprocess_s),
        "prefill_ms": 1000 * t.prefill_s,  # the prompt's forward pass and the first sampled token
        "prompt_tokens": t.prompt_tokens, "image_tokens": t.image_tokens, "rows": rows,
    }


def _activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU, ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]


def _rows(prof: profile, device: torch.device, per: int) -> tuple[list[dict], float]:
    """Every row (kernels on CUDA, operators on the CPU), slowest first, with calls and ms per `per` units; and the
    ms of all of them."""
    on = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    found = []
    for e in prof.key_averages():
        if e.device_type != on or e.is_user_annotation:  # a record_function range would count its kernels twice
            continue
        us = e.self_device_time_total if on == DeviceType.CUDA else e.self_cpu_time_total
        if us > 0:
            found.append((e.key, e.count, us / 1000))
    total = sum(ms for _, _, ms in found)
    found.sort(key=lambda row: -row[2])
    rows = [{"name": name, "calls": count / per, "ms": ms / per, "share": ms / total if total else 0.0}
            for name, count, ms in found]
    return rows, total / per
