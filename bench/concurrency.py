"""The concurrency part of `tandem bench`: C requests one at a time, then all at once on the same engine, whose
loop batches them as they arrive: the throughput continuous batching gains."""

from __future__ import annotations

from tandem.bench.build import Built, forced_greedy, text_ids
from tandem.bench.settings import BenchSettings
from tandem.bench.timing import Progress, median, to_ms

MODES = ("one_at_a_time", "concurrent")


def bench_concurrency(built: Built, s: BenchSettings, progress: Progress) -> dict:
    """For each level C: C requests of P random text ids (other ids per request), exactly concurrency_tokens greedy
    tokens each, run one at a time (each `generate` after the previous returned) and at once (every `submit` from
    this thread, then every `result()`); each run timed whole by the synchronised clock."""
    engine = built.engine
    params = forced_greedy(s.concurrency_tokens)
    prompts = {C: [text_ids(s.decode_prompt_tokens, s.seed + row) for row in range(C)] for C in s.concurrency}

    def run(mode: str, C: int) -> dict:
        steps = engine.stats.decode_steps
        start = engine.now()
        if mode == "one_at_a_time":
            outs = [engine.generate(prompt_token_ids=ids, sampling=params) for ids in prompts[C]]
        else:
            handles = [engine.submit(prompt_token_ids=ids, sampling=params) for ids in prompts[C]]
            outs = [h.result() for h in handles]
        elapsed = engine.now() - start
        # Every step of these requests was counted before its tokens were read, so before the last result().
        return {"seconds": elapsed, "decode_steps": engine.stats.decode_steps - steps,
                "tokens": sorted({len(o.token_ids) for o in outs})}

    # One request alone warms up every one-at-a-time run (all have its shapes); each level at once has its own
    # batch sizes to compile and capture.
    engine.generate(prompt_token_ids=text_ids(s.decode_prompt_tokens, s.seed), sampling=params)
    progress.step("concurrency warm-up, one request")
    for C in s.concurrency:
        run("concurrent", C)
        progress.step(f"concurrency warm-up, {C} at once")
    runs: dict[str, dict[int, list[dict]]] = {mode: {C: [] for C in s.concurrency} for mode in MODES}
    for rep in range(s.concurrency_repeats):
        for C in s.concurrency:
            for mode in MODES:
                runs[mode][C].append(run(mode, C))
                progress.step(f"concurrency {C} {mode.replace('_', ' ')} ({rep + 1}/{s.concurrency_repeats})")
    columns = {mode: _column(runs[mode], s.concurrency, s.concurrency_tokens) for mode in MODES}
    return {"prompt_tokens": s.decode_prompt_tokens, "output_tokens": s.concurrency_tokens,
            "levels": list(s.concurrency), "columns": columns,
            "ratio": [c / o for c, o in zip(columns["concurrent"]["tokens_per_s"],
                                            columns["one_at_a_time"]["tokens_per_s"])]}


def _column(runs: dict[int, list[dict]], levels: tuple[int, ...], tokens: int) -> dict:
    """Per level: the median run time, the output tokens per second it gives (C x tokens / time), the decode
    steps, every output length seen, and the raw samples."""
    ms = [to_ms(median([r["seconds"] for r in runs[C]])) for C in levels]
    return {
        "ms": ms, "tokens_per_s": [1000 * C * tokens / v for C, v in zip(levels, ms)],
        "decode_steps": [median([r["decode_steps"] for r in runs[C]]) for C in levels],
        "tokens": [sorted({n for r in runs[C] for n in r["tokens"]}) for C in levels],
        "samples": {"ms": [[to_ms(r["seconds"]) for r in runs[C]] for C in levels],
                    "decode_steps": [[r["decode_steps"] for r in runs[C]] for C in levels]},
    }
