"""A night's outcome as Prometheus metrics, published the way batch jobs publish them.

A batch job is gone before Prometheus could scrape it, so the ``finish`` step writes its figures
twice: to ``<work_dir>/metrics/vitrine_nightly.prom`` (the node-exporter textfile-collector
format; point ``--collector.textfile.directory`` at that folder) and, when
``nightly.pushgateway`` is set, to a Pushgateway under ``job="vitrine_nightly"`` (scraped with
``honor_labels: true``). Each push replaces the previous night's group, so the gauges always
describe the last night; timestamps let alerts measure age (``IndexStale``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, write_to_textfile

log = logging.getLogger(__name__)
JOB = "vitrine_nightly"
TEXTFILE = "vitrine_nightly.prom"
RECALL_KS = ("1", "10")


def night_registry(outcome: dict[str, Any]) -> CollectorRegistry:
    """The metrics of one night, from what ``finish`` recorded."""
    registry = CollectorRegistry()

    def gauge(name: str, help_text: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, help_text, labels, registry=registry)

    gauge("vitrine_nightly_last_run_timestamp_seconds", "When the last night finished").set(
        outcome["finished_ts"]
    )
    if outcome.get("last_success_ts") is not None:
        gauge(
            "vitrine_nightly_last_success_timestamp_seconds",
            "When a night last indexed and rolled out a new model",
        ).set(outcome["last_success_ts"])
    status = gauge("vitrine_nightly_outcome", "The last night's outcome (1)", ("outcome",))
    for name in ("promoted", "rejected", "skipped"):
        status.labels(name).set(1 if outcome["outcome"] == name else 0)
    gauge("vitrine_nightly_gate_consecutive_rejections", "Nights in a row the gate refused").set(
        outcome.get("consecutive_rejections", 0)
    )
    if outcome["outcome"] == "skipped":
        return registry
    gauge("vitrine_nightly_gate_promoted", "1 if the last gate promoted, else 0").set(
        1 if outcome["outcome"] == "promoted" else 0
    )
    rows = gauge("vitrine_nightly_rows", "Catalogue rows of the last night", ("state",))
    rows.labels("valid").set(outcome.get("valid_rows", 0))
    rows.labels("quarantined").set(outcome.get("quarantined_rows", 0))
    recall = gauge(
        "vitrine_nightly_recall",
        "Recall@K of the candidate and the production model, on the same evaluation sets",
        ("model", "set", "k"),
    )
    for model, metrics in (
        ("candidate", outcome.get("candidate_metrics")),
        ("production", outcome.get("production_metrics")),
    ):
        for set_name, block in (metrics or {}).items():
            if not isinstance(block, dict):
                continue
            for k in RECALL_KS:
                if f"recall@{k}" in block:
                    recall.labels(model, set_name, k).set(block[f"recall@{k}"])
    if outcome.get("index_seconds") is not None:
        gauge("vitrine_nightly_index_build_seconds", "Seconds the index step took").set(
            outcome["index_seconds"]
        )
        gauge("vitrine_nightly_collection_rows", "Rows in the new collection").set(
            outcome.get("collection_rows", 0)
        )
    return registry


def publish_night(
    outcome: dict[str, Any], work_dir: str | Path, pushgateway: str | None = None
) -> dict[str, Any]:
    """Write the textfile and push to the Pushgateway (if configured). A Pushgateway that
    cannot be reached is logged, not raised: monitoring must not fail the night."""
    registry = night_registry(outcome)
    folder = Path(work_dir) / "metrics"
    folder.mkdir(parents=True, exist_ok=True)
    textfile = folder / TEXTFILE
    write_to_textfile(str(textfile), registry)
    published: dict[str, Any] = {"textfile": str(textfile), "pushgateway": None}
    if pushgateway:
        try:
            push_to_gateway(pushgateway, job=JOB, registry=registry, timeout=10)
            published["pushgateway"] = pushgateway
        except OSError as err:
            log.warning("could not push the night's metrics to %s: %s", pushgateway, err)
            published["push_error"] = str(err)
    return published
