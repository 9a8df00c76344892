"""Prometheus metrics of the server (GET /metrics), one registry per app.

    nanochat_requests_total{route, status}     requests answered, by HTTP status
    nanochat_generated_tokens_total            tokens generated (sampled + tool output)
    nanochat_sequences_finished_total{reason}  stop | length | cancelled | error
    nanochat_queue_depth                       requests waiting for a free KV-cache row
    nanochat_active_sequences                  sequences decoding now
    nanochat_time_to_first_token_seconds       histogram: submit → first token
    nanochat_inter_token_latency_seconds       histogram: gap between a sequence's tokens
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServerMetrics:
    """The registry; schedulers count into it from their threads (prometheus-client is thread-safe)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("nanochat_requests", "Requests answered", ["route", "status"], registry=r)
        self.generated = Counter("nanochat_generated_tokens", "Tokens generated", registry=r)
        self.finished_seqs = Counter("nanochat_sequences_finished", "Sequences ended, by reason", ["reason"],
                                     registry=r)
        self.queue = Gauge("nanochat_queue_depth", "Requests waiting for a KV-cache row", registry=r)
        self.active = Gauge("nanochat_active_sequences", "Sequences decoding now", registry=r)
        self.ttft = Histogram("nanochat_time_to_first_token_seconds", "Submit to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("nanochat_inter_token_latency_seconds", "Gap between tokens of a sequence",
                             buckets=ITL_BUCKETS, registry=r)

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
