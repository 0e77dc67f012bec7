"""Soak test: many small mixed requests on the tiny models; does anything leak or fail?

    python -m tandem.bench.soak [--requests 1000] [--out soak.json]

Runs `--requests` requests on the embedded tiny pair (8B-like large, 2B-like small), cycling through the kinds a
user sends: a text generate, a generate with an image, a stream, a batch of three, and a pair answer under each
policy in turn. 16 distinct images are cycled, so the vision cache reaches its steady size early. Afterwards it
reports the process's resident memory after the first 50 requests and at the end (the growth between them must
stay within 2%), the KV pages in use (must be zero) and the failures (must be none); exit status 1 otherwise.
Not part of CI (minutes on a small CPU machine); its figures go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from tandem.models.tiny import cached_tiny_checkpoint
from tandem.runtime import POLICIES, Budget, Engine, SamplingParams, Tandem

KINDS = ("text", "image", "stream", "batch", "pair")
WARM = 50  # requests before the first memory reading: caches and allocator pools have filled by then
MAX_GROWTH = 0.02


def resident_bytes() -> int:
    """The process's resident set size now (Linux /proc), not its peak."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def soak_image(i: int) -> np.ndarray:
    rng = np.random.default_rng(i % 16)
    side = 64 + 16 * (i % 4)
    return rng.integers(0, 256, (side, side + 8, 3), dtype=np.uint8)


def one_request(i: int, pair: Tandem, engine: Engine, params: SamplingParams) -> str:
    kind = KINDS[i % len(KINDS)]
    message = [{"role": "user", "content": [{"type": "image", "image": soak_image(i)},
                                            {"type": "text", "text": f"What is in picture {i}?"}]}]
    if kind == "text":
        engine.generate(f"Tell me about the number {i}.", params)
    elif kind == "image":
        engine.generate(message, params)
    elif kind == "stream":
        "".join(engine.stream(message, params))
    elif kind == "batch":
        engine.generate_batch([message, f"Count to {i % 7}.", "Hello!"], params)
    else:
        pair.answer(soak_image(i), f"What is in picture {i}?", policy=POLICIES[(i // len(KINDS)) % len(POLICIES)])
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    large, small = cached_tiny_checkpoint("8b-like"), cached_tiny_checkpoint("2b-like")
    pair = Tandem.from_pretrained(large, small, device="cpu", dtype="float32", kv_cache_tokens=8192,
                                  budget=Budget(short_tokens=4, reason_tokens=24))
    engine = pair.engines["small"]
    params = SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, top_k=20)
    failures: list[str] = []
    counts = {kind: 0 for kind in KINDS}
    start = time.perf_counter()
    rss_warm = None
    for i in range(args.requests):
        try:
            counts[one_request(i, pair, engine, params)] += 1
        except Exception:  # noqa: BLE001 - every failure is counted and shown
            failures.append(f"request {i}: {traceback.format_exc(limit=3)}")
        if i + 1 == WARM:
            gc.collect()
            rss_warm = resident_bytes()
    gc.collect()
    rss_end = resident_bytes()
    pages = {name: e.pool.pages_in_use for name, e in pair.engines.items()}
    growth = (rss_end - rss_warm) / rss_warm if rss_warm else None
    figures = {
        "requests": args.requests, "by_kind": counts, "failures": len(failures), "seconds": time.perf_counter() - start,
        "rss_after_50_mib": rss_warm / 2**20 if rss_warm else None, "rss_at_end_mib": rss_end / 2**20,
        "rss_growth": growth, "pages_in_use_at_end": pages,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "command": "python -m tandem.bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(figures, indent=2))
    for failure in failures[:5]:
        print(failure, file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    ok = not failures and not any(pages.values()) and growth is not None and growth <= MAX_GROWTH
    print("soak: " + ("passed" if ok else "FAILED"), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
