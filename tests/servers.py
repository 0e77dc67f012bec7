"""A real `tandem serve` process on 127.0.0.1 for the server tests, and what they read from outside it."""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log: Path, ready_timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "tandem.runtime.cli", "serve", "--device", "cpu", "--dtype", "float32",
                   "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tandem serve exited with {self.process.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tandem serve did not answer /health in {ready_timeout} s:\n{log.read_text()}")
            time.sleep(0.2)

    def metric(self, name: str, **labels) -> float:
        """One sample of /metrics, summed over the series that match `labels` (0 for a labelled counter that has
        none yet)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total, found = 0.0, False
        for line in text.splitlines():
            match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
            if match is None:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total, found = total + float(match.group(2)), True
        assert found or labels, f"{name} not in /metrics:\n{text}"
        return total

    def pages_in_use(self) -> float:
        return self.metric("tandem_kv_pages_in_use")

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]
