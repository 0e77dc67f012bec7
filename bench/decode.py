"""The decode parts of `tandem bench`: the bandwidth floor, per-token latency vs output length (Tandem, transformers
eager, transformers static cache + torch.compile), the steps run past a stop, and the decode step at batch B."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any

import torch

from tandem.bench.build import PAD_ID, Built, forced_greedy, free_memory, text_ids
from tandem.bench.settings import BenchSettings
from tandem.bench.timing import Progress, error_text, median, to_ms, unavailable
from tandem.runtime.engine import Engine, device_clock

COPY_SAMPLES = 20
STOP_CHECK_TOKENS = 16  # the stop check's reply length ...
STOP_POSITION = 4  # ... and the 1-based position of the token that becomes its stop id


def measure_floor(device: torch.device, nbytes: int, weight_bytes: int) -> dict:
    """Copy bandwidth (2 x bytes / median copy time, 3 untimed copies first) and the decode floor it implies."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    samples = []
    for _ in range(COPY_SAMPLES):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            samples.append(time.perf_counter() - t0)
    del src, dst
    free_memory(device)
    copy_s = statistics.median(samples)
    bandwidth = 2 * nbytes / copy_s
    return {
        "copy_bytes": nbytes, "copy_ms": 1000 * copy_s, "copy_samples_ms": [1000 * s for s in samples],
        "timer": "cuda events" if device.type == "cuda" else "perf_counter",
        "bandwidth_gb_s": bandwidth / 1e9, "decode_weight_bytes": weight_bytes,
        "ms_per_token": 1000 * weight_bytes / bandwidth,
    }


# ---- per-token latency vs output length ---------------------------------------------------------------------------
class _StepClock:
    """A transformers StoppingCriteria that never stops: it reads the synchronised clock after every sampled token."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs) -> torch.Tensor:
        self.times.append(device_clock(self.device))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _tandem_decode(engine: Engine, ids: list[int], length: int) -> dict:
    params = forced_greedy(length)
    start = engine.now()
    out = engine.generate(prompt_token_ids=ids, sampling=params)
    total = engine.now() - start
    t = out.timings
    return {"total_s": total, "per_token_s": t.decode_s / (length - 1) if length > 1 else None,
            "first_token_s": t.prefill_s, "tokens": len(out.token_ids)}


def _hf_decode(hf, ids: torch.Tensor, length: int, device: torch.device, cache=None, compile_config=None) -> dict:
    from transformers import StoppingCriteriaList

    clock = _StepClock(device)
    kwargs: dict[str, Any] = {}
    if cache is not None:
        cache.reset()
        kwargs = {"past_key_values": cache, "compile_config": compile_config}
    start = device_clock(device)
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length, min_new_tokens=length,
                      do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=PAD_ID,
                      stopping_criteria=StoppingCriteriaList([clock]), **kwargs)
    total = device_clock(device) - start
    steps = clock.times
    return {"total_s": total, "per_token_s": (steps[-1] - steps[0]) / (len(steps) - 1) if len(steps) > 1 else None,
            "first_token_s": steps[0] - start if steps else None, "tokens": out.shape[1] - ids.shape[1]}


def _column(lengths: tuple[int, ...], runs: dict[int, list[dict]], floor_ms: float | None) -> dict:
    """Medians per length of a decode column's runs, with the raw samples and the ratio to the floor."""
    per_token = [to_ms(median([r["per_token_s"] for r in runs[L]])) for L in lengths]
    return {
        "per_token_ms": per_token,
        "total_ms": [to_ms(median([r["total_s"] for r in runs[L]])) for L in lengths],
        "first_token_ms": [to_ms(median([r["first_token_s"] for r in runs[L]])) for L in lengths],
        "ratio_to_floor": [None if v is None or not floor_ms else v / floor_ms for v in per_token],
        "tokens": [sorted({r["tokens"] for r in runs[L]}) for L in lengths],
        "samples": {"per_token_ms": [[to_ms(r["per_token_s"]) for r in runs[L]] for L in lengths],
                    "total_ms": [[to_ms(r["total_s"]) for r in runs[L]] for L in lengths]},
    }


def bench_decode(built: Built, s: BenchSettings, progress: Progress, floor_ms: float | None) -> dict:
    """Tandem and transformers eager, interleaved repeat by repeat (the compiled column comes later, on its own)."""
    engine, device = built.engine, s.torch_device
    ids = text_ids(s.decode_prompt_tokens, s.seed)
    ids_t = torch.tensor([ids], device=device)
    runners = {"tandem": lambda L: _tandem_decode(engine, ids, L)}
    if built.hf is not None:
        runners["hf_eager"] = lambda L: _hf_decode(built.hf, ids_t, L, device)
    # Tandem warms up at every length: each block-table width compiles its kernels and captures its CUDA graph once.
    for L in s.lengths:
        runners["tandem"](L)
    progress.step("decode warm-up tandem")
    if "hf_eager" in runners:  # nothing to compile: one short run
        runners["hf_eager"](min(max(s.lengths), 16))
        progress.step("decode warm-up hf_eager")
    runs: dict[str, dict[int, list[dict]]] = {name: {L: [] for L in s.lengths} for name in runners}
    for rep in range(s.repeats):
        for L in s.lengths:
            for name, run in runners.items():
                runs[name][L].append(run(L))
                progress.step(f"decode {name} {L} tokens ({rep + 1}/{s.repeats})")
    columns = {name: _column(s.lengths, r, floor_ms) for name, r in runs.items()}
    if built.hf is None:
        columns["hf_eager"] = unavailable("skipped (--skip-hf)")
    stop = measure_stop(engine, ids)
    progress.step("decode stop check")
    return {"prompt_tokens": s.decode_prompt_tokens, "lengths": list(s.lengths), "columns": columns, "stop": stop}


def measure_stop(engine: Engine, ids: list[int]) -> dict:
    """Decode steps run past a stop: a greedy reply of STOP_CHECK_TOKENS tokens, then the same request with the
    reply's STOP_POSITION-th token as its stop id (ignore_eos: no other id stops it). The reply now ends at that
    id's first occurrence, and the steps the engine ran after the one that sampled it were wasted:
    steps_past_stop = decode_steps - (output_tokens - 1), as the first token comes out of the prefill."""
    free = engine.generate(prompt_token_ids=ids, sampling=forced_greedy(STOP_CHECK_TOKENS)).token_ids
    stop = free[STOP_POSITION - 1]
    out = engine.generate(prompt_token_ids=ids,
                          sampling=replace(forced_greedy(STOP_CHECK_TOKENS), stop_token_ids=(stop,)))
    steps = out.timings.decode_steps
    return {"max_tokens": STOP_CHECK_TOKENS, "stop_position": STOP_POSITION, "stop_token_id": stop,
            "expected_tokens": free.index(stop) + 1, "output_tokens": len(out.token_ids),
            "finish_reason": out.finish_reason, "decode_steps": steps,
            "steps_past_stop": steps - (len(out.token_ids) - 1)}


def bench_decode_compiled(built: Built, s: BenchSettings, progress: Progress, floor_ms: float | None) -> dict:
    """transformers with a static cache and its compiled decode forward; "unavailable: why" where it cannot run."""
    device = s.torch_device
    planned = 1 + s.repeats * len(s.lengths)
    if built.hf is None:
        return unavailable("skipped (--skip-hf)")
    if s.skip_compile:
        return unavailable("skipped (--skip-compile)")
    if device.type != "cuda":
        return unavailable(f"not attempted on {device.type}: transformers compiles the decode forward for CUDA "
                           "(inductor, CUDA graphs); this column is measured on a GPU only")
    done = 0
    try:
        from transformers import CompileConfig, StaticCache

        ids = torch.tensor([text_ids(s.decode_prompt_tokens, s.seed)], device=device)
        cache = StaticCache(config=built.hf.config, max_cache_len=s.decode_prompt_tokens + max(s.lengths))
        compile_config = CompileConfig()
        start = time.perf_counter()
        for _ in range(2):  # the first call compiles; the second records the CUDA graphs (reduce-overhead)
            _hf_decode(built.hf, ids, min(max(s.lengths), 16), device, cache, compile_config)
        warmup_s = time.perf_counter() - start
        done += 1
        progress.step("decode warm-up hf_compiled (compiling)")
        if getattr(built.hf, "_compiled_call", None) is None:
            raise RuntimeError("transformers did not compile the decode forward (its auto-compile criteria were not met)")
        runs: dict[int, list[dict]] = {L: [] for L in s.lengths}
        for rep in range(s.repeats):
            for L in s.lengths:
                runs[L].append(_hf_decode(built.hf, ids, L, device, cache, compile_config))
                done += 1
                progress.step(f"decode hf_compiled {L} tokens ({rep + 1}/{s.repeats})")
        column = _column(s.lengths, runs, floor_ms)
        column["compile"] = {"config": {k: str(v) for k, v in compile_config.to_dict().items()},
                             "static_cache_tokens": s.decode_prompt_tokens + max(s.lengths),
                             "warmup_s_including_compilation": warmup_s}
        return column
    except Exception as e:  # noqa: BLE001 - any failure of the compiled path is reported, never fatal
        progress.step("hf_compiled failed", planned - done)
        torch._dynamo.reset()
        free_memory(device)
        return unavailable(error_text(e))


# ---- the decode step at batch B -----------------------------------------------------------------------------------
def bench_batch(built: Built, s: BenchSettings, progress: Progress, floor_ms: float | None) -> dict:
    """Tandem's decode step at each batch size: B prompts of P random text ids (other ids per row), exactly
    batch_tokens greedy tokens each, decoded together by `Engine.generate_batch`."""
    engine = built.engine
    prompts = {B: [engine.prepare(None, text_ids(s.decode_prompt_tokens, s.seed + row)) for row in range(B)]
               for B in s.batch_sizes}
    params = forced_greedy(s.batch_tokens)

    def run(B: int) -> dict:
        outs = engine.generate_batch(prompts[B], params)
        return {"step_s": outs[0].timings.decode_s / (s.batch_tokens - 1),
                "tokens": sorted({len(o.token_ids) for o in outs})}

    for B in s.batch_sizes:
        run(B)
        progress.step(f"batch warm-up {B}")
    runs: dict[int, list[dict]] = {B: [] for B in s.batch_sizes}
    for rep in range(s.repeats):
        for B in s.batch_sizes:
            runs[B].append(run(B))
            progress.step(f"batch {B} x {s.batch_tokens} tokens ({rep + 1}/{s.repeats})")
    step_ms = [to_ms(median([r["step_s"] for r in runs[B]])) for B in s.batch_sizes]
    return {
        "prompt_tokens": s.decode_prompt_tokens, "output_tokens": s.batch_tokens, "batch_sizes": list(s.batch_sizes),
        "step_ms": step_ms, "ratio_to_floor": [v / floor_ms if floor_ms else None for v in step_ms],
        "tokens_per_s": [1000 * B / v for B, v in zip(s.batch_sizes, step_ms)],
        "tokens": [sorted({n for r in runs[B] for n in r["tokens"]}) for B in s.batch_sizes],
        "samples": {"step_ms": [[to_ms(r["step_s"]) for r in runs[B]] for B in s.batch_sizes]},
    }
