"""Prometheus metrics, in a registry of the app's own (no module globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from steerserve.decoding.engine import EngineClient

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCounters:
    """Token and finish counters read from the engine's own stats at scrape time."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        yield CounterMetricFamily("steerserve_prompt_tokens", "Prompt tokens prefilled",
                                  value=stats.prompt_tokens)
        yield CounterMetricFamily("steerserve_cached_prompt_tokens",
                                  "Prompt tokens taken from the prefix cache",
                                  value=stats.cached_prompt_tokens)
        yield CounterMetricFamily("steerserve_generation_tokens", "Tokens generated",
                                  value=stats.generation_tokens)
        yield CounterMetricFamily("steerserve_engine_steps", "Engine steps run",
                                  value=stats.steps)
        finished = CounterMetricFamily("steerserve_requests_finished",
                                       "Sequences finished, by reason", labels=["reason"])
        for reason, count in sorted(stats.finished.items()):
            finished.add_metric([reason], count)
        yield finished


class Metrics:
    def __init__(self, engine: EngineClient) -> None:
        self.registry = CollectorRegistry()
        waiting = Gauge("steerserve_requests_waiting", "Sequences waiting for a slot",
                        registry=self.registry)
        waiting.set_function(lambda: engine.num_waiting)
        running = Gauge("steerserve_requests_running", "Sequences holding a KV-cache slot",
                        registry=self.registry)
        running.set_function(lambda: engine.num_running)
        self.registry.register(_EngineCounters(engine))
        self.requests = Counter("steerserve_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.ttft = Histogram("steerserve_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("steerserve_request_latency_seconds", "End-to-end latency",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
