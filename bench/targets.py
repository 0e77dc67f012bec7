"""The latency targets, read from one GPU run's bench JSONs: `python -m tandem.bench.targets OUTDIR`.

Reads OUTDIR/8b.json (`tandem bench --preset qwen3-vl-8b`: decode, batch, concurrency, vision, profile),
OUTDIR/2b.json (`--preset qwen3-vl-2b --parts decode,concurrency`) and OUTDIR/pair.json (`--parts policies`),
whichever exist; writes OUTDIR/targets.md and prints it. Each target gets the ratio reached and a verdict: met,
missed, pending (its JSON or part is not there yet) or unavailable (its part or column failed, with the reason).
A row with no goal is information (the throughput with concurrent requests): "measured" where its part ran. These
are benchmark figures: a missed target is reported, never raised.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FILES = {"8b": "8b.json", "2b": "2b.json", "pair": "pair.json"}
FIRST_TOKEN_IMAGE = 448  # the first-token target's square image side


class NotMeasured(Exception):
    """A target without a number: verdict "pending" (not measured yet) or "unavailable" (measuring failed)."""

    def __init__(self, verdict: str, why: str):
        super().__init__(why)
        self.verdict = verdict


@dataclass(frozen=True)
class Target:
    name: str
    goal: str | None  # None: a row of information, without a goal
    source: str  # a key of FILES
    reach: Callable[[dict], tuple[str, bool | None]]  # bench JSON -> (what was reached, whether the goal is met)


def _part(data: dict, name: str) -> dict:
    if name not in data:
        raise NotMeasured("pending", f"no {name} part in the run" + ("" if data.get("complete") else " (cut short)"))
    if "unavailable" in data[name]:
        raise NotMeasured("unavailable", f"{name}: {data[name]['unavailable']}")
    return data[name]


def _column(decode: dict, name: str) -> list[tuple[int, float]]:
    """(length, ms per token) of a decode column, the lengths without a per-token figure (L = 1) left out."""
    column = decode["columns"].get(name)
    if column is None:
        raise NotMeasured("pending", f"no {name} column")
    if "unavailable" in column:
        raise NotMeasured("unavailable", f"{name}: {column['unavailable']}")
    points = [(L, v) for L, v in zip(decode["lengths"], column["per_token_ms"]) if v is not None]
    if not points:
        raise NotMeasured("pending", f"no per-token figure in the {name} column (lengths {decode['lengths']})")
    return points


def over_floor(limit: float) -> Callable[[dict], tuple[str, bool]]:
    """Tandem's decode ms per token / the floor at each length; the goal holds at every length."""

    def reach(data: dict) -> tuple[str, bool]:
        floor = _part(data, "floor")["ms_per_token"]
        ratios = [(L, v / floor) for L, v in _column(_part(data, "decode"), "tandem")]
        return ", ".join(f"L={L}: {r:.3f}x" for L, r in ratios), max(r for _, r in ratios) <= limit

    return reach


def speedup(minimum: float) -> Callable[[dict], tuple[str, bool]]:
    """transformers eager ms per token / Tandem's at each length; the goal holds at every length."""

    def reach(data: dict) -> tuple[str, bool]:
        decode = _part(data, "decode")
        ours = dict(_column(decode, "tandem"))
        ratios = [(L, v / ours[L]) for L, v in _column(decode, "hf_eager") if L in ours]
        return ", ".join(f"L={L}: {r:.2f}x" for L, r in ratios), min(r for _, r in ratios) >= minimum

    return reach


def first_token(limit_ms: float) -> Callable[[dict], tuple[str, bool]]:
    """Tandem's first token of a one-image request (the whole call) at FIRST_TOKEN_IMAGE pixels a side."""

    def reach(data: dict) -> tuple[str, bool]:
        vision = _part(data, "vision")
        if FIRST_TOKEN_IMAGE not in vision["sizes"]:
            raise NotMeasured("pending", f"no {FIRST_TOKEN_IMAGE}x{FIRST_TOKEN_IMAGE} image among {vision['sizes']}")
        ms = vision["columns"]["tandem"]["first_token_ms"][vision["sizes"].index(FIRST_TOKEN_IMAGE)]
        return f"{ms:.2f} ms", ms < limit_ms

    return reach


def verify_cost(limit: float) -> Callable[[dict], tuple[str, bool]]:
    """verify's verdict time (its whole cost when the answers agree) / small-reason's total time."""

    def reach(data: dict) -> tuple[str, bool]:
        results = _part(data, "policies")["results"]
        verdict, small = results["verify"]["verdict_ms"], results["small-reason"]["total_ms"]
        ratio = verdict / small
        text = f"{ratio:.3f}x ({verdict:.1f} ms / {small:.1f} ms)"
        sequential = results.get("verify (sequential)", {}).get("verdict_ms")
        if sequential is not None:
            text += f"; stages one after the other: {sequential / small:.3f}x"
        return text, ratio <= limit

    return reach


def steps_past_stop(limit: int) -> Callable[[dict], tuple[str, bool]]:
    """Decode steps the engine ran after the one that sampled a stop token (the decode part's stop check)."""

    def reach(data: dict) -> tuple[str, bool]:
        stop = _part(data, "decode").get("stop")
        if stop is None:
            raise NotMeasured("pending", "no stop check in the decode part")
        return (f"{stop['steps_past_stop']} ({stop['output_tokens']} tokens out, {stop['decode_steps']} decode steps)",
                stop["steps_past_stop"] <= limit)

    return reach


def concurrent_throughput(data: dict) -> tuple[str, None]:
    """Output tokens/s with C requests submitted at once, and its ratio to the same C requests one at a time."""
    c = _part(data, "concurrency")
    rates = zip(c["levels"], c["columns"]["concurrent"]["tokens_per_s"], c["ratio"])
    return ", ".join(f"C={C}: {r:.0f} tok/s ({x:.2f}x one at a time)" for C, r, x in rates), None


TARGETS = [
    Target("8B decode per token / floor", "<= 1.15x", "8b", over_floor(1.15)),
    Target("2B decode per token / floor", "<= 1.5x", "2b", over_floor(1.5)),
    Target("8B speed-up per token over transformers eager", ">= 4x", "8b", speedup(4.0)),
    Target("2B speed-up per token over transformers eager", ">= 10x", "2b", speedup(10.0)),
    Target(f"8B first token, one {FIRST_TOKEN_IMAGE}x{FIRST_TOKEN_IMAGE} image", "< 30 ms", "8b", first_token(30.0)),
    Target("verify verdict / small-reason total (8B + 2B)", "<= 1.10x", "pair", verify_cost(1.10)),
    Target("8B decode steps run past a stop", "<= 1", "8b", steps_past_stop(1)),
    Target("2B decode steps run past a stop", "<= 1", "2b", steps_past_stop(1)),
    Target("8B output tokens/s, C requests at once", None, "8b", concurrent_throughput),
    Target("2B output tokens/s, C requests at once", None, "2b", concurrent_throughput),
]


def evaluate(results: dict[str, dict | None]) -> list[tuple[Target, str, str]]:
    """(target, reached, verdict) for every target, from the bench JSONs by FILES key (None: not there)."""
    rows = []
    for target in TARGETS:
        data = results.get(target.source)
        if data is None:
            rows.append((target, f"no {FILES[target.source]}", "pending"))
            continue
        try:
            reached, met = target.reach(data)
        except NotMeasured as e:
            rows.append((target, str(e), e.verdict))
        else:
            rows.append((target, reached, "measured" if met is None else "met" if met else "missed"))
    return rows


def format_table(results: dict[str, dict | None]) -> str:
    lines = ["| target | goal | reached | verdict |", "|---|---|---|---|"]
    for target, reached, verdict in evaluate(results):
        lines.append(f"| {target.name} | {target.goal or '-'} | {reached.replace('|', '/')} | {verdict} |")
    lines.append("")
    for key, name in FILES.items():
        data = results.get(key)
        if data is None:
            lines.append(f"- {name}: not there")
            continue
        m = data["machine"]
        lines.append(f"- {name}: {m['device_name']}, {data['dtype']}, torch {m['torch']}, triton {m['triton']}, "
                     f"transformers {m['transformers']}, {data['date']}"
                     + ("" if data["complete"] else ", INCOMPLETE (the run stopped early)")
                     + f"; `{data['command']}`")
    return "\n".join(lines)


def load(folder: Path) -> dict[str, dict | None]:
    """Each of FILES in folder, parsed, or None where it is absent."""
    return {key: json.loads((folder / name).read_text()) if (folder / name).is_file() else None
            for key, name in FILES.items()}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tandem.bench.targets OUTDIR", file=sys.stderr)
        return 2
    folder = Path(args[0])
    title = "# Latency targets (batch 1), and the throughput with concurrent requests"
    table = f"{title}\n\n{format_table(load(folder))}\n"
    (folder / "targets.md").write_text(table, encoding="utf-8")
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
