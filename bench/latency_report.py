"""The outputs of `tandem bench` (tandem.bench.latency): bench.json, summary.txt and latency.png.

The plot uses matplotlib when it is installed and otherwise draws with PIL, so the PNG always exists.
"""

from __future__ import annotations

import json
import math
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
    tables = {"decode": _decode_table, "batch": _batch_table, "prefill": _prefill_table, "vision": _vision_table,
              "profile": _profile_tables, "policies": _policy_table}
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
                           f"({ms(st['vision_ms'])} / {ms(st['prefill_ms'])} / {ms(st['decode_ms'])})"
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


def plot_latency(result: dict, path: Path, backend: str = "auto") -> str:
    """latency.png: per-token decode latency vs output length (log x). matplotlib where importable, else PIL.
    Returns the backend used."""
    title = (f"Decode latency per token: {result['model']['preset']} (random weights), {_where(result)}")
    series = _plot_series(result)
    if backend in ("auto", "matplotlib"):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if backend == "matplotlib":
                raise
        else:
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
            ax.set_title(title, fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(path)
            plt.close(fig)
            return "matplotlib"
    _pil_plot(path, title, "output length L (tokens), log scale", "ms per output token", series)
    return "pil"


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _pil_plot(path: Path, title: str, xlabel: str, ylabel: str, series: list, size: tuple[int, int] = (1000, 640)) -> None:
    """A line chart with PIL alone: log2 x axis, linear y axis from 0, grid, ticks, labels and a legend."""
    from PIL import Image, ImageDraw, ImageFont

    def font(px):
        try:
            return ImageFont.load_default(size=px)
        except TypeError:  # Pillow < 10.1: one bitmap size
            return ImageFont.load_default()

    small, big = font(13), font(15)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, top, right, bottom = 80, 50, size[0] - 30, size[1] - 70
    xs_all = [x for _, xs, _, _, _ in series for x in xs]
    x_lo, x_hi = math.log2(min(xs_all)), math.log2(max(xs_all))
    if x_hi - x_lo < 1:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    y_max = max(y for _, _, ys, _, _ in series for y in ys) * 1.1 or 1.0
    step = _nice_step(y_max)
    y_max = math.ceil(y_max / step) * step
    px = lambda x: left + (math.log2(x) - x_lo) / (x_hi - x_lo) * (right - left)  # noqa: E731
    py = lambda y: bottom - y / y_max * (bottom - top)  # noqa: E731
    for i in range(int(round(y_max / step)) + 1):
        y = i * step
        d.line([(left, py(y)), (right, py(y))], fill=(228, 228, 228))
        label = f"{y:g}"
        d.text((left - 8 - d.textlength(label, font=small), py(y) - 7), label, fill="black", font=small)
    for e in range(math.ceil(x_lo), math.floor(x_hi) + 1):
        x = px(2**e)
        d.line([(x, top), (x, bottom)], fill=(228, 228, 228))
        label = str(2**e)
        d.text((x - d.textlength(label, font=small) / 2, bottom + 6), label, fill="black", font=small)
    d.rectangle([left, top, right, bottom], outline="black")
    for label, xs, ys, color, dashed in series:
        points = [(px(x), py(y)) for x, y in zip(xs, ys)]
        if dashed:
            (x0, y0), (x1, _) = points[0], points[-1]
            for x in range(int(x0), int(x1), 14):
                d.line([(x, y0), (min(x + 8, x1), y0)], fill=color, width=2)
        else:
            if len(points) > 1:
                d.line(points, fill=color, width=2)
            for x, y in points:
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
    legend_w = max(d.textlength(label, font=small) for label, *_ in series) + 50
    lx, ly = left + 12, top + 12
    d.rectangle([lx, ly, lx + legend_w, ly + 8 + 20 * len(series)], fill="white", outline=(160, 160, 160))
    for i, (label, _, _, color, dashed) in enumerate(series):
        y = ly + 14 + 20 * i
        for x in range(lx + 8, lx + 34, 10 if dashed else 26):
            d.line([(x, y), (min(x + (6 if dashed else 26), lx + 34), y)], fill=color, width=2)
        d.text((lx + 42, y - 7), label, fill="black", font=small)
    d.text(((size[0] - d.textlength(title, font=big)) / 2, 16), title, fill="black", font=big)
    d.text(((left + right - d.textlength(xlabel, font=small)) / 2, bottom + 30), xlabel, fill="black", font=small)
    rotated = Image.new("RGB", (int(d.textlength(ylabel, font=small)) + 4, 18), "white")
    ImageDraw.Draw(rotated).text((2, 1), ylabel, fill="black", font=small)
    rotated = rotated.rotate(90, expand=True)
    img.paste(rotated, (12, (top + bottom - rotated.height) // 2))
    img.save(path, format="PNG")
