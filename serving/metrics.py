"""Prometheus metrics of the search service, on a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    """Requests and latency by route and status; stage latencies; batches; versions; size."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vitrine_http_requests", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "vitrine_http_request_seconds",
            "HTTP request latency",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "vitrine_stage_seconds",
            "Latency of one stage of a search: decode, embed, search, fetch",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vitrine_embed_batch_size",
            "Images per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.forward = Histogram(
            "vitrine_embed_forward_seconds",
            "Seconds per forward pass of one micro-batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter("vitrine_errors", "Errors by kind", ["kind"], registry=r)
        self.serving = Gauge(
            "vitrine_serving_info",
            "The (model, collection) pair being served (value 1)",
            ["model_version", "collection", "index_type"],
            registry=r,
        )
        self.collection_rows = Gauge(
            "vitrine_collection_rows", "Rows in the served collection", registry=r
        )
        self.cache = Counter(
            "vitrine_embedding_cache", "Query-embedding cache lookups", ["result"], registry=r
        )
        self.ready = Gauge("vitrine_ready", "1 when the service can answer searches", registry=r)
        self.rollouts = Counter("vitrine_rollouts", "Rollouts by outcome", ["outcome"], registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.forward.observe(seconds)

    def set_serving(self, model_version: str, collection: str, index_type: str, rows: int) -> None:
        self.serving.clear()
        self.serving.labels(model_version, collection, index_type).set(1)
        self.collection_rows.set(rows)
