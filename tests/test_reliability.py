"""Reliability and security of the search service, end to end over real parts.

What the functional tests (tests/test_serving_api.py, test_serving_uploads.py,
test_index_step.py, test_milvus_server.py) do not already show:

1. the whole HTTP API fuzzed from its own OpenAPI schema (schemathesis): no 5xx and every
   error a JSON ``{"error": {"code", "message"}}``;
2. a barrage of hostile requests (decompression bombs through every upload route, corrupt
   PNGs, wrong bodies, absurd ``top_k``, filter-expression injection, path tricks), each a 4xx
   JSON error, and the service still answers afterwards;
3. ``vitrine index`` killed with SIGKILL half-way: the alias and the service stay on the
   previous collection, and a rerun finishes and removes the killed build's orphan, even
   after a refused rollout of that orphan (the service lets go of what it refused);
4. a corrupt model package offered for rollout: refused with 409, the old pair keeps serving;
5. admin endpoints without or with a wrong token: 401/403, and no token in any log line or
   response body;
6. load: 16 concurrent clients for 60 s against a real ``vitrine serve`` child on loopback,
   no error, p50/p95/p99 and throughput printed and written to JSON (``pytest -s``).

The fixtures are tests/test_serving_api.py's (a validated demo catalogue of 12 products x 3
photos, tiny random-weight model packages, Milvus Lite collections built by the index step).
"""

# ruff: noqa: F811  (test functions take the imported `world` fixture as a parameter)

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from components.catalog.bad_rows import write_png_bomb
from components.demo import search_service
from components.index import _finished, collection_name
from model.package import WEIGHTS_FILE, ModelConfig, build_model, save_package
from serving.app import create_app
from serving.store import VectorStore
from tests.conftest import TINY_BACKBONE
from tests.live_server import free_port, serve_in_thread
from tests.test_serving_api import (
    ADMIN,
    PRODUCTS,
    World,
    _assert_good_search,
    _build,
    _error,
    _new_product_photo,
    _ok,
    _search,
    _wait_ready,
    world,  # noqa: F401  (the fixture: this module gets its own module-scoped instance)
)

REPO = Path(__file__).resolve().parents[1]
IMAGE = "/v1/search/image"
# Generated requests per operation, per generation mode (schema-valid and schema-invalid data)
# and per variant: about 1,300 requests in all, 15-20 s on 2 CPU cores.
FUZZ_EXAMPLES = int(os.environ.get("VITRINE_FUZZ_EXAMPLES", "50"))
LOAD_CLIENTS = int(os.environ.get("VITRINE_LOAD_CLIENTS", "16"))
LOAD_SECONDS = float(os.environ.get("VITRINE_LOAD_SECONDS", "60"))


def _say(message: str) -> None:
    print(f"[reliability] {message}", flush=True)


def _pair(body: dict) -> tuple[str, str]:
    return body["model_version"], body["collection"]


def _json_error(status: int, content_type: str, body: bytes) -> str | None:
    """Why an error answer is not ``{"error": {"code", "message"}}`` JSON (None: it is)."""
    if status < 400:
        return None
    if not content_type.startswith("application/json"):
        return f"{status} answered with content type {content_type!r}: {body[:200]!r}"
    try:
        error = json.loads(body)["error"]
        assert isinstance(error["code"], str) and error["code"]
        assert isinstance(error["message"], str) and error["message"]
    except (ValueError, KeyError, TypeError, AssertionError):
        return f"{status} answered without an error code and message: {body[:300]!r}"
    return None


# --- 1. fuzzing the API from its OpenAPI schema -------------------------------------------


def test_fuzz_the_api_from_its_openapi_schema(world: World) -> None:
    """Every operation of /openapi.json, with schema-valid and schema-invalid requests (and
    admin ones both with the generated headers and with the right token): no 5xx, no error
    without a JSON body. Nothing is excluded; /metrics and / are not in the schema."""
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.python import asgi

    # Its own Milvus folder: the fuzzer adds and removes products and rolls the service out.
    milvus = world.root / "fuzz_milvus"
    _build(world, world.packages["a"], milvus)
    app = create_app(world.settings(milvus_uri=str(milvus), canary_interval_s=0))
    photo, new_photo = world.photo("P00001"), _new_product_photo()

    def json_errors(ctx, response, case) -> None:
        """A schemathesis check: errors are ``{"error": {"code", "message"}}`` JSON."""
        problem = _json_error(
            response.status_code, response.headers.get("content-type", [""])[0], response.content
        )
        if problem:
            raise AssertionError(problem)

    checks = [not_a_server_error, json_errors]
    counts: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    started = time.perf_counter()
    # The schema is fetched through schemathesis' ASGI client, which also runs the app's
    # lifespan (model and store opened) until shutdown_lifespans() below.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    try:
        with asgi.get_client(app) as client:
            deadline = time.monotonic() + 60
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the fuzzed service was not ready in 60 s"
                time.sleep(0.05)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 11, [op.label for op in operations]

        def with_photo(image: bytes) -> Callable:
            def swap(case):  # a real photo in the upload, every other field still generated
                if isinstance(case.body, dict):
                    case.body = {**case.body, "image": image}
                return case

            return swap

        # (operation, variant, strategy per generation mode)
        plans: list[tuple[Any, str, Callable]] = []
        for op in operations:
            plans.append((op, "as generated", lambda mode, op=op: op.as_strategy(mode)))
        by_label = {op.label: op for op in operations}
        search_image = by_label["POST /v1/search/image"]
        add_product = by_label["POST /v1/admin/products"]
        search_product = by_label["GET /v1/search/product/{product_id}"]
        plans += [
            # Admin adds first, so the searches below read back the fuzzed fields they stored.
            (
                add_product,
                "new photo",
                lambda m: add_product.as_strategy(m).map(with_photo(new_photo)),
            ),
            (
                search_image,
                "real photo",
                lambda m: search_image.as_strategy(m).map(with_photo(photo)),
            ),
            (
                search_product,
                "real product",
                lambda m: search_product.as_strategy(m, path_parameters={"product_id": "P00002"}),
            ),
        ]
        fuzz_settings = settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,  # the same requests every run
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
        )

        def fuzz(label: str, strategy) -> None:
            # Admin operations: once with the generated (mostly wrong) credentials, once with
            # the right token so that the route itself is fuzzed.
            credentials = [None, ADMIN] if label.split()[1].startswith("/v1/admin/") else [None]

            @fuzz_settings
            @given(case=strategy)
            def send(case) -> None:
                for headers in credentials:
                    response = case.call_and_validate(headers=headers, checks=checks, timeout=30)
                    counts[label] += 1
                    statuses[response.status_code] += 1

            send()

        for op, variant, strategy in plans:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    fuzz(op.label, strategy(mode))
                except Unsatisfiable:
                    # Nothing in this operation's schema can be made invalid (no parameters,
                    # or only free-form strings): there is no negative case to send.
                    assert mode is GenerationMode.NEGATIVE, (op.label, variant)
        with asgi.get_client(app) as client:
            assert client.get("/readyz").status_code == 200
            after = client.post("/v1/search/image", files={"image": ("q.jpg", photo, "image/jpeg")})
            assert after.status_code == 200, after.text
    finally:
        asgi.shutdown_lifespans()
    seconds = time.perf_counter() - started
    total = sum(counts.values())
    _say(
        f"fuzz: {total} requests over {len(counts)} operations in {seconds:.1f} s "
        f"(hypothesis {hypothesis.__version__}, schemathesis {schemathesis.__version__}); "
        f"statuses {dict(sorted(statuses.items()))}"
    )
    assert set(counts) == {op.label for op in operations}
    assert total >= 11 * FUZZ_EXAMPLES
    assert not [status for status in statuses if status >= 500]


# --- 2. hostile requests ------------------------------------------------------------------


def _png(size: tuple[int, int] = (64, 48)) -> bytes:
    pixels = np.random.default_rng(7).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _corrupt_png() -> bytes:
    """A PNG whose header and chunk layout are intact but whose compressed pixels are not."""
    data = bytearray(_png())
    start = data.index(b"IDAT") + 4
    for offset in range(start + 16, min(start + 400, len(data) - 16)):
        data[offset] ^= 0x5A
    return bytes(data)


@pytest.fixture
def service(world: World) -> Iterator[TestClient]:
    """The service over the world's first collection, admin enabled, canary on demand only
    (closed after each test: Milvus Lite lets one process at a time open a collection)."""
    with TestClient(create_app(world.settings(canary_interval_s=0))) as client:
        _wait_ready(client)
        yield client


def test_hostile_requests_are_4xx_json_and_the_service_goes_on(
    service: TestClient, world: World, tmp_path: Path
) -> None:
    """Only what tests/test_serving_api.py does not send already."""
    client = service
    photo = world.photo("P00001")
    jpeg = world.photo("P00002")
    bomb = write_png_bomb(tmp_path / "bomb.png", 20_000, 20_000).read_bytes()
    # Under Pillow's own bomb limit (89 M pixels), over ours (40 M): only our check stops it.
    our_bomb = write_png_bomb(tmp_path / "our_bomb.png", 8_000, 8_000).read_bytes()
    assert len(bomb) < 500_000 and len(our_bomb) < 100_000
    rows = _ok(client.get("/v1/info"))["rows"]

    def add(data: bytes, content_type: str = "image/jpeg"):
        form = {"product_id": "HOSTILE", "category": "x", "title": "x", "price": "1"}
        files = {"image": ("a.png", data, content_type)}
        return client.post("/v1/admin/products", files=files, data=form, headers=ADMIN)

    injection = 'x" || product_id != "'
    octets, text = "application/octet-stream", {"content-type": "text/plain"}
    multipart = {"content-type": "multipart/form-data; boundary=x"}
    get, post, search = client.get, client.post, partial(_search, client)
    delete = partial(client.delete, headers=ADMIN)
    product = "/v1/search/product/P00001"
    cases: list[tuple[str, Callable[[], httpx.Response], int, str]] = [
        # Decompression bombs, through every route that decodes an upload.
        ("bomb, no type", lambda: search(bomb, octets), 413, "too_many_pixels"),
        ("bomb under Pillow's limit", lambda: search(our_bomb), 413, "too_many_pixels"),
        ("bomb as an admin add", lambda: add(bomb, "image/png"), 413, "too_many_pixels"),
        ("bomb as text", lambda: search(bomb, "text/plain"), 415, "unsupported_media_type"),
        # Broken files.
        ("corrupt PNG pixels", lambda: search(_corrupt_png(), "image/png"), 400, "corrupt_image"),
        ("PNG signature only", lambda: search(b"\x89PNG\r\n\x1a\n"), 400, "corrupt_image"),
        ("GIF", lambda: search(_gif(), "image/gif"), 415, "unsupported_media_type"),
        ("zero bytes, admin add", lambda: add(b""), 400, "empty_upload"),
        ("truncated JPEG, admin add", lambda: add(jpeg[: len(jpeg) // 3]), 400, "corrupt_image"),
        # Wrong bodies.
        ("JSON body", lambda: post(IMAGE, json={"image": "x"}), 422, "invalid_request"),
        ("text body", lambda: post(IMAGE, content=photo, headers=text), 422, "invalid_request"),
        ("image as text field", lambda: post(IMAGE, data={"image": "x"}), 422, "invalid_request"),
        (
            "bad multipart",
            lambda: post(IMAGE, content=b"--x", headers=multipart),
            422,
            "invalid_request",
        ),
        # Absurd parameters.
        ("top_k -1", lambda: search(photo, top_k=-1), 422, "invalid_top_k"),
        ("top_k abc", lambda: search(photo, top_k="abc"), 422, "invalid_request"),
        ("top_k 1.5", lambda: search(photo, top_k="1.5"), 422, "invalid_request"),
        ("top_k max + 1", lambda: search(photo, top_k=101), 422, "invalid_top_k"),
        ("top_k 10**30", lambda: search(photo, top_k=10**30), 422, "invalid_top_k"),
        ("price 1e309", lambda: search(photo, price_min="1e309"), 422, "invalid_request"),
        ("product top_k -1", lambda: get(product, params={"top_k": -1}), 422, "invalid_top_k"),
        ("product top_k abc", lambda: get(product, params={"top_k": "x"}), 422, "invalid_request"),
        (
            "product -inf",
            lambda: get(product, params={"price_max": "-inf"}),
            422,
            "invalid_request",
        ),
        # Unknown ids: Milvus filter-expression injection, path tricks, odd bytes and sizes.
        ("injected product", lambda: get(f"/v1/products/{injection}"), 404, "unknown_product"),
        ("injected search", lambda: get(f"/v1/search/product/{injection}"), 404, "unknown_product"),
        ("injected image", lambda: get('/v1/images/x" || image_id != "'), 404, "unknown_image"),
        (
            "injected delete",
            lambda: delete(f"/v1/admin/products/{injection}"),
            404,
            "unknown_product",
        ),
        # An image id is looked up in the collection, never used as a path: no row, no file.
        ("traversal", lambda: get("/v1/images/..%2F..%2F..%2Fetc%2Fpasswd"), 404, "unknown_image"),
        ("NUL in product id", lambda: get("/v1/products/P00001%00"), 404, "unknown_product"),
        ("10 kB product id", lambda: get("/v1/products/" + "P" * 10_000), 404, "unknown_product"),
        ("unknown method", lambda: client.put("/v1/info"), 405, "method_not_allowed"),
    ]
    failures = []
    for name, send, status, code in cases:
        response = send()
        try:
            _error(response, status, code)
        except AssertionError as err:
            failures.append(f"{name}: {err}")
    assert not failures, "\n".join(failures)

    # An injected category filter matches nothing (it is a string literal, not an expression).
    params = {"category": '" || category != "', "top_k": 12}
    assert _ok(client.get("/v1/search/product/P00001", params=params))["results"] == []
    # Nothing was added or removed, and the service answers as before.
    assert _ok(client.get("/v1/info"))["rows"] == rows
    _ok(client.get("/readyz"))
    _assert_good_search(client, world)
    metrics = client.get("/metrics").text
    assert 'vitrine_errors_total{kind="too_many_pixels"} 3.0' in metrics
    server_errors = [
        line
        for line in metrics.splitlines()
        if line.startswith("vitrine_http_requests_total")
        and 'status="5' in line
        and 'route="/readyz"' not in line  # 503 while the fixture waited for the model
    ]
    assert server_errors == []


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="GIF")
    return buffer.getvalue()


# --- 3. the index step killed half-way ----------------------------------------------------


def _vitrine(*args: str) -> list[str]:
    return [sys.executable, "-m", "components.cli", *args]


def _kill_index_half_way(
    world: World, milvus: Path, log_path: Path, timeout: float = 120
) -> tuple[str, str, float]:
    """Run ``vitrine index`` and SIGKILL it (its whole process group) once its new collection
    holds rows; return the killed build's collection, how far it had gone, and when.

    Its whole window (collection created, rows in, indexed, verified, metadata written) is
    about 0.15 s with this catalogue, so the folder is polled every millisecond.
    """
    before = {path.name for path in milvus.glob("vitrine_*.db")}
    command = _vitrine("index", str(world.validated), "--package", str(world.packages["a"]))
    command += ["--uri", str(milvus), "--device", "cpu", "--quiet"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    started = time.monotonic()
    try:
        new: list[str] = []
        while not new:
            new = sorted({p.name for p in milvus.glob("vitrine_*.db")} - before)
            if not new and process.poll() is not None:
                pytest.fail(
                    f"vitrine index exited ({process.returncode}) before its collection "
                    f"appeared:\n{log_path.read_text()[-2000:]}"
                )
            assert time.monotonic() - started < timeout, f"no new collection in {timeout} s"
            time.sleep(0.001)
        name = new[0].removesuffix(".db")
        # Rows in: Milvus Lite has written the collection's first data file.
        wal = milvus / new[0] / "collections" / name / "wal"
        deadline = time.monotonic() + 10
        stage = "the collection's database created, no rows yet"
        while process.poll() is None and time.monotonic() < deadline:
            if wal.is_dir() and any(wal.iterdir()):
                stage = "rows inserted"
                break
            time.sleep(0.001)
        killed_after = time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone: the build finished
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    return name, stage, killed_after


def test_index_killed_half_way_leaves_the_service_and_a_rerun_cleans_up(
    world: World, tmp_path: Path
) -> None:
    milvus = tmp_path / "milvus"
    first = _build(world, world.packages["a"], milvus)
    served = first["collection"]
    settings = world.settings(milvus_uri=str(milvus), canary_interval_s=0)
    with TestClient(create_app(settings)) as client:
        _wait_ready(client)
        # The build's window is short: on a busy machine a build may finish before the kill
        # lands. Then it is simply the served collection now, and the next attempt kills.
        for attempt in range(3):
            log_path = tmp_path / f"kill{attempt}.log"
            orphan, stage, after = _kill_index_half_way(world, milvus, log_path)
            store = VectorStore(str(milvus))
            try:
                if store.alias_target() == served:
                    break
                _say(f"attempt {attempt}: the build finished before SIGKILL; again")
                served = store.alias_target()
                # The service follows, so that it serves the complete collection the next
                # attempt's kill must leave alone.
                rolled = _ok(client.post("/v1/admin/rollout", headers=ADMIN))
                assert rolled["serving"]["collection"] == served
            finally:
                store.close()
        else:
            pytest.fail(
                "three builds finished before SIGKILL reached them (or Milvus Lite no longer "
                "writes <collection>.db/collections/<collection>/wal)"
            )
        _say(f"vitrine index SIGKILLed {after:.1f} s after its start ({stage}): {orphan}")

        store = VectorStore(str(milvus))
        try:
            assert store.alias_target() == served
            assert store.collections()[-1] == orphan
            assert not _finished(store, orphan), "the killed build recorded its metadata"
        finally:
            store.close()
        # The running service never noticed; a fresh one starts on the previous collection.
        assert _pair(_assert_good_search(client, world))[1] == served
        with TestClient(create_app(settings)) as fresh:
            assert _wait_ready(fresh)["collection"] == served
            _assert_good_search(fresh, world)

        summary = _run_index(world, milvus, tmp_path / "rerun.json")
        assert summary["previous"] == served
        assert orphan in summary["removed"], summary["removed"]
        assert not list(milvus.glob(f"{orphan}*")), "the orphan's files are still there"
        store = VectorStore(str(milvus))
        try:
            assert store.alias_target() == summary["collection"]
            assert orphan not in store.collections()
            assert served in store.collections()  # kept for rollback
        finally:
            store.close()
        # The running service moves to the rerun's collection on rollout.
        done = _ok(client.post("/v1/admin/rollout", headers=ADMIN))
        assert done["serving"]["collection"] == summary["collection"]
        assert _pair(_assert_good_search(client, world))[1] == summary["collection"]


def _run_index(world: World, milvus: Path, summary: Path) -> dict:
    """``vitrine index`` in a child process, as the nightly job runs it beside the service."""
    command = _vitrine("index", str(world.validated), "--package", str(world.packages["a"]))
    command += ["--uri", str(milvus), "--device", "cpu", "--quiet", "--json", str(summary)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return json.loads(summary.read_text())


def test_a_refused_rollout_does_not_keep_the_orphan_alive(world: World, tmp_path: Path) -> None:
    milvus = tmp_path / "milvus"
    _build(world, world.packages["a"], milvus)
    # What a killed build leaves (see the test above): rows, no index, no build metadata.
    orphan = collection_name("killed")
    store = VectorStore(str(milvus))
    store.create_collection(orphan, 24)
    store.insert(orphan, [{"image_id": "half", "embedding": [0.2] * 24}])
    store.close()
    settings = world.settings(milvus_uri=str(milvus), canary_interval_s=0)
    with TestClient(create_app(settings)) as client:
        _wait_ready(client)
        refused = client.post("/v1/admin/rollout", json={"collection": orphan}, headers=ADMIN)
        assert "does not record" in _error(refused, 409, "rollout_refused")["message"]
        summary = _run_index(world, milvus, tmp_path / "rerun.json")
        assert orphan in summary["removed"], f"{orphan} kept: {summary['removed']}"


# --- 4. a corrupt model package offered for rollout ---------------------------------------


def _other_package(directory: Path) -> Path:
    """A valid package of another shape: 16-d embeddings instead of 24."""
    torch.manual_seed(99)
    config = ModelConfig(backbone=TINY_BACKBONE, weights="none", embed_dim=16, pooling="gem")
    return save_package(build_model(config).eval(), config, directory)


def test_rollout_of_a_corrupt_model_package_is_refused(world: World, tmp_path: Path) -> None:
    milvus = tmp_path / "milvus"
    _build(world, world.packages["a"], milvus)
    package = tmp_path / "packages" / "tiny-doomed"
    shutil.copytree(world.packages["a"], package)
    weights = package / WEIGHTS_FILE
    good = weights.read_bytes()
    other = _other_package(tmp_path / "packages" / "tiny-16d")
    settings = world.settings(milvus_uri=str(milvus), canary_interval_s=0)
    with TestClient(create_app(settings)) as client:
        _wait_ready(client)
        serving = _pair(_ok(client.get("/v1/info")))
        target = _build(world, package, milvus)["collection"]  # the alias moves to it

        def truncated() -> None:
            weights.write_bytes(good[: len(good) // 2])

        def garbage() -> None:
            weights.write_bytes(np.random.default_rng(0).bytes(len(good)))

        def empty() -> None:
            weights.write_bytes(b"")

        def wrong_shapes() -> None:  # another model's weights: a valid file, wrong tensors
            shutil.copyfile(other / WEIGHTS_FILE, weights)

        def bad_config() -> None:
            weights.write_bytes(good)
            (package / "config.json").write_text("{not json")

        def other_dim() -> None:  # a whole valid package, but its embeddings are 16-d
            shutil.copyfile(other / "config.json", package / "config.json")
            shutil.copyfile(other / WEIGHTS_FILE, weights)

        for corrupt in (truncated, garbage, empty, wrong_shapes, bad_config, other_dim):
            corrupt()
            for body in (None, {"collection": target}):
                response = client.post("/v1/admin/rollout", json=body, headers=ADMIN)
                error = _error(response, 409, "rollout_refused")
                assert "still serving the previous pair" in error["message"], error
                assert str(package) in error["message"] or target in error["message"], error
            assert _pair(_ok(client.get("/v1/info"))) == serving, corrupt.__name__
            assert _pair(_assert_good_search(client, world)) == serving, corrupt.__name__
            _ok(client.get("/readyz"))
        metrics = client.get("/metrics").text
        assert 'vitrine_rollouts_total{outcome="refused"} 12.0' in metrics

        # Repaired, the same collection rolls out: nothing was left stuck.
        shutil.copyfile(world.packages["a"] / "config.json", package / "config.json")
        weights.write_bytes(good)
        done = _ok(client.post("/v1/admin/rollout", headers=ADMIN))
        assert done["serving"]["collection"] == target
        assert _pair(_assert_good_search(client, world))[1] == target


# --- 5. admin tokens and the logs ---------------------------------------------------------


@contextlib.contextmanager
def _live(app) -> Iterator[str]:
    """``app`` under a real uvicorn server on a free loopback port, logging through the
    standard ``logging`` tree (so pytest's caplog sees the access log too)."""
    with serve_in_thread(app, log_config=None, log_level="debug", access_log=True) as url:
        yield url


def test_admin_tokens_never_reach_the_logs_or_the_answers(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    token = f"vitrine-admin-{secrets.token_hex(16)}"
    wrong = f"not-the-token-{secrets.token_hex(16)}"
    near = token + "x"  # the right token as a prefix
    caplog.set_level(logging.DEBUG)
    settings = world.settings(admin_token=token, canary_interval_s=0)
    photo = _new_product_photo()
    endpoints: list[tuple[str, str, dict]] = [
        ("POST", "/v1/admin/rollout", {"json": {}}),
        ("POST", "/v1/admin/canary", {}),
        ("DELETE", "/v1/admin/products/NOPE", {}),
        (
            "POST",
            "/v1/admin/products",
            {
                "files": {"image": ("x.jpg", b"not an image", "image/jpeg")},
                "data": {"product_id": "X", "category": "x", "title": "x", "price": "1"},
            },
        ),
    ]
    credentials: list[tuple[dict[str, str], set[int]]] = [
        ({}, {401}),
        ({"Authorization": "Basic " + token}, {401}),  # not a bearer token: none given
        ({"Authorization": f"Bearer {wrong}"}, {403}),
        ({"Authorization": f"Bearer {near}"}, {403}),
        ({"X-Admin-Token": wrong}, {403}),
        ({"X-Admin-Token": token[:-1]}, {403}),
        ({"Authorization": f"Bearer {token}"}, {200, 400, 404}),
        ({"authorization": f"bearer {token}"}, {200, 400, 404}),
        ({"X-Admin-Token": token}, {200, 400, 404}),
    ]
    bodies: list[str] = []
    with _live(create_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as http:
        _wait_ready(http)
        for headers, expected in credentials:
            for method, path, options in endpoints:
                response = http.request(method, path, headers=headers, **options)
                assert response.status_code in expected, (headers, path, response.text)
                if response.status_code in (401, 403):
                    code = _error(response, response.status_code)["code"]
                    assert code == ("unauthorized" if response.status_code == 401 else "forbidden")
                bodies.append(response.text)
        # An admin add that works, then removed, with the token in the header.
        form = {"product_id": "TOKENTEST", "category": "x", "title": "x", "price": "1"}
        added = http.post(
            "/v1/admin/products",
            files={"image": ("x.jpg", photo, "image/jpeg")},
            data=form,
            headers={"Authorization": f"Bearer {token}"},
        )
        assert added.status_code == 201, added.text
        removed = http.delete("/v1/admin/products/TOKENTEST", headers={"X-Admin-Token": token})
        _ok(removed)
        for path in ("/v1/info", "/readyz", "/healthz", "/metrics", "/openapi.json", "/"):
            bodies.append(http.get(path).text)

    # The client's own loggers (httpx, httpcore) describe what this test sent; the rest is
    # the service: the app's loggers, uvicorn's error and access logs, Milvus, torch.
    service_records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    access = [r.getMessage() for r in service_records if r.name == "uvicorn.access"]
    assert any("/v1/admin/rollout" in line for line in access), "no access log was captured"
    logged = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.stack_info or ''}"
        for r in service_records
    )
    for secret in (token, wrong, near, token[:-1]):
        assert secret not in logged, f"a token is in the service's logs ({len(access)} lines)"
        assert not [body for body in bodies if secret in body], "a token is in an answer"
    _say(
        f"secrets: {len(service_records)} service log records, {len(bodies)} answers, "
        "no token in any"
    )


# --- 6. load ------------------------------------------------------------------------------


async def _load(url: str, world: World, clients: int, seconds: float) -> list[tuple]:
    """``clients`` concurrent loops of requests for ``seconds``: three image searches (the
    photos of every product in turn) for each search by product id. Returns
    ``(kind, status, seconds, right_product)`` per request."""
    photos = [
        (f"P{i:05d}", world.photo(f"P{i:05d}", shot)) for i in range(PRODUCTS) for shot in range(3)
    ]
    samples: list[tuple] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        deadline = time.monotonic() + seconds

        async def worker(number: int) -> None:
            n, turn = number, 0
            while time.monotonic() < deadline:
                product, photo = photos[n % len(photos)]
                kind = "product" if turn % 4 == 3 else "image"
                turn += 1
                started = time.perf_counter()
                try:
                    if kind == "product":
                        path = f"/v1/search/product/{product}"
                        response = await http.get(path, params={"top_k": 5})
                    else:
                        files = {"image": ("q.jpg", photo, "image/jpeg")}
                        response = await http.post(IMAGE, files=files, data={"top_k": "5"})
                except httpx.HTTPError as err:  # counted as an error, not a crash of the run
                    samples.append((kind, type(err).__name__, time.perf_counter() - started, False))
                    n += clients
                    continue
                seconds = time.perf_counter() - started
                hits = response.json()["results"] if response.status_code == 200 else []
                ids = [hit["product_id"] for hit in hits]
                # By image: the photo's own product first; by product: never the product itself.
                right = bool(ids) and (ids[0] == product if kind == "image" else product not in ids)
                samples.append((kind, response.status_code, seconds, right))
                n += clients

        await asyncio.gather(*(worker(i) for i in range(clients)))
    return samples


def _metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.slow
def test_load_16_clients_no_errors(world: World, tmp_path: Path) -> None:
    """A real ``vitrine serve`` child on loopback over the world's collection, query cache off
    (every upload is decoded and embedded), 16 clients for 60 s: every answer 200 and right."""
    token = f"vitrine-load-{secrets.token_hex(16)}"
    wrong = f"wrong-{secrets.token_hex(16)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITRINE_")}
    env |= {
        "VITRINE_ADMIN_TOKEN": token,
        "VITRINE_CACHE_SIZE": "0",
        "VITRINE_CANARY_INTERVAL_S": "0",
        "VITRINE_UPLOAD_DIR": str(tmp_path / "uploads"),
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "service.log"
    with search_service(str(world.milvus), "127.0.0.1", port, log_path, env):
        with httpx.Client(base_url=url, timeout=30) as http:
            ready = _wait_ready(http, timeout=120)
        started = time.perf_counter()
        samples = asyncio.run(_load(url, world, LOAD_CLIENTS, LOAD_SECONDS))
        elapsed = time.perf_counter() - started
        with httpx.Client(base_url=url, timeout=30) as http:
            metrics = http.get("/metrics").text
            for headers, status in (
                ({"Authorization": f"Bearer {wrong}"}, 403),
                ({}, 401),
                ({"X-Admin-Token": token}, 200),
            ):
                assert http.post("/v1/admin/canary", headers=headers).status_code == status
    statuses = Counter(status for _, status, _, _ in samples)
    latencies = np.array([seconds for *_, seconds, _ in samples]) * 1000
    report = {
        "clients": LOAD_CLIENTS,
        "seconds": round(elapsed, 1),
        "requests": len(samples),
        "requests_per_s": round(len(samples) / elapsed, 1),
        "requests_by_kind": dict(Counter(kind for kind, *_ in samples)),
        "statuses": {str(k): v for k, v in statuses.items()},
        "wrong_answers": sum(not right for *_, right in samples),
        "model_version": ready["model_version"],
        "collection": ready["collection"],
        "rows": ready["rows"],
        "cpu_count": os.cpu_count(),
        "mean_embed_batch": round(
            _metric(metrics, "vitrine_embed_batch_size_sum")
            / max(_metric(metrics, "vitrine_embed_batch_size_count"), 1),
            2,
        ),
    }
    for name, picked in (
        ("all", latencies),
        *((kind, latencies[[k == kind for k, *_ in samples]]) for kind in ("image", "product")),
    ):
        if len(picked):
            p50, p95, p99 = np.percentile(picked, [50, 95, 99])
            report[f"latency_ms_{name}"] = {
                "p50": round(float(p50), 1),
                "p95": round(float(p95), 1),
                "p99": round(float(p99), 1),
                "max": round(float(picked.max()), 1),
            }
    out = tmp_path / "load.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    lat = report["latency_ms_all"]
    _say(
        f"load: {LOAD_CLIENTS} clients, {len(samples)} requests in {elapsed:.0f} s = "
        f"{report['requests_per_s']} req/s; p50 {lat['p50']} ms, p95 {lat['p95']} ms, "
        f"p99 {lat['p99']} ms; statuses {report['statuses']}; report {out}"
    )
    assert statuses == {200: len(samples)}, report
    assert report["wrong_answers"] == 0, report
    assert len(samples) >= 10 * LOAD_CLIENTS, report
    assert _metric(metrics, "vitrine_embed_batch_size_count") > 0
    logged = log_path.read_text(errors="replace")
    assert "/v1/admin/canary" in logged  # uvicorn's access log is there
    assert token not in logged and wrong not in logged, "an admin token is in the service log"
