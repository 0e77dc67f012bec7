"""What every part of `tandem bench` times with: medians of the kept samples, in ms; the progress bar over every
run; and {"unavailable": why}, what a part or column holds instead of numbers when it cannot run."""

from __future__ import annotations

import statistics
import sys


def median(samples: list[float | None]) -> float | None:
    values = [s for s in samples if s is not None]
    return statistics.median(values) if values else None


def to_ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def unavailable(reason: str) -> dict:
    return {"unavailable": reason}


def error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:400]}"


class Progress:
    """One tqdm bar over every run of the benchmark (warm-ups included)."""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="run", desc="tandem bench", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True)

    def step(self, what: str, n: int = 1) -> None:
        self.bar.set_postfix_str(what, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
