"""The server's Prometheus metrics (`GET /metrics`), each server with its own registry.

Counted as requests end: requests by model and HTTP status, prompt and output tokens, time to first token and time
per output token (the engine's own Timings), and the pair's verify verdicts. Read from the engines at each scrape:
queue length, running sequences and KV pages in use per engine, and the vision cache's hits and misses.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tandem.runtime.request import Timings

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self, engines: dict, vision_caches: list):
        """engines: name -> Engine, read at each scrape; vision_caches: the distinct VisionCaches they use."""
        self.registry = CollectorRegistry()
        self.requests = Counter("tandem_requests", "Chat completion requests by model and HTTP status",
                                ["model", "status"], registry=self.registry)
        self.prompt_tokens = Counter("tandem_prompt_tokens", "Prompt tokens prefilled", ["model"],
                                     registry=self.registry)
        self.output_tokens = Counter("tandem_output_tokens", "Output tokens generated", ["model"],
                                     registry=self.registry)
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "Submission to the first token on the host",
                              ["model"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("tandem_time_per_output_token_seconds", "Decode time per output token after the first",
                              ["model"], buckets=TPOT_BUCKETS, registry=self.registry)
        self.verify = Counter("tandem_verify_verdicts", "verify requests by whether the cheap answers agreed",
                              ["agreed"], registry=self.registry)
        self.agreed = self.verdicts = 0
        self.registry.register(_EngineCollector(engines, vision_caches, self))

    def request(self, model: str, status: int) -> None:
        self.requests.labels(model, str(status)).inc()

    def timings(self, model: str, timings: Timings) -> None:
        """One generation's figures (a single model's request, or one stage of a pair's)."""
        self.prompt_tokens.labels(model).inc(timings.prompt_tokens)
        self.output_tokens.labels(model).inc(timings.output_tokens)
        if timings.output_tokens:
            self.ttft.labels(model).observe(timings.first_token_s)
        if timings.output_tokens > 1:
            self.tpot.labels(model).observe(timings.decode_ms_per_token / 1000)

    def verdict(self, agreed: bool) -> None:
        self.verify.labels(str(agreed).lower()).inc()
        self.agreed, self.verdicts = self.agreed + agreed, self.verdicts + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges read from the engines when scraped (reading their counts from another thread is safe: plain ints
    and list lengths)."""

    def __init__(self, engines: dict, vision_caches: list, metrics: Metrics):
        self.engines, self.vision_caches, self.metrics = engines, vision_caches, metrics

    def collect(self):
        queue = GaugeMetricFamily("tandem_queue_length", "Requests waiting for a place in the batch", labels=["engine"])
        running = GaugeMetricFamily("tandem_running_sequences", "Sequences being prefilled or decoded",
                                    labels=["engine"])
        pages = GaugeMetricFamily("tandem_kv_pages_in_use", "KV-cache pages held", labels=["engine"])
        total = GaugeMetricFamily("tandem_kv_pages_total", "KV-cache pages in all", labels=["engine"])
        for name, engine in self.engines.items():
            scheduler = engine.scheduler
            queue.add_metric([name], len(scheduler.waiting) + len(engine.loop))
            running.add_metric([name], len(scheduler.prefilling) + len(scheduler.decoding))
            pages.add_metric([name], engine.pool.pages_in_use)
            total.add_metric([name], engine.pool.num_pages)
        yield from (queue, running, pages, total)
        hits = CounterMetricFamily("tandem_vision_cache_hits", "Images whose features came from the vision cache")
        misses = CounterMetricFamily("tandem_vision_cache_misses", "Images the vision tower encoded")
        hits.add_metric([], sum(c.hits for c in self.vision_caches))
        misses.add_metric([], sum(c.misses for c in self.vision_caches))
        yield from (hits, misses)
        m = self.metrics
        rate = GaugeMetricFamily("tandem_verify_agreement_rate", "Share of verify requests whose answers agreed")
        rate.add_metric([], m.agreed / m.verdicts if m.verdicts else 0.0)
        yield rate
