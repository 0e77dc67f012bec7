"""The evaluation's report: per policy, accuracy with a bootstrap interval, output tokens, latency, and what
verify and transfer did; written as JSON, a summary table and two plots (the paper's Figure 1 (b-d) view).

A record is one sample answered under one policy (a line of samples.jsonl): its score, its latency, and its
stages with their output tokens (and ids, where known). Everything in the report is computed from the records
alone. Accuracy is over questions: MMBench's rotations of one question (a record's `group`) count once, right only
when all are (its CircularEval); the per-row accuracy is given beside it. Latency and tokens average the answered
records (a failed one has neither; failures are counted). A yes/no benchmark also gets POPE's precision, recall,
F1 and yes-ratio.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
PLOTS = {"accuracy_latency.png": ("latency_s", "mean", "mean latency per request (s)"),
         "accuracy_tokens.png": ("output_tokens", "mean", "mean output tokens per request (all stages)")}


def summarize(records: list[dict], policies: list[str], seed: int = 0) -> dict:
    """{policy: figures} for each policy that has records, in the order given."""
    return {policy: _figures([r for r in records if r["policy"] == policy], seed)
            for policy in policies if any(r["policy"] == policy for r in records)}


def _figures(records: list[dict], seed: int) -> dict:
    answered = [r for r in records if not r.get("error")]  # a failure has no latency or tokens to average
    latencies = sorted(r["latency_s"] for r in answered) or [float("nan")]
    stage_keys = sorted({_stage_key(s) for r in answered for s in r["stages"]})
    tokens = [sum(s["output_tokens"] for s in r["stages"]) for r in answered] or [float("nan")]
    groups = _grouped_scores(records)
    figures = {
        "samples": len(records),
        "errors": len(records) - len(answered),
        "accuracy": float(np.mean(groups)),
        "accuracy_ci95": bootstrap_interval(np.array(groups), seed),
        "output_tokens": {
            "mean": statistics.fmean(tokens),
            # per stage, averaged over every answered request (0 where the stage did not run): they add up to the mean
            "by_stage": {key: statistics.fmean(sum(s["output_tokens"] for s in r["stages"] if _stage_key(s) == key)
                                               for r in answered) for key in stage_keys},
        },
        "latency_s": {"mean": statistics.fmean(latencies), "p50": _quantile(latencies, 0.5),
                      "p90": _quantile(latencies, 0.9)},
        "by_category": _by_category(records),
    }
    if len(groups) < len(records):  # MMBench's CircularEval: a question is right when all its rotations are
        figures["questions"] = len(groups)
        figures["accuracy_rows"] = statistics.fmean(r["score"] for r in records)
    yesno = [r for r in records if r.get("scorer") == "yesno" and not r.get("error")]
    if yesno:
        figures["pope"] = pope_figures(yesno)
    verdicts = [r for r in answered if r.get("agreed") is not None]
    if verdicts:
        agreed = [r["score"] for r in verdicts if r["agreed"]]
        disagreed = [r["score"] for r in verdicts if not r["agreed"]]
        figures["verify"] = {"agreed_share": len(agreed) / len(verdicts),
                             "accuracy_when_agreed": statistics.fmean(agreed) if agreed else None,
                             "accuracy_when_not": statistics.fmean(disagreed) if disagreed else None}
    kept = [s["kept_fraction"] for r in answered for s in r["stages"] if s.get("kept_fraction") is not None]
    if kept:
        figures["kept_fraction_mean"] = statistics.fmean(kept)
    return figures


def _grouped_scores(records: list[dict]) -> list[float]:
    """One score per question: a record's own, or for a group (MMBench's rotations of one question) the lowest of
    its records' (1 only when every rotation is right). The bootstrap resamples questions."""
    by_group: dict[str, list[float]] = {}
    for r in records:
        by_group.setdefault(r.get("group") or f"id:{r['id']}", []).append(r["score"])
    return [min(scores) for scores in by_group.values()]


def pope_figures(records: list[dict]) -> dict:
    """POPE's figures, "yes" the positive class: precision, recall, F1 and the share of "yes" answers."""
    from tandem.bench.eval.scoring import yes_or_no

    said = [yes_or_no(r["prediction"]) == "yes" for r in records]
    truth = [r["answers"][0].strip().lower() == "yes" for r in records]
    hits = sum(s and t for s, t in zip(said, truth))
    precision = hits / sum(said) if any(said) else 0.0
    recall = hits / sum(truth) if any(truth) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "yes_ratio": sum(said) / len(said)}


def bootstrap_interval(scores: np.ndarray, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> list[float]:
    """The 95% percentile bootstrap interval of the mean score: samples drawn with replacement, `resamples` times."""
    if len(scores) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, len(scores), (resamples, len(scores)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def _quantile(ordered: list[float], q: float) -> float:
    return float(np.quantile(np.array(ordered), q))


def _stage_key(stage: dict) -> str:
    return f"{stage['model']}-{stage['role']}"


def _by_category(records: list[dict]) -> dict[str, float]:
    categories = sorted({r["category"] for r in records if r.get("category")})
    return {c: statistics.fmean(r["score"] for r in records if r.get("category") == c) for c in categories}


# ---- writing -----------------------------------------------------------------------------------------------------
def write_report(out: Path, report: dict) -> None:
    """report.json, summary.txt and the two plots under `out`."""
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "summary.txt").write_text(summary_table(report) + "\n")
    _plots(out, report)


def summary_table(report: dict) -> str:
    run = report["run"]
    lines = [f"{run['data']} ({run['samples']} samples, scorer {run['scorer']}) by {run['answerer']}",
             f"{'policy':14} {'n':>5} {'err':>4} {'accuracy [95% CI]':>22} {'tokens':>8} {'latency s: mean':>16} "
             f"{'p50':>7} {'p90':>7}  notes"]
    for policy, f in report["policies"].items():
        low, high = f["accuracy_ci95"]
        notes = []
        if "verify" in f:
            notes.append(f"agreed {100 * f['verify']['agreed_share']:.0f}%")
        if "kept_fraction_mean" in f:
            notes.append(f"kept {100 * f['kept_fraction_mean']:.0f}%")
        if "pope" in f:
            notes.append(f"F1 {100 * f['pope']['f1']:.1f}, yes {100 * f['pope']['yes_ratio']:.0f}%")
        if "questions" in f:
            notes.append(f"circular over {f['questions']} questions (rows {100 * f['accuracy_rows']:.1f}%)")
        lat = f["latency_s"]
        lines.append(f"{policy:14} {f['samples']:>5} {f['errors']:>4} "
                     f"{100 * f['accuracy']:>8.1f}% [{100 * low:5.1f}, {100 * high:5.1f}] "
                     f"{f['output_tokens']['mean']:>8.1f} {lat['mean']:>16.3f} {lat['p50']:>7.3f} {lat['p90']:>7.3f}  "
                     + ", ".join(notes))
    return "\n".join(lines)


def _plots(out: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = report["policies"]
    for name, (field, stat, label) in PLOTS.items():
        figure, axes = plt.subplots(figsize=(5.5, 4))
        for policy, f in policies.items():
            x, y = f[field][stat], 100 * f["accuracy"]
            low, high = (100 * v for v in f["accuracy_ci95"])
            axes.errorbar([x], [y], yerr=[[y - low], [high - y]], fmt="o", capsize=3)
            axes.annotate(policy, (x, y), textcoords="offset points", xytext=(6, 4))
        axes.set_xlabel(label)
        axes.set_ylabel("accuracy (%), 95% bootstrap interval")
        axes.set_title(f"{report['run']['data']}: one point per policy", fontsize=10)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / name, dpi=120)
        plt.close(figure)
