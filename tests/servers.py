"""What the server tests share: the key their server takes, and requests with images."""

from __future__ import annotations

import base64
from pathlib import Path

from tandem.bench.serve import ServerProcess  # the tests' server: a real `tandem serve` process

API_KEY = "test-key"


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]

__all__ = ["API_KEY", "ServerProcess", "data_url", "image_message"]
