"""The load test: 200 clients send 1,000 mixed requests (text, images, streamed, pair policies) to a real server on
127.0.0.1; none is lost or fails, no KV page is held afterwards, and the server's resident memory after the run is
within 5% of what it was when the first 100 had been answered. Bounded: it stops by itself."""

from __future__ import annotations

from pathlib import Path

from tandem.bench.serve import LOAD_WARM, ServerProcess, load_run


def test_a_thousand_requests_from_two_hundred_clients(tiny_8b, tiny_2b, tmp_path):
    server = ServerProcess(["--large", str(tiny_8b), "--small", str(tiny_2b), "--reason-tokens", "32"],
                           tmp_path / "serve.log")
    try:
        figures = load_run(server, (Path(tiny_8b).name, Path(tiny_2b).name), requests=1000, clients=200)
        served = server.metric("tandem_requests_total", status="200")
    finally:
        server.stop()
    assert figures["failures"] == []
    assert served == 1000  # the server's own count: every request answered, none twice
    assert figures["pages_in_use_at_end"] == 0
    assert figures["rss_growth"] <= 0.05, (figures, LOAD_WARM)
