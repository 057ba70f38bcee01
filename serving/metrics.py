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
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "vitrine_stage_seconds",
            "Latency of one stage of a search: decode, prepare, embed, search, fetch",
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
        self.search_batch_size = Histogram(
            "vitrine_search_batch_size",
            "Query vectors per Milvus search call (concurrent searches go together)",
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
        self.canary_recall = Gauge(
            "vitrine_canary_recall",
            "Live Recall@K of the recall canary on the served collection",
            ["k"],
            registry=r,
        )
        self.canary_expected = Gauge(
            "vitrine_canary_expected_recall",
            "The canary's Recall@K by exact search at index time",
            ["k"],
            registry=r,
        )
        self.canary_floor = Gauge(
            "vitrine_canary_floor",
            "Live canary Recall@10 below this alerts (expected minus the tolerance)",
            registry=r,
        )
        self.canary_last_run = Gauge(
            "vitrine_canary_last_run_timestamp_seconds", "When the canary last ran", registry=r
        )
        self.drift = Gauge(
            "vitrine_query_drift",
            "Standardised mean shift of recent query embeddings from the catalogue's",
            registry=r,
        )
        self.drift_threshold = Gauge(
            "vitrine_query_drift_threshold",
            "Drift that random catalogue samples stay under (from the index step)",
            registry=r,
        )
        self.drift_queries = Gauge(
            "vitrine_query_drift_queries", "Recent queries in the drift window", registry=r
        )

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.forward.observe(seconds)

    def observe_search_batch(self, size: int) -> None:
        self.search_batch_size.observe(size)

    def set_canary(self, result: dict, tolerance: float) -> None:
        """Export one canary run (live and expected Recall@K, the floor, when)."""
        for key, value in result["recall"].items():
            if value is not None:
                self.canary_recall.labels(key.split("@")[1]).set(value)
        for key, value in result["expected"].items():
            self.canary_expected.labels(key.split("@")[1]).set(value)
        if "recall@10" in result["expected"]:
            self.canary_floor.set(max(0.0, result["expected"]["recall@10"] - tolerance))
        self.canary_last_run.set(result["at"])

    def set_drift(self, drift: dict) -> None:
        """Export the drift gauge (NaN while too few queries were seen)."""
        self.drift.set(float("nan") if drift["distance"] is None else drift["distance"])
        self.drift_threshold.set(drift["threshold"])
        self.drift_queries.set(drift["queries"])

    def set_serving(self, model_version: str, collection: str, index_type: str, rows: int) -> None:
        self.serving.clear()
        self.serving.labels(model_version, collection, index_type).set(1)
        self.collection_rows.set(rows)
