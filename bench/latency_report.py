"""The outputs of `tandem bench` (tandem.bench.latency): bench.json, summary.txt and latency.png.

The plot is drawn with matplotlib (the bench extra).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

COLUMNS = {"tandem": "Tandem", "hf_eager": "HF eager", "hf_compiled": "HF static+compile"}
PROFILE_ROWS = 15  # rows of each profile the summary prints (bench.json keeps them all)


# ---- outputs -----------------------------------------------------------------------------------------------------
def write_outputs(result: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _replace(out_dir / "bench.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    _replace(out_dir / "summary.txt", format_summary(result) + "\n")
    if "decode" in result and "unavailable" not in result["decode"]:
        plot_latency(result, out_dir / "latency.png")


def _replace(path: Path, text: str) -> None:
    """Write whole or not at all: a run killed mid-write leaves the previous part's file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _where(result: dict) -> str:
    m = result["machine"]
    return f"{m['device']} ({m['device_name']}), {result['dtype']}"


def _f(value: float | None, width: int, digits: int = 2) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def format_summary(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        f"Tandem latency benchmark on {_where(result)}; random weights, identical for every column"
        + ("" if result["complete"] else "  [INCOMPLETE: the run stopped early]"),
        f"torch {m['torch']} | triton {m['triton']} | transformers {m['transformers']}"
        + (f" | CUDA {m['cuda']} | driver {m['driver']}" if m["device"] == "cuda" else f" | {m['cpu_count']} CPUs")
        + f" | {result['date']}",
        f"command: {result['command']}",
        f"median of {s['repeats']} timed run(s) after an untimed warm-up; device synchronised around every timed region;"
        f" kernels: {result['kernels']['ops']}",
    ]
    if "model" in result:
        mod = result["model"]
        lines.append(f"model: {mod['preset']}, {mod['parameters'] / 1e9:.3f} B parameters, "
                     f"{mod['weight_bytes'] / 1e9:.3f} GB of weights ({mod['decode_weight_bytes'] / 1e9:.3f} GB read per decode step)")
    if "floor" in result:
        f = result["floor"]
        lines.append(f"floor: {f['decode_weight_bytes'] / 1e9:.3f} GB / {f['bandwidth_gb_s']:.1f} GB/s copy bandwidth "
                     f"(median of {len(f['copy_samples_ms'])} copies of {f['copy_bytes'] / 2**20:.0f} MiB) = "
                     f"{f['ms_per_token']:.4f} ms per token")
    tables = {"decode": _decode_table, "batch": _batch_table, "concurrency": _concurrency_table,
              "prefill": _prefill_table, "vision": _vision_table, "check": _check_table, "profile": _profile_tables,
              "policies": _policy_table}
    for part, table in tables.items():
        if part in result:
            failed = result[part].get("unavailable")
            lines += ["", *([f"{part}: unavailable: {failed}"] if failed else table(result))]
    return "\n".join(lines)


def _prefill_table(result: dict) -> list[str]:
    p = result["prefill"]
    lines = [f"Prefill ms, random text prompt, on {_where(result)}",
             f"{'tokens':>7} | {'Tandem':>10} | {'HF eager':>10} | {'Tandem tok/s':>12}"]
    hf = p["columns"]["hf_eager"]
    for i, n in enumerate(p["prompt_tokens"]):
        lines.append(f"{n:>7} | {_f(p['columns']['tandem']['ms'][i], 10)} | "
                     f"{_f(None if 'unavailable' in hf else hf['ms'][i], 10)} | "
                     f"{p['columns']['tandem']['tokens_per_s'][i]:>12.0f}")
    return lines + _unavailable_notes(p["columns"])


def _vision_table(result: dict) -> list[str]:
    v = result["vision"]
    lines = [f"Vision encoder ms, one square image (Tandem's preprocessing timed apart; first token: the whole "
             f"request with a one-line question, max_tokens=1), on {_where(result)}",
             f"{'image':>6} | {'resized':>9} | {'patches':>7} | {'tokens':>6} | {'preprocess':>10} | "
             f"{'Tandem':>9} | {'HF eager':>9} | {'first token':>11}"]
    hf, tandem = v["columns"]["hf_eager"], v["columns"]["tandem"]
    for i, size in enumerate(v["sizes"]):
        h, w = v["resized"][i]
        lines.append(f"{size:>6} | {f'{h}x{w}':>9} | {v['patches'][i]:>7} | {v['image_tokens'][i]:>6} | "
                     f"{_f(tandem['preprocess_ms'][i], 10)} | {_f(tandem['ms'][i], 9)} | "
                     f"{_f(None if 'unavailable' in hf else hf['ms'][i], 9)} | {_f(tandem['first_token_ms'][i], 11)}")
    return lines + _unavailable_notes(v["columns"])


def _check_table(result: dict) -> list[str]:
    c = result["check"]
    rows = "decode rows, replayed as CUDA graphs" if c["graphs"] else "decode rows, eager"
    if c["failed_captures"]:
        rows += f" ({len(c['failed_captures'])} chunk shapes failed to capture and ran eagerly)"
    default = c["default_chunk_rows"]
    runs = f"chunks of at most {default} tokens as rows" if default else "every chunk as a prefill"
    lines = [f"Speculation check: submit_verify of n tokens after L, ms, as {rows} vs as a prefill (the runner "
             f"runs {runs} by default), on {_where(result)}",
             f"{'L':>6} | {'n':>3} | {'rows':>9} | {'prefill':>9} | {'ratio':>6}"]
    for i, length in enumerate(c["contexts"]):
        for j, n in enumerate(c["tokens"]):
            lines.append(f"{length:>6} | {n:>3} | {_f(c['columns']['rows']['ms'][i][j], 9, 3)} | "
                         f"{_f(c['columns']['prefill']['ms'][i][j], 9, 3)} | {c['ratio'][i][j]:>5.2f}x")
    return lines


def _decode_table(result: dict) -> list[str]:
    d, floor = result["decode"], result["floor"]["ms_per_token"]
    cols = {k: c for k, c in d["columns"].items() if "unavailable" not in c}
    lines = [f"Decode ms per output token [x floor], prompt {d['prompt_tokens']} tokens, greedy, exactly L tokens, "
             f"on {_where(result)}",
             f"{'L':>5} | " + " | ".join(f"{COLUMNS[k]:>18}" for k in cols) + f" | {'floor':>8}"]
    for i, L in enumerate(d["lengths"]):
        cells = []
        for c in cols.values():
            v, r = c["per_token_ms"][i], c["ratio_to_floor"][i]
            cells.append(f"{'-':>18}" if v is None else f"{v:>9.3f} [{r:>6.1f}x]")
        lines.append(f"{L:>5} | " + " | ".join(cells) + f" | {floor:>8.4f}")
    lines += ["", f"Decode total ms per request (prefill + L tokens), on {_where(result)}",
              f"{'L':>5} | " + " | ".join(f"{COLUMNS[k]:>18}" for k in cols)]
    for i, L in enumerate(d["lengths"]):
        lines.append(f"{L:>5} | " + " | ".join(_f(c["total_ms"][i], 18) for c in cols.values()))
    if "stop" in d:
        st = d["stop"]
        lines += ["", f"Steps past a stop, Tandem: id {st['stop_token_id']} (token {st['stop_position']} of a "
                      f"{st['max_tokens']}-token greedy reply) as a stop id: {st['output_tokens']} tokens out (expected "
                      f"{st['expected_tokens']}, {st['finish_reason']}), {st['decode_steps']} decode steps run = "
                      f"{st['steps_past_stop']} past the stop"]
    return lines + _unavailable_notes(d["columns"])


def _batch_table(result: dict) -> list[str]:
    b, floor = result["batch"], result.get("floor", {}).get("ms_per_token")
    lines = [f"Decode ms per step, Tandem, one token for each of B sequences (prompt {b['prompt_tokens']} tokens, "
             f"{b['output_tokens']} tokens each, greedy), on {_where(result)}",
             f"{'B':>3} | {'ms/step':>9} | {'x floor':>7} | {'tokens/s':>9}"]
    for B, ms, ratio, rate in zip(b["batch_sizes"], b["step_ms"], b["ratio_to_floor"], b["tokens_per_s"]):
        lines.append(f"{B:>3} | {ms:>9.3f} | {_f(ratio, 7, 1)} | {rate:>9.1f}")
    return lines + ([f"floor: {floor:.4f} ms per step"] if floor else [])


def _concurrency_table(result: dict) -> list[str]:
    c = result["concurrency"]
    one, at_once = c["columns"]["one_at_a_time"], c["columns"]["concurrent"]
    lines = [f"Concurrent requests, Tandem: C requests (prompt {c['prompt_tokens']} tokens, {c['output_tokens']} "
             f"tokens each, greedy) one at a time vs submitted at once, output tokens/s, on {_where(result)}",
             f"{'C':>4} | {'one at a time':>13} | {'at once':>9} | {'ratio':>6} | "
             "decode steps (at once / one at a time)"]
    for i, C in enumerate(c["levels"]):
        lines.append(f"{C:>4} | {one['tokens_per_s'][i]:>13.1f} | {at_once['tokens_per_s'][i]:>9.1f} | "
                     f"{c['ratio'][i]:>5.2f}x | {at_once['decode_steps'][i]:g} / {one['decode_steps'][i]:g}")
    return lines


def _profile_tables(result: dict) -> list[str]:
    p = result["profile"]
    what = "kernel" if result["machine"]["device"] == "cuda" else "operator (self time)"
    lines = [f"Profile (torch.profiler; wall includes its overhead), decode at batch 1, prompt {p['prompt_tokens']} "
             f"tokens, on {_where(result)}"]
    for name, d in p["decode"].items():
        lines += [f"  {name}: {d['steps']} steps, wall {d['wall_ms_per_step']:.3f} ms/step, "
                  f"busy {d['busy_ms_per_step']:.3f} ms/step", *_profile_rows(d["rows"], "step", what)]
    f = p["first_token"]
    h, w = p["image_size"]
    lines += [f"  first token, one {h}x{w} image ({f['image_tokens']} image tokens of {f['prompt_tokens']}) + a "
              f"question: wall {f['wall_ms']:.2f} ms = prepare {f['prepare_ms']:.2f} (template, tokens, image decoding) "
              f"+ vision {f['vision_ms']:.2f} (preprocessing and encoder) + prefill {f['prefill_ms']:.2f} + the rest "
              f"(queue, first sample, readout); busy {f['busy_ms']:.2f} ms", *_profile_rows(f["rows"], "request", what)]
    return lines


def _profile_rows(rows: list[dict], per: str, what: str) -> list[str]:
    lines = [f"    {'ms/' + per:>11} | {'calls':>7} | {'share':>5} | {what}"]
    for r in rows[:PROFILE_ROWS]:
        name = r["name"] if len(r["name"]) <= 100 else r["name"][:97] + "..."
        lines.append(f"    {r['ms']:>11.4f} | {r['calls']:>7.1f} | {100 * r['share']:>4.0f}% | {name}")
    return lines


def _unavailable_notes(columns: dict) -> list[str]:
    return [f"{COLUMNS[k]}: unavailable: {c['unavailable'].removeprefix('unavailable: ')}"
            for k, c in columns.items() if "unavailable" in c]


def _policy_table(result: dict) -> list[str]:
    p = result["policies"]
    b = p["budget"]
    h, w = p["image_size"]
    lines = [f"Policies: large {p['large']} + small {p['small']}, forced lengths (answer {b['short_tokens']}, "
             f"reasoning {b['reason_tokens']} tokens), one {h}x{w} image, new pixels every run, on {_where(result)}",
             f"{'policy':>12} | {'total ms':>10} | stages: model role output tokens (vision / prefill / decode ms)"]
    for name, r in p["results"].items():
        ms = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        stages = "; ".join(f"{st['model']} {st['role']} {'/'.join(map(str, st['output_tokens']))} "
                           f"({ms(st['vision_ms'])} / {ms(st['prefill_ms'])} / {ms(st['decode_ms'])})" + _drafts(st)
                           for st in r["stages"])
        lines.append(f"{name:>12} | {_f(r['total_ms'], 10, 1)} | {stages}")
        if r["branches"]:
            lines.append(f"{'':>12} | {'':>10} | branch: " + ", ".join(f"{k} ({n} of {len(r['runs'])} runs)"
                                                                      for k, n in r["branches"].items()))
    verify, sequential, small = (p["results"].get(k) for k in ("verify", "verify (sequential)", "small-reason"))
    if verify and verify["verdict_ms"] and small:
        lines.append(f"verify verdict (its whole cost when the answers agree): {verify['verdict_ms']:.1f} ms = "
                     f"{verify['verdict_ms'] / small['total_ms']:.3f} x small-reason's {small['total_ms']:.1f} ms")
    if verify and sequential and verify["verdict_ms"] and sequential["verdict_ms"]:
        how = "each model's engine loop at once" if p["verify_overlap"] else "overlap off"
        lines.append(f"verify's first two stages at once ({how}): verdict {verify['verdict_ms']:.1f} ms vs "
                     f"{sequential['verdict_ms']:.1f} ms one after the other")
    return lines


def _drafts(stage: dict) -> str:
    """A drafted stage's median drafts kept, and tokens per target forward; nothing for a plain stage."""
    if not stage.get("verify_forwards"):
        return ""
    tokens = stage["accepted"] + stage["verify_forwards"]
    return (f" [drafts kept {stage['accepted']:.0f} of {stage['drafted']:.0f}, "
            f"{tokens / stage['verify_forwards']:.2f} tokens per large forward]")


# ---- the plot ----------------------------------------------------------------------------------------------------
SERIES_COLORS = {"tandem": (31, 119, 180), "hf_eager": (214, 39, 40), "hf_compiled": (44, 160, 44),
                 "floor": (90, 90, 90)}


def _plot_series(result: dict) -> list[tuple[str, list[float], list[float], tuple[int, int, int], bool]]:
    """(label, xs, ys, color, dashed) of every per-token curve with a number, and the floor."""
    d = result["decode"]
    series = []
    for key, column in d["columns"].items():
        if "unavailable" in column:
            continue
        points = [(L, v) for L, v in zip(d["lengths"], column["per_token_ms"]) if v is not None]
        if points:
            series.append((COLUMNS[key], [x for x, _ in points], [y for _, y in points], SERIES_COLORS[key], False))
    xs = [L for L in d["lengths"] if L > 1] or d["lengths"]
    floor = result["floor"]["ms_per_token"]
    series.append((f"floor (weights / copy bandwidth) {floor:.3g} ms", [min(xs), max(xs)], [floor, floor],
                   SERIES_COLORS["floor"], True))
    return series


def plot_latency(result: dict, path: Path) -> None:
    """latency.png: per-token decode latency vs output length (log x), with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _plot_series(result)
    fig, ax = plt.subplots(figsize=(10, 6.4), dpi=100)
    for label, xs, ys, color, dashed in series:
        ax.plot(xs, ys, "--" if dashed else "-o", color=[c / 255 for c in color], label=label)
    ax.set_xscale("log", base=2)
    ticks = sorted({x for _, xs, _, _, dashed in series if not dashed for x in xs}) or series[-1][1]
    ax.set_xticks(ticks, [str(x) for x in ticks])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("output length L (tokens)")
    ax.set_ylabel("ms per output token")
    ax.set_title(f"Decode latency per token: {result['model']['preset']} (random weights), {_where(result)}",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
