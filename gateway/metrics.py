"""Prometheus metrics of the gateway (served at /metrics)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from gateway.requests import Outcome

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "videollm_requests", "completed HTTP requests", ["route", "status"], registry=self.registry
        )
        self.in_flight = Gauge("videollm_requests_in_flight", "chat completions in progress", registry=self.registry)
        self.cache = Counter("videollm_cache_lookups", "token cache lookups", ["result"], registry=self.registry)
        self.cache_skipped = Counter("videollm_cache_entries_skipped", "encodings not cached: larger than "
                                     "cache_max_entry_bytes", registry=self.registry)
        self.ttft = Histogram(
            "videollm_ttft_seconds", "time to first token seen by the gateway", ["cache"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.encode = Histogram(
            "videollm_encode_seconds", "encoder time per encoded video", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.queue = Histogram(
            "videollm_llm_queue_seconds", "time a request waited for the LLM", buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.total = Histogram(
            "videollm_request_seconds", "chat completion latency", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.completion_tokens = Counter(
            "videollm_completion_tokens", "generated tokens", registry=self.registry
        )

    def record_chat(self, outcome: Outcome, received_at: float, status: str) -> None:
        """A finished chat completion (status "499": the client left)."""
        self.requests.labels("/v1/chat/completions", status).inc()
        self.total.observe(time.perf_counter() - received_at)
        if outcome.cache:
            self.cache.labels(outcome.cache).inc()
        if outcome.first_token_at is not None:
            self.ttft.labels(outcome.cache or "none").observe(outcome.first_token_at - received_at)
        if outcome.header is not None and outcome.cache == "miss":
            self.encode.observe(outcome.header.timings.total_ms / 1e3)
        if outcome.final is not None:
            self.queue.observe(outcome.final.timings.queue_ms / 1e3)
            self.completion_tokens.inc(outcome.final.usage.completion_tokens)
