"""A night's metrics pushed to a real Pushgateway (Debian `prometheus-pushgateway`), the way
Prometheus users publish batch jobs: each push replaces the previous night's group."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from components.night_metrics import JOB, publish_night
from tests.live_server import free_port

PUSHGATEWAY = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
pytestmark = pytest.mark.skipif(
    PUSHGATEWAY is None,
    reason="no Pushgateway (Debian package prometheus-pushgateway; make system-deps)",
)


@pytest.fixture()
def pushgateway(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "pushgateway.log").open("wb")
    process = subprocess.Popen(
        [str(PUSHGATEWAY), f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (tmp_path / "pushgateway.log").read_text()
            assert time.monotonic() < deadline, "the Pushgateway did not start in 20 s"
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def _nightly(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "instance"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("vitrine_nightly") and s.labels.get("job") == JOB
    }


def test_each_night_replaces_the_last_in_the_pushgateway(pushgateway: str, tmp_path: Path) -> None:
    promoted = {
        "outcome": "promoted",
        "finished_ts": 1_790_000_000.0,
        "last_success_ts": 1_790_000_000.0,
        "valid_rows": 480,
        "quarantined_rows": 12,
        "candidate_metrics": {"sop": {"recall@1": 0.83}},
        "index_seconds": 15.0,
        "collection_rows": 480,
    }
    published = publish_night(promoted, tmp_path, pushgateway)
    assert published["pushgateway"] == pushgateway
    night = _nightly(pushgateway)
    job = ("job", JOB)
    assert night[("vitrine_nightly_gate_promoted", (job,))] == 1
    assert night[("vitrine_nightly_rows", (job, ("state", "valid")))] == 480
    recall = ("vitrine_nightly_recall", (job, ("k", "1"), ("model", "candidate"), ("set", "sop")))
    assert night[recall] == 0.83

    rejected = {
        "outcome": "rejected",
        "finished_ts": 1_790_086_400.0,
        "last_success_ts": 1_790_000_000.0,
        "consecutive_rejections": 1,
        "valid_rows": 481,
        "quarantined_rows": 12,
    }
    publish_night(rejected, tmp_path, pushgateway)
    night = _nightly(pushgateway)
    assert night[("vitrine_nightly_gate_promoted", (job,))] == 0
    assert night[("vitrine_nightly_gate_consecutive_rejections", (job,))] == 1
    assert night[("vitrine_nightly_last_success_timestamp_seconds", (job,))] == 1_790_000_000.0
    assert recall not in night  # the whole group was replaced: no stale figures linger
    assert ("vitrine_nightly_index_build_seconds", (job,)) not in night
