"""How the service watches itself: the recall canary reproduces the index step's figure and
falls when the model breaks; the drift gauge stays low for catalogue-like queries and rises
for others; and a night's outcome as Prometheus metrics (textfile, Pushgateway)."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from components.night_metrics import publish_night
from serving.app import create_app
from serving.embedder import Embedder
from tests.test_serving_api import ADMIN, World, world  # noqa: F401  (the module fixture)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture()
def client(world: World):  # noqa: F811
    app = create_app(world.settings(canary_interval_s=0))
    with TestClient(app) as test_client:
        for _ in range(100):
            if test_client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        yield test_client


def test_the_canary_reproduces_the_index_steps_recall(client: TestClient) -> None:
    result = client.post("/v1/admin/canary", headers=ADMIN).json()
    assert result["probes"] > 0 and result["unreadable"] == 0
    assert result["recall"]["recall@10"] == pytest.approx(result["expected"]["recall@10"], abs=0.05)
    assert result["recall"]["recall@1"] == pytest.approx(result["expected"]["recall@1"], abs=0.1)
    samples = _samples(client.get("/metrics").text)
    assert samples[("vitrine_canary_recall", (("k", "10"),))] == result["recall"]["recall@10"]
    floor = samples[("vitrine_canary_floor", ())]
    assert floor == pytest.approx(max(0.0, result["expected"]["recall@10"] - 0.05))
    assert client.get("/v1/info").json()["canary"]["probes"] == result["probes"]
    assert client.post("/v1/admin/canary").status_code == 401


def test_a_broken_model_shows_on_the_canary(client: TestClient, world: World) -> None:  # noqa: F811
    healthy = client.post("/v1/admin/canary", headers=ADMIN).json()
    # The service now embeds queries with other weights than the collection was built with,
    # as a wrong package or a preprocessing change would.
    client.app.state.holder.current.embedder = Embedder(world.packages["c"])
    broken = client.post("/v1/admin/canary", headers=ADMIN).json()
    assert broken["recall"]["recall@1"] < healthy["recall"]["recall@1"] - 0.2
    samples = _samples(client.get("/metrics").text)
    assert samples[("vitrine_canary_recall", (("k", "1"),))] == broken["recall"]["recall@1"]


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_drift_stays_low_for_catalogue_photos_and_rises_for_others(
    client: TestClient,
    world: World,  # noqa: F811
) -> None:
    def search(data: bytes) -> None:
        answer = client.post("/v1/search/image", files={"image": ("q.jpg", data, "image/jpeg")})
        assert answer.status_code == 200, answer.text

    assert client.get("/v1/info").json()["drift"]["distance"] is None  # too few queries yet
    with world.validated.open(newline="") as handle:
        photos = [Path(row["image_uri"]) for row in csv.DictReader(handle)]
    queries = (photos * 2)[:40]  # every catalogue photo (repeats come from the cache)
    for photo in queries:
        search(photo.read_bytes())
    drift = client.get("/v1/info").json()["drift"]
    assert drift["queries"] == 40 and drift["distance"] < drift["threshold"], drift

    rng = np.random.default_rng(0)
    for _ in range(256):  # a window of queries unlike any catalogue photo
        pixels = rng.integers(0, 255, size=(96, 96, 3), dtype=np.uint8)
        pixels[:, :48] = pixels[:, :48] // 8  # dark left half, noise right half
        search(_jpeg(Image.fromarray(pixels)))
    drift = client.get("/v1/info").json()["drift"]
    assert drift["distance"] > drift["threshold"], drift
    samples = _samples(client.get("/metrics").text)
    assert samples[("vitrine_query_drift", ())] == pytest.approx(drift["distance"])
    assert samples[("vitrine_query_drift_threshold", ())] == pytest.approx(drift["threshold"])


def test_a_nights_outcome_as_metrics(tmp_path: Path) -> None:
    outcome = {
        "outcome": "promoted",
        "finished_ts": 1_790_000_000.0,
        "last_success_ts": 1_790_000_000.0,
        "consecutive_rejections": 0,
        "valid_rows": 480,
        "quarantined_rows": 12,
        "candidate_metrics": {"inshop": {"recall@1": 0.87, "recall@10": 1.0}, "seconds": 3.0},
        "production_metrics": {"inshop": {"recall@1": 0.80, "recall@10": 0.99}},
        "index_seconds": 15.5,
        "collection_rows": 480,
    }
    published = publish_night(outcome, tmp_path, pushgateway="http://127.0.0.1:9")
    assert published["pushgateway"] is None and "push_error" in published  # logged, not raised
    samples = _samples(Path(published["textfile"]).read_text())
    recall = "vitrine_nightly_recall"
    assert samples[(recall, (("k", "1"), ("model", "candidate"), ("set", "inshop")))] == 0.87
    assert samples[(recall, (("k", "10"), ("model", "production"), ("set", "inshop")))] == 0.99
    assert samples[("vitrine_nightly_rows", (("state", "quarantined"),))] == 12
    assert samples[("vitrine_nightly_gate_promoted", ())] == 1
    assert samples[("vitrine_nightly_last_success_timestamp_seconds", ())] == 1_790_000_000.0
    assert samples[("vitrine_nightly_outcome", (("outcome", "promoted"),))] == 1
    assert samples[("vitrine_nightly_index_build_seconds", ())] == 15.5

    rejected = publish_night(
        {"outcome": "rejected", "finished_ts": 1.0, "consecutive_rejections": 3}, tmp_path
    )
    samples = _samples(Path(rejected["textfile"]).read_text())
    assert samples[("vitrine_nightly_gate_consecutive_rejections", ())] == 3
    assert samples[("vitrine_nightly_gate_promoted", ())] == 0
    assert ("vitrine_nightly_last_success_timestamp_seconds", ()) not in samples
