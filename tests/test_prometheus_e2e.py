"""A real Prometheus scraping a real search service, with the repository's own rules.

The search service (``vitrine serve`` as a child process) serves a tiny model over a Milvus Lite
collection; Prometheus runs from ``monitoring/prometheus.yml`` with these test-only changes:
scrape and rule evaluation every second, the service's port as the only target, no Pushgateway
job, and ``VitrineDown``'s ``for:`` cut from 1m to 2s so the alert goes pending → firing within
seconds. The recording rules are the real file, unchanged (their [5m] windows yield a rate once
two scrapes are in). Needs ``prometheus`` (Debian package); skips and says so without it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

from components.catalog.config import ImageLimits, ValidationConfig
from components.catalog.demo import generate_demo_catalog
from components.demo import search_service
from components.index import IndexBuildConfig, build_index
from components.validate import validate_catalog
from model.package import ModelConfig, build_model, save_package
from tests.conftest import TINY_BACKBONE
from tests.live_server import free_port

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
PROMETHEUS = shutil.which("prometheus")
SEARCH_ROUTE = "/v1/search/image"
# The rule this test reads back: search requests per second, from the real recording rules.
RATE_QUERY = f'route:vitrine_http_requests:rate5m{{job="vitrine-search",route="{SEARCH_ROUTE}"}}'
DOWN_FOR = "2s"  # VitrineDown's `for:` in this test only (1m in monitoring/rules/alerts.yml)

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not found (Debian package `prometheus`)"
)


def _wait_for(what: str, probe: Callable[[], Any], timeout: float, log: Path | None = None) -> Any:
    """``probe()`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            last = probe()
            if last:
                return last
        time.sleep(0.25)
    tail = f"\n{log.name}:\n{log.read_text(errors='replace')[-2000:]}" if log else ""
    pytest.fail(f"{what} not within {timeout:.0f} s (last: {last!r}){tail}")


@pytest.fixture(scope="module")
def catalogue_index(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Milvus Lite collection of 6 demo products × 2 photos, built by a tiny random model."""
    root = tmp_path_factory.mktemp("prometheus_e2e")
    torch.manual_seed(0)
    config = ModelConfig(backbone=TINY_BACKBONE, weights="none", embed_dim=24, pooling="gem")
    package = save_package(build_model(config).eval(), config, root / "package")
    manifest = generate_demo_catalog(
        root / "catalogue", products=6, photos_per_product=2, progress=False, image_size=96
    )
    limits = ValidationConfig(data_docs=False, images=ImageLimits(min_side=32))
    summary = validate_catalog(manifest, root / "validated", limits, progress=False)
    validated = Path(summary["outputs"]["validated"])
    build_index(validated, package, IndexBuildConfig(uri=str(root / "milvus")), progress=False)
    return {"root": root, "milvus": root / "milvus", "photos": manifest.parent / "images"}


def _prometheus_config(folder: Path, service_port: int) -> Path:
    """monitoring/prometheus.yml, made fast and pointed at the test's service."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    service = jobs["vitrine-search"]
    service.pop("file_sd_configs")
    service["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"]}]
    config["scrape_configs"] = [service]  # no Pushgateway here

    alerts = yaml.safe_load((MONITORING / "rules" / "alerts.yml").read_text())
    rules = [rule for group in alerts["groups"] for rule in group["rules"]]
    down = [rule for rule in rules if rule.get("alert") == "VitrineDown"]
    assert len(down) == 1, "monitoring/rules/alerts.yml should have one VitrineDown rule"
    down[0]["for"] = DOWN_FOR
    (folder / "alerts.yml").write_text(yaml.safe_dump(alerts, sort_keys=False))
    config["rule_files"] = [str(MONITORING / "rules" / "recording.yml"), str(folder / "alerts.yml")]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.contextmanager
def _prometheus(config: Path, folder: Path) -> Iterator[tuple[httpx.Client, Path]]:
    """A Prometheus server on a free port, ready when the block starts, stopped after it:
    its API client and its log."""
    port = free_port()
    log = folder / "prometheus.log"
    command = [
        str(PROMETHEUS),
        f"--config.file={config}",
        f"--storage.tsdb.path={folder / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as api:

            def ready() -> bool:
                assert process.poll() is None, f"prometheus exited:\n{log.read_text()[-2000:]}"
                return api.get("/-/ready").status_code == 200

            _wait_for("Prometheus ready", ready, timeout=30, log=log)
            yield api, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _query(api: httpx.Client, expr: str) -> list[dict]:
    body = api.get("/api/v1/query", params={"query": expr}).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def _value(api: httpx.Client, expr: str) -> float | None:
    result = _query(api, expr)
    return float(result[0]["value"][1]) if result else None


def _vitrine_down(api: httpx.Client) -> dict | None:
    alerts = api.get("/api/v1/alerts").json()["data"]["alerts"]
    return next((a for a in alerts if a["labels"]["alertname"] == "VitrineDown"), None)


def test_prometheus_records_the_service_and_alerts_when_it_stops(
    catalogue_index: dict[str, Path], tmp_path: Path
) -> None:
    started = time.monotonic()
    service_port = free_port()
    service_url = f"http://127.0.0.1:{service_port}"
    env = os.environ | {
        "VITRINE_UPLOAD_DIR": str(tmp_path / "uploads"),
        "VITRINE_RELOAD_INTERVAL_S": "0.2",
        "VITRINE_ADMIN_TOKEN": "",
        "VITRINE_THREADS": "1",
    }
    photo = sorted(catalogue_index["photos"].glob("*.jpg"))[0].read_bytes()
    timings: dict[str, float] = {}
    service_log = tmp_path / "service.log"
    milvus = str(catalogue_index["milvus"])
    with (
        search_service(milvus, "127.0.0.1", service_port, service_log, env) as service,
        httpx.Client(base_url=service_url, timeout=30) as client,
    ):
        _wait_for(
            "service ready", lambda: client.get("/readyz").status_code == 200, 60, service_log
        )
        timings["service ready"] = time.monotonic() - started
        config = _prometheus_config(tmp_path, service_port)
        with _prometheus(config, tmp_path) as (api, log):
            timings["prometheus ready"] = time.monotonic() - started

            def traffic_recorded() -> float | None:
                """One good search, one bad upload (400) and one unknown product (404)."""
                files = {"image": ("query.jpg", photo, "image/jpeg")}
                assert client.post(SEARCH_ROUTE, files=files).status_code == 200
                bad = {"image": ("query.jpg", b"not a photo", "image/jpeg")}
                assert client.post(SEARCH_ROUTE, files=bad).status_code == 400
                assert client.get("/v1/products/NO-SUCH-PRODUCT").status_code == 404
                rate = _value(api, RATE_QUERY)
                return rate if rate and rate > 0 else None

            rate = _wait_for(f"a value of {RATE_QUERY}", traffic_recorded, 30, log)
            timings["rate recorded"] = time.monotonic() - started
            assert _value(api, 'up{job="vitrine-search"}') == 1
            assert _value(api, 'vitrine_ready{job="vitrine-search"}') == 1
            # Probes and scrapes are left out: the API traffic is searches and product look-ups,
            # a third of them 400 and a third 404, none 5xx.
            # Rule groups are evaluated on their own ticks: wait for each figure to appear.
            ratio_query = "job:vitrine_http_requests_4xx:ratio_rate5m"
            ratio_4xx = _wait_for(ratio_query, lambda: _value(api, ratio_query), 15, log)
            assert 0.3 < ratio_4xx < 0.9, ratio_4xx
            ratio_5xx = "job:vitrine_http_requests_5xx:ratio_rate5m"
            _wait_for(ratio_5xx, lambda: _value(api, ratio_5xx) is not None, 15, log)
            assert _value(api, ratio_5xx) == 0
            p95_query = (
                "route:vitrine_http_request_seconds:histogram_quantile_rate5m"
                f'{{route="{SEARCH_ROUTE}",quantile="0.95"}}'
            )
            p95 = _wait_for(p95_query, lambda: _value(api, p95_query), 15, log)
            assert 0 < p95 <= 10, p95
            assert _vitrine_down(api) is None, "VitrineDown while the service is up"

            service.terminate()
            service.wait(timeout=20)
            stopped = time.monotonic()
            states: dict[str, float] = {}

            def down_firing() -> dict | None:
                alert = _vitrine_down(api)
                if alert:
                    states.setdefault(alert["state"], time.monotonic() - stopped)
                return alert if alert and alert["state"] == "firing" else None

            alert = _wait_for("VitrineDown firing", down_firing, 30, log)
    timings |= {f"VitrineDown {state} after stop": s for state, s in states.items()}
    timings["total"] = time.monotonic() - started
    print(f"search rate {rate:.2f}/s, p95 {p95 * 1000:.0f} ms; timings (s): {timings}")
    assert "pending" in states, f"VitrineDown never seen pending before firing: {states}"
    assert states["pending"] <= states["firing"]
    assert alert["labels"]["instance"] == f"127.0.0.1:{service_port}"
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == (
        f"Vitrine search service is down on 127.0.0.1:{service_port}"
    )
