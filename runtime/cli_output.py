"""What the `tandem` command prints. Results go to stdout; progress (loading lines, each pair stage's text as it
is decoded, notes) goes to stderr, so that `--json` output, or a result table, can be piped on its own. `generate`
streams its reply to stdout: the reply is its result."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from tandem.runtime.request import GenerateOutput, Timings
from tandem.runtime.stages import TandemResult


class Console:
    """stdout and stderr, each remembering whether its last line is unfinished, so that a note (an error,
    `[interrupted]`) starts on a line of its own. Every write is flushed: text shows as it is decoded."""

    def __init__(self) -> None:
        self._open = {False: False, True: False}  # err -> the stream's last line is unfinished

    def write(self, text: str, err: bool = False) -> None:
        if not text:
            return
        _stream(not err).flush()  # what the other stream already holds comes first
        stream = _stream(err)
        stream.write(text)
        stream.flush()
        self._open[err] = not text.endswith("\n")

    def line(self, text: str, err: bool = False) -> None:
        """`text` on a line of its own."""
        self.end_line(err)
        self.write(text + "\n", err)

    def end_line(self, err: bool = False) -> None:
        if self._open[err]:
            self.write("\n", err)

    def note(self, text: str) -> None:
        """A line on stderr after whatever was printed, stdout's unfinished line ended first (on a terminal the
        two share the screen)."""
        self.end_line(err=False)
        self.line(text, err=True)


def _stream(err: bool):
    return sys.stderr if err else sys.stdout  # looked up at each write: tests swap them


console = Console()


@contextmanager
def loading(role: str, given: str, path: Path) -> Iterator[None]:
    """`loading large from PATH ... done in 3.2 s` on stderr around one model's load."""
    name = role if Path(given) == path else f"{role} {given}"  # a Hugging Face id: its name, then its folder
    console.write(f"loading {name} from {path} ... ", err=True)
    start = time.perf_counter()
    try:
        yield
    except Exception:
        console.write("failed\n", err=True)  # the error follows on its own line
        raise
    console.write(f"done in {time.perf_counter() - start:.1f} s\n", err=True)


class StageText:
    """The pair's on_text callback: each stage's text on stderr as it is decoded, after a `[model role]` header.

    With verify's overlap two stages decode at once and their pieces would interleave mid-line: then each stage's
    text is held until a line is complete and printed as a whole line, prefixed `[model role]`.
    """

    def __init__(self, overlapped: bool):
        self.overlapped = overlapped
        self._shown: str | None = None  # the stage whose text is being printed (one stage at a time)
        self._partial: dict[str, str] = {}  # overlapped: each stage's unfinished line
        self._lock = threading.Lock()

    def __call__(self, model: str, role: str, piece: str) -> None:
        stage = f"[{model} {role}]"
        with self._lock:
            if not self.overlapped:
                if stage != self._shown:
                    console.line(stage, err=True)
                    self._shown = stage
                console.write(piece, err=True)
                return
            *lines, self._partial[stage] = (self._partial.get(stage, "") + piece).split("\n")
            for line in lines:
                console.line(f"{stage} {line}", err=True)

    def close(self) -> None:
        """Print what is left: each held line, and the end of the last one printed."""
        with self._lock:
            for stage, rest in self._partial.items():
                if rest:
                    console.line(f"{stage} {rest}", err=True)
            self._partial.clear()
            console.end_line(err=True)


def format_timings(t: Timings) -> str:
    return (f"vision {1000 * t.vision_s:.1f} ms | prefill {1000 * t.prefill_s:.1f} ms for {t.prompt_tokens} tokens "
            f"({t.image_tokens} image) | decode {t.decode_ms_per_token:.2f} ms/token for {t.output_tokens} tokens")


def generate_json(out: GenerateOutput) -> str:
    """The whole output as one line of JSON."""
    return json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                       "timings": asdict(out.timings)}, ensure_ascii=False)


def format_result(result: TandemResult) -> str:
    lines = [f"answer: {result.answer}", f"policy: {result.policy}" + (
        "" if result.agreed is None else f" (cheap answers {'agreed' if result.agreed else 'disagreed'})"), "",
        f"{'#':>2} {'model':6} {'role':9} {'input':>6} {'prefill':>8} {'output':>7} {'kept':>9} "
        f"{'vision ms':>10} {'prefill ms':>11} {'decode ms':>10}  vision cache"]
    for i, s in enumerate(result.stages, 1):
        kept = "" if s.kept_indices is None else f"{len(s.kept_indices)}/{s.reasoning_tokens}"
        cache = {None: "", True: "hit", False: "miss"}[s.vision_cache_hit]
        lines.append(f"{i:>2} {s.model:6} {s.role:9} {s.input_tokens:>6} {s.prefilled_tokens:>8} "
                     f"{len(s.output_ids):>7} {kept:>9} {1000 * s.timings.vision_s:>10.1f} "
                     f"{1000 * s.timings.prefill_s:>11.1f} {1000 * s.timings.decode_s:>10.1f}  {cache}")
        lines.append(f"   {s.text[:100]!r}")
    lines.append(f"\ntotal {1000 * result.total_s:.1f} ms")
    return "\n".join(lines)
