"""The server under load, from outside: a real `tandem serve` process on 127.0.0.1, driven by concurrent clients.

    python -m tandem.bench.serve [--concurrency 1,8,32] [--requests 256] [--out serve.json]
    python -m tandem.bench.serve --load [--clients 200] [--requests 1000]

The benchmark (default) sends the same short requests (a text prompt, 8 greedy tokens, to the tiny 2B-like model)
through HTTP and through the in-process API (`Engine.generate_async`), alternating round by round, at each
concurrency, and reports requests/s and latency percentiles for both; the server's overhead per request is the
median, over the rounds, of the difference of the two ways' median latencies at concurrency 1. The load run
(`--load`) sends a mix (text, image, streamed, pair policies) from many clients at once and checks that none is
lost or failed, that no KV page is held afterwards and that the server's resident memory after the run is within
5% of what it was after the first 100 requests; exit status 1 otherwise. Both stop by themselves and send traffic to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

LOAD_WARM = 100  # requests before the load run's first memory reading
MAX_GROWTH = 0.05
ROUNDS = 8  # the benchmark's alternating rounds of HTTP and in-process requests


class ServerProcess:
    """`tandem serve ARGS` on 127.0.0.1 and a free port, ready once /health answers."""

    def __init__(self, args: list[str], log: Path, ready_timeout: float = 120.0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.log = f"http://127.0.0.1:{self.port}", log
        command = [sys.executable, "-m", "tandem.runtime.cli", "serve", "--device", "cpu", "--dtype", "float32",
                   "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tandem serve exited with {self.process.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tandem serve did not answer /health in {ready_timeout} s:\n{log.read_text()}")
            time.sleep(0.2)

    def metric(self, name: str, **labels) -> float:
        """A /metrics sample summed over the series that match `labels` (0 for a labelled counter with none yet)."""
        total, found = 0.0, False
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
            if match is not None:
                have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
                if all(have.get(k) == v for k, v in labels.items()):
                    total, found = total + float(match.group(2)), True
        if not found and not labels:
            raise KeyError(f"{name} is not in /metrics")
        return total

    def pages_in_use(self) -> float:
        return self.metric("tandem_kv_pages_in_use")

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop it (SIGINT: as Ctrl-C does) -> its exit status; killed if it has not ended within `timeout` s."""
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.returncode


async def drive(url: str, bodies: list[dict], clients: int, probe=None, probe_after: int = 0) -> dict:
    """Send every body from `clients` concurrent clients (each takes the next body when its last one is done).
    -> {latencies_s, failures: [(index, what)], seconds, probe: probe() read when probe_after requests were done}.
    A streamed body counts once its [DONE] arrives."""
    latencies, failures, next_index = [0.0] * len(bodies), [], iter(range(len(bodies)))
    done, probed = 0, None
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        for i in next_index:
            start = time.perf_counter()
            try:
                if bodies[i].get("stream"):
                    async with http.stream("POST", "/v1/chat/completions", json=bodies[i]) as r:
                        lines = [line async for line in r.aiter_lines() if line]
                    ok = r.status_code == 200 and lines[-1] == "data: [DONE]" and '"error"' not in lines[-2]
                else:
                    r = await http.post("/v1/chat/completions", json=bodies[i])
                    ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                if not ok:
                    failures.append((i, f"HTTP {r.status_code}"))
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                failures.append((i, f"{type(e).__name__}: {e}"))
            latencies[i] = time.perf_counter() - start
            nonlocal done, probed
            done += 1
            if probe is not None and done == probe_after:
                probed = probe()

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return {"latencies_s": latencies, "failures": failures, "seconds": time.perf_counter() - start, "probe": probed}


class LeanClient:
    """One keep-alive HTTP/1.1 connection on asyncio streams, for the benchmark: its own cost per request is a
    small fraction of a millisecond, so the HTTP figures are the server's (httpx's AsyncClient adds its own
    milliseconds of Python per request on the 2-core machine, on the same cores as the server)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def connect(cls, url: str) -> "LeanClient":
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)), host)

    async def post(self, path: str, body: dict) -> tuple[int, dict]:
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if length is None:
            raise ValueError(f"a response without content-length: {head[:200]!r}")
        return int(head.split(b" ", 2)[1]), json.loads(await self.reader.readexactly(int(length.group(1))))

    def close(self) -> None:
        self.writer.close()


async def lean_drive(url: str, bodies: list[dict], clients: int) -> dict:
    """`drive` for plain (not streamed) bodies, each client on its own LeanClient connection."""
    latencies, failures, next_index = [0.0] * len(bodies), [], iter(range(len(bodies)))

    async def client() -> None:
        connection = await LeanClient.connect(url)
        try:
            for i in next_index:
                start = time.perf_counter()
                status, reply = await connection.post("/v1/chat/completions", bodies[i])
                latencies[i] = time.perf_counter() - start
                if status != 200 or reply["choices"][0]["finish_reason"] not in ("stop", "length"):
                    failures.append((i, f"HTTP {status}"))
        finally:
            connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"latencies_s": latencies, "failures": failures, "seconds": time.perf_counter() - start}


def load_bodies(count: int, models: tuple[str, str]) -> list[dict]:
    """The load run's mix, cycled: text and image requests to each model, streamed ones, and pair policies."""
    images = [_png_data_url(seed) for seed in range(8)]
    text = [{"role": "user", "content": "Say something short."}]
    bodies = []
    for i in range(count):
        image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[i % 8]}},
                                              {"type": "text", "text": "What is this?"}]}]
        kind = i % 5
        bodies.append(
            {"model": models[i % 2], "messages": text, "max_tokens": 4} if kind == 0 else
            {"model": models[1], "messages": image, "max_tokens": 4, "temperature": 0.7, "seed": i} if kind == 1 else
            {"model": models[1], "messages": text, "max_tokens": 6, "stream": True} if kind == 2 else
            {"model": "tandem-large", "messages": image, "max_tokens": 4} if kind == 3 else
            {"model": "tandem-verify", "messages": image, "max_tokens": 4})
    return bodies


def _png_data_url(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48 + 8 * seed, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def load_run(server: ServerProcess, models: tuple[str, str], requests: int, clients: int) -> dict:
    """The load run against a running server, its memory read when the first LOAD_WARM requests are done (the
    others in flight) and after the last."""
    run = asyncio.run(drive(server.url, load_bodies(requests, models), clients, server.rss_mib, LOAD_WARM))
    rss_end = server.rss_mib()
    return {"requests": requests, "clients": clients, "failures": run["failures"], "seconds": run["seconds"],
            "rss_after_warm_mib": run["probe"], "rss_at_end_mib": rss_end, "rss_growth": rss_end / run["probe"] - 1,
            "pages_in_use_at_end": server.pages_in_use(), **percentiles(run["latencies_s"])}


def percentiles(latencies: list[float]) -> dict:
    ms = sorted(1000 * x for x in latencies)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return {"mean_ms": statistics.fmean(ms), "p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99)}


async def _in_process(engine, bodies: list[dict], clients: int) -> dict:
    from tandem.runtime import SamplingParams

    latencies, queue = [], list(bodies)

    async def client():
        while queue:
            body = queue.pop()
            start = time.perf_counter()
            await engine.generate_async(body["messages"], SamplingParams(max_tokens=body["max_tokens"],
                                                                         temperature=0.0, ignore_eos=True))
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"latencies_s": latencies, "failures": [], "seconds": time.perf_counter() - start}


def benchmark(checkpoint: Path, levels: list[int], requests: int, log: Path, rounds: int = ROUNDS,
              server_args: tuple[str, ...] = ()) -> dict:
    """Requests/s and latency at each concurrency, through HTTP and in process, on the same checkpoint. The two
    ways alternate in `rounds` rounds of requests/rounds each (the server idles while the in-process engine works
    and the other way round), so that a slower spell of the machine weighs on both alike."""
    from tandem.runtime import Engine

    name = checkpoint.name
    bodies = [{"model": name, "messages": [{"role": "user", "content": f"Count to {i % 10}."}], "max_tokens": 8,
               "temperature": 0.0, "ignore_eos": True} for i in range(requests)]
    chunks = [bodies[r::rounds] for r in range(rounds)]
    server = ServerProcess(["--model", str(checkpoint), *server_args], log)
    engine = Engine.from_pretrained(checkpoint, device="cpu", dtype="float32")
    runs = {(c, way): [] for c in levels for way in ("http", "in-process")}
    try:
        asyncio.run(lean_drive(server.url, bodies[:8], 4))  # warm-up: first calls build caches
        asyncio.run(_in_process(engine, bodies[:8], 4))
        for c in levels:
            for chunk in chunks:
                runs[c, "http"].append(asyncio.run(lean_drive(server.url, chunk, c)))
                runs[c, "in-process"].append(asyncio.run(_in_process(engine, chunk, c)))
    finally:
        server.stop()
        engine.close()
    rows = []
    for (c, way), parts in runs.items():
        latencies = [x for run in parts for x in run["latencies_s"]]
        rows.append({"concurrency": c, "way": way, "requests_per_s": len(latencies) / sum(r["seconds"] for r in parts),
                     "failures": sum(len(r["failures"]) for r in parts), **percentiles(latencies)})
    per_round = [1000 * (statistics.median(h["latencies_s"]) - statistics.median(i["latencies_s"]))
                 for h, i in zip(runs[levels[0], "http"], runs[levels[0], "in-process"])]
    return {"rows": rows, "rounds": rounds, "overhead_ms_by_round": per_round,
            "overhead_ms_per_request": statistics.median(per_round)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.bench.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", action="store_true", help="the load run instead of the benchmark")
    parser.add_argument("--concurrency", default="1,8,32", help="benchmark: concurrent clients (default: 1,8,32)")
    parser.add_argument("--requests", type=int, help="requests per level (256), or in the load run (1000)")
    parser.add_argument("--clients", type=int, default=200, help="load run: concurrent clients (default: 200)")
    parser.add_argument("--server-args", default="", metavar="'ARGS'",
                        help="benchmark: more arguments of the `tandem serve` under test, e.g. '--no-access-log'")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    from tandem.models.tiny import cached_tiny_checkpoint

    large, small = cached_tiny_checkpoint("8b-like"), cached_tiny_checkpoint("2b-like")
    log = args.out.with_suffix(".log") if args.out else Path(tempfile.gettempdir()) / "tandem-serve.log"
    machine = {"python": platform.python_version(), "platform": platform.platform(),
               "cpus": len(os.sched_getaffinity(0))}
    if args.load:
        server = ServerProcess(["--large", str(large), "--small", str(small), "--reason-tokens", "32"], log)
        try:
            figures = load_run(server, (large.name, small.name), args.requests or 1000, args.clients)
        finally:
            server.stop()
        ok = (not figures["failures"] and figures["pages_in_use_at_end"] == 0
              and figures["rss_growth"] <= MAX_GROWTH)
    else:
        figures = benchmark(small, [int(c) for c in args.concurrency.split(",")], args.requests or 256, log,
                            server_args=tuple(shlex.split(args.server_args)))
        ok = all(r["failures"] == 0 for r in figures["rows"])
    report = {**figures, "machine": machine, "command": "python -m tandem.bench.serve " + " ".join(argv or sys.argv[1:])}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
