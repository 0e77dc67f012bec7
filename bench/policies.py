"""The policies part of `tandem bench`: every pair policy end to end with forced lengths, on its own large + small
pair, verify also with its two first stages one after the other, and large-reason drafted by the small model
(speculative decoding) and by the large model itself (every draft kept: the mechanism's cost ceiling)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

from tandem.bench.build import QUESTION, bench_image, build_models, free_memory
from tandem.bench.settings import BenchSettings
from tandem.bench.timing import Progress, median
from tandem.runtime.pipeline import POLICIES, Budget, Tandem

SEQUENTIAL_VERIFY = "verify (sequential)"  # verify with its two first stages one after the other: the overlap's gain
SPECULATIVE = "large-reason (speculative)"  # drafted by the small model, up to SPECULATIVE_K tokens at a time
SELF_DRAFT = "large-reason (self-draft)"  # drafted by the large model itself
SPECULATIVE_K = 4


def bench_policies(s: BenchSettings, files: Path, progress: Progress) -> dict:
    device, dtype = s.torch_device, s.torch_dtype
    large_name, small_name = s.pair
    side = -(-s.policy_image_size // 32) * 32
    kv_tokens = (side // 32) ** 2 + 2 * s.reason_tokens + 2 * s.short_tokens + 1024
    built = []
    for role, name, seed in (("large", large_name, s.seed + 1), ("small", small_name, s.seed + 2)):
        built.append(build_models(name, device, dtype, seed, files, kv_tokens, s.kernel_backend, keep_hf=False))
        progress.step(f"built {role} {name}")
    budget = Budget(short_tokens=s.short_tokens, reason_tokens=s.reason_tokens, temperature=0.0, ignore_eos=True)
    engine = built[0].engine
    pair = Tandem(engine, built[1].engine, budget=budget)
    drafted = replace(budget, speculative=SPECULATIVE_K)
    pairs = {SPECULATIVE: Tandem(engine, built[1].engine, budget=drafted),
             SELF_DRAFT: Tandem(engine, engine, budget=drafted)}
    overlap = pair.overlap  # the default where the run happens (two CUDA streams on a GPU)
    runs: dict[str, list[dict]] = {p: [] for p in (*POLICIES, SEQUENTIAL_VERIFY, SPECULATIVE, SELF_DRAFT)}
    for i in range(1 + s.repeats):
        for j, name in enumerate(runs):
            image = bench_image(s.policy_image_size, s.seed + 1000 * (i + 1) + j)  # new pixels: the vision cache misses
            pair.overlap = overlap and name != SEQUENTIAL_VERIFY
            start = engine.now()
            result = pairs.get(name, pair).answer(image, QUESTION, policy=name.split(" (")[0])
            total = engine.now() - start
            if i:
                runs[name].append(_policy_run(result, total, budget))
            progress.step(f"policy {name}" + ("" if i else " (warm-up)"))
    results = {p: _policy_summary(r) for p, r in runs.items()}
    del pair, pairs, built, engine
    free_memory(device)
    return {"large": large_name, "small": small_name, "budget": asdict(budget), "question": QUESTION,
            "image_size": [s.policy_image_size, s.policy_image_size], "verify_overlap": overlap, "results": results}


def _policy_run(result, total_s: float, budget: Budget) -> dict:
    stages = []
    for st in result.stages:
        expected = budget.reason_tokens if st.role == "reason" else budget.short_tokens
        stages.append({
            "model": st.model, "role": st.role, "input_tokens": st.input_tokens, "prefilled_tokens": st.prefilled_tokens,
            "output_tokens": len(st.output_ids), "expected_tokens": expected,
            "kept_tokens": None if st.kept_indices is None else len(st.kept_indices),
            # A stage that reused its model's prefix encoded nothing (None, not 0); one output token has no decode step.
            "vision_ms": None if st.vision_cache_hit is None else 1000 * st.timings.vision_s,
            "prefill_ms": 1000 * st.timings.prefill_s,
            "decode_ms": 1000 * st.timings.decode_s if len(st.output_ids) > 1 else None,
            "vision_cache_hit": st.vision_cache_hit,
            "drafted": st.timings.drafted, "accepted": st.timings.accepted,
            "verify_forwards": st.timings.verify_forwards,
        })
    branch = None
    if result.agreed is not None:
        branch = "agreed: no transfer stage" if result.agreed else "disagreed: transfer stage ran"
    verdict_ms = None if result.verdict_s is None else 1000 * result.verdict_s
    return {"total_ms": 1000 * total_s, "verdict_ms": verdict_ms, "branch": branch, "stages": stages}


def _policy_summary(runs: list[dict]) -> dict:
    """Medians over the runs. Stage medians are taken over the runs of the most frequent stage sequence (verify's
    branch depends on the random models' answers); `branches` counts every branch seen."""
    signature = lambda r: tuple((st["model"], st["role"]) for st in r["stages"])  # noqa: E731
    common, _ = Counter(signature(r) for r in runs).most_common(1)[0]
    same = [r for r in runs if signature(r) == common]
    stages = []
    for k, (model, role) in enumerate(common):
        rows = [r["stages"][k] for r in same]
        stage = {key: rows[0][key] for key in ("model", "role", "input_tokens", "prefilled_tokens", "expected_tokens")}
        stage["output_tokens"] = sorted({row["output_tokens"] for row in rows})
        for key in ("vision_ms", "prefill_ms", "decode_ms", "drafted", "accepted", "verify_forwards"):
            stage[key] = median([row[key] for row in rows])
        stages.append(stage)
    branches = Counter(r["branch"] for r in runs if r["branch"] is not None)
    return {"total_ms": median([r["total_ms"] for r in runs]), "total_samples_ms": [r["total_ms"] for r in runs],
            "verdict_ms": median([r.get("verdict_ms") for r in runs]), "branches": dict(branches),
            "stage_runs": len(same), "stages": stages, "runs": runs}
