"""The kernel micro-benchmarks' report: a pytest-benchmark JSON of bench/test_kernels.py as the Markdown table of
bench/RESULTS.md (the latency study's report is tandem.bench.latency_report).

    python -m tandem.bench.kernels_report bench.json > table.md

Medians in microseconds per call (a timed round makes `calls` calls, in a CUDA graph or eagerly: `timed`); achieved
bandwidth = the case's minimum bytes / median; the last column compares it with the device copy bandwidth measured
in the same run (test_device_copy).
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    rows = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        rows[b["name"]] = (b["stats"]["median"] / info.get("calls", 1), info.get("bytes", 0), info.get("timed", "?"))
    copy_s, copy_bytes, _ = rows.pop("test_device_copy")
    copy_bw = copy_bytes / copy_s
    machine = data.get("machine_info", {})
    print(f"Device copy bandwidth: {copy_bw / 1e9:.0f} GB/s ({machine.get('node', '?')}, "
          f"{data.get('datetime', '?')})\n")
    print("| case | timed | median (us) | achieved GB/s | of copy bandwidth |")
    print("|---|---|---:|---:|---:|")
    for name, (median, nbytes, timed) in sorted(rows.items()):
        bw = nbytes / median
        print(f"| {name.removeprefix('test_')} | {timed} | {median * 1e6:.1f} | {bw / 1e9:.0f} | {bw / copy_bw:.0%} |")


if __name__ == "__main__":
    main(sys.argv[1])
