"""The profile part of `tandem bench`, where the time goes: torch.profiler traces of a decode step and of a first token.

- decode: the decode steps of one greedy request at batch 1: the whole request profiled, less the same request cut
  to its first token (prefill and first sample), each run once untimed first so that kernels are compiled and
  CUDA graphs captured outside the profile, then profiled three times, the fastest kept. On a GPU with CUDA graphs it runs twice: as the engine runs it (graph
  replays) and with graphs off (every kernel launched from Python), which shows what the graphs save.
- first token: one request with one image and a question, max_tokens=1, split into preparation on the host
  (chat template, tokenization, the image's decoding) and the engine's vision (preprocessing and encoder) and
  prefill, with the same profile of the whole call.

Rows are the device's kernels summed by name on CUDA, the operators' self time on the CPU, slowest first (all of
them in bench.json, the top ones in the summary), in every thread (the engine works in its loop's thread). busy =
the sum over every row; wall = the synchronised window,
profiler overhead included (so it reads above the un-profiled figures of the other parts). On a GPU, wall - busy
is time the device spent waiting for the host.
"""

from __future__ import annotations

import torch
from torch.autograd import DeviceType
from torch._C._profiler import _ExperimentalConfig
from torch.profiler import ProfilerActivity, profile

from tandem.bench.build import QUESTION, Built, bench_image, forced_greedy, image_question, text_ids
from tandem.bench.settings import BenchSettings
from tandem.bench.timing import Progress
from tandem.runtime.engine import Engine


def bench_profiles(built: Built, s: BenchSettings, progress: Progress) -> dict:
    """The profile part: a decode step (with CUDA graphs and, where the engine uses them, without) and a first
    token with one image of the policies' size."""
    engine = built.engine
    ids = text_ids(s.decode_prompt_tokens, s.seed)
    decode = {}
    for name, graphs in (("cuda graphs", True), ("eager launches", False)):
        if graphs and not engine.runner.graphable():
            continue
        decode[name] = profile_decode(engine, ids, s.profile_steps, graphs)
        progress.step(f"profile decode, {name}")
    first_token = profile_first_token(engine, image_question(bench_image(s.policy_image_size, s.seed + 7)))
    progress.step("profile first token")
    return {"prompt_tokens": s.decode_prompt_tokens, "decode": decode, "first_token": first_token,
            "image_size": [s.policy_image_size, s.policy_image_size], "question": QUESTION}


def profile_decode(engine: Engine, prompt_ids: list[int], steps: int, graphs: bool) -> dict:
    """Profile `steps` decode steps of a greedy reply to `prompt_ids` at batch 1: the reply of steps + 1 tokens
    profiled whole, less the same request with max_tokens=1 (its prefill and first token), so every row counts
    the decode steps alone, whatever runs where (the engine's loop decodes in a thread of its own). `graphs`
    turns the engine's CUDA graphs on or off meanwhile."""
    previous = engine.runner.cuda_graphs
    engine.runner.cuda_graphs = graphs
    replays = engine.runner.graphable()
    try:
        profiled = {}
        # Each request three times, its fastest kept: one slow outlier on either side of the difference would make
        # the decode steps' wall read off their busy time.
        for tokens in (steps + 1, 1):
            engine.generate(prompt_token_ids=prompt_ids, sampling=forced_greedy(tokens))  # compile, capture first
            runs = []
            for _ in range(3):
                before = engine.stats.decode_steps
                with _profile(engine.device) as prof:
                    start = engine.now()
                    engine.generate(prompt_token_ids=prompt_ids, sampling=forced_greedy(tokens))
                    wall = engine.now() - start
                runs.append((_totals(prof, engine.device), wall, engine.stats.decode_steps - before))
            profiled[tokens] = min(runs, key=lambda run: run[1])
    finally:
        engine.runner.cuda_graphs = previous
    (whole, whole_wall, done), (first, first_wall, _) = profiled[steps + 1], profiled[1]
    rows, busy = _rows({name: (calls - first.get(name, (0, 0.0))[0], max(ms - first.get(name, (0, 0.0))[1], 0.0))
                        for name, (calls, ms) in whole.items()}, done)
    return {"steps": done, "cuda_graphs": replays, "wall_ms_per_step": 1000 * (whole_wall - first_wall) / done,
            "busy_ms_per_step": busy, "rows": rows}


def profile_first_token(engine: Engine, messages: list[dict]) -> dict:
    """Profile one request's first token (max_tokens=1) after an untimed run of the same shapes."""
    params = forced_greedy(1)
    engine.generate(messages, params)
    with _profile(engine.device) as prof:
        start = engine.now()
        prompt = engine.prepare(messages)
        prepared = engine.now()
        (out,) = engine.generate_batch([prompt], params)
        wall = engine.now() - start
    t = out.timings
    rows, busy = _rows(_totals(prof, engine.device), 1)
    return {
        "wall_ms": 1000 * wall, "busy_ms": busy,
        "prepare_ms": 1000 * (prepared - start),  # chat template, tokenization, the image's decoding on the host
        "vision_ms": 1000 * t.vision_s,  # the image's preprocessing on the device and the vision encoder
        "prefill_ms": 1000 * t.prefill_s,  # the prompt's forward pass
        "prompt_tokens": t.prompt_tokens, "image_tokens": t.image_tokens, "rows": rows,
    }


def _profile(device: torch.device) -> profile:
    """A profiler of the device's kernels (CUDA) or operators (CPU) in every thread: the engine's work runs in its
    loop's thread, not the caller's."""
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    try:
        config = _ExperimentalConfig(profile_all_threads=True)
    except TypeError:  # an older torch: the caller's thread only (CUDA kernels are seen from any thread anyway)
        config = _ExperimentalConfig()
    return profile(activities=activities, experimental_config=config)


def _totals(prof: profile, device: torch.device) -> dict[str, tuple[int, float]]:
    """Every kernel (CUDA) or operator (CPU) the profile saw: name -> (calls, self ms)."""
    on = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    totals = {}
    for e in prof.key_averages():
        if e.device_type != on or e.is_user_annotation:  # a record_function range would count its kernels twice
            continue
        us = e.self_device_time_total if on == DeviceType.CUDA else e.self_cpu_time_total
        if us > 0:
            totals[e.key] = (e.count, us / 1000)
    return totals


def _rows(totals: dict[str, tuple[int, float]], per: int) -> tuple[list[dict], float]:
    """The rows, slowest first, with calls and ms per `per` units; and the ms of all of them per unit."""
    found = [(name, calls, ms) for name, (calls, ms) in totals.items() if calls > 0 and ms > 0]
    total = sum(ms for _, _, ms in found)
    found.sort(key=lambda row: -row[2])
    rows = [{"name": name, "calls": count / per, "ms": ms / per, "share": ms / total if total else 0.0}
            for name, count, ms in found]
    return rows, total / per
