"""`tandem eval`'s report from hand-made records, each figure worked out by hand: MMBench's CircularEval grouping,
POPE's precision / recall / F1, failures counted but kept out of the latency and token means, the bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.bench.eval.report import bootstrap_interval, summarize


def record(id_, score, latency=1.0, tokens=4, group="", scorer="exact", prediction="", answers=("x",), error=None):
    stages = [] if error else [{"model": "large", "role": "answer", "output_tokens": tokens, "kept_fraction": None}]
    return {"id": id_, "policy": "large", "score": score, "latency_s": 0.0 if error else latency, "stages": stages,
            "group": group, "scorer": scorer, "prediction": prediction, "answers": list(answers), "error": error}


def test_rotations_of_one_question_count_once_and_only_when_all_are_right():
    rows = [record("0", 1.0, group="0"), record("1000000", 0.0, group="0"),  # question 0: one rotation wrong
            record("1", 1.0, group="1"), record("1000001", 1.0, group="1"), record("2", 1.0, group="2")]
    f = summarize(rows, ["large"])["large"]
    assert f["accuracy"] == pytest.approx(2 / 3) and f["questions"] == 3 and f["accuracy_rows"] == pytest.approx(0.8)


def test_failures_are_counted_and_kept_out_of_latency_and_tokens():
    rows = [record("a", 1.0, latency=2.0, tokens=10), record("b", 0.0, error="too large")]
    f = summarize(rows, ["large"])["large"]
    assert f["samples"] == 2 and f["errors"] == 1 and f["accuracy"] == 0.5
    assert f["latency_s"]["mean"] == 2.0 and f["output_tokens"]["mean"] == 10
    assert f["output_tokens"]["by_stage"] == {"large-answer": 10}


def test_pope_precision_recall_f1_and_yes_ratio():
    said_truth = [("Yes.", "yes"), ("Yes", "yes"), ("No", "yes"), ("Yes, there is.", "no"), ("No.", "no")]
    rows = [record(str(i), float(p.lower().startswith(t)), scorer="yesno", prediction=p, answers=(t,))
            for i, (p, t) in enumerate(said_truth)]
    pope = summarize(rows, ["large"])["large"]["pope"]
    # yes said 3 times, 2 of them right; 3 yes labels: precision 2/3, recall 2/3, F1 2/3, yes-ratio 3/5
    assert pope == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.6})


def test_the_bootstrap_interval_brackets_the_mean_and_narrows_with_more_samples():
    rng = np.random.default_rng(1)
    small, large = rng.integers(0, 2, 40).astype(float), rng.integers(0, 2, 4000).astype(float)
    for scores in (small, large):
        low, high = bootstrap_interval(scores)
        assert low <= scores.mean() <= high
    assert np.diff(bootstrap_interval(large))[0] < np.diff(bootstrap_interval(small))[0] / 5  # ~1/sqrt(100)
    assert bootstrap_interval(np.ones(30)) == [1.0, 1.0]
