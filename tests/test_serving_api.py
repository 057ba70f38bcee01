"""The search service end to end over real parts: a tiny model package, a validated demo
catalogue, Milvus Lite collections built by the index step, and the FastAPI app (in-process
through TestClient, and under a real uvicorn server for the concurrent rollout)."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from components.catalog.bad_rows import write_png_bomb
from components.catalog.config import ImageLimits, ValidationConfig
from components.catalog.demo import generate_demo_catalog, make_products, photograph, render_product
from components.index import IndexBuildConfig, build_index
from components.validate import validate_catalog
from model.package import ModelConfig, build_model, package_version, save_package
from serving.app import ENVELOPE_BYTES, create_app
from serving.embedder import Embedder
from serving.routes import SearchResponse
from serving.settings import Settings
from serving.store import VectorStore
from tests.conftest import TINY_BACKBONE
from tests.live_server import serve_in_thread
from tests.test_lite_process import lite_pids

TOKEN = "t0ken"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
PRODUCTS = 12
SMALL_LIMIT = 20_000  # bytes: the catalogue photos (about 2-4 kB) fit, bigger uploads do not


@dataclass
class World:
    """What the module's tests share: folders, packages and the first collection."""

    root: Path
    catalogue: Path
    validated: Path
    milvus: Path
    packages: dict[str, Path]
    first: dict
    products: dict[str, dict[str, str]]

    def photo(self, product_id: str, shot: int = 0) -> bytes:
        return (self.catalogue / "images" / f"{product_id}_{shot}.jpg").read_bytes()

    def settings(self, **changes) -> Settings:
        values = {
            "milvus_uri": str(self.milvus),
            "admin_token": TOKEN,
            "upload_dir": str(self.root / "uploads"),
            "reload_interval_s": 0.1,
            "max_wait_ms": 1.0,
            **changes,
        }
        return Settings(_env_file=None, **values)  # a developer's .env must not leak in


def _package(directory: Path, seed: int) -> Path:
    """A tiny model package with random weights drawn from ``seed``."""
    torch.manual_seed(seed)
    config = ModelConfig(backbone=TINY_BACKBONE, weights="none", embed_dim=24, pooling="gem")
    return save_package(build_model(config).eval(), config, directory)


def _build(world: World, package: Path, uri: Path | None = None) -> dict:
    config = IndexBuildConfig(uri=str(uri or world.milvus))
    return build_index(world.validated, package, config, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("serving_api")
    packages = {
        name: _package(root / "packages" / f"tiny-{name}", seed)
        for seed, name in enumerate(("a", "b", "c"))
    }
    manifest = generate_demo_catalog(
        root / "catalogue", products=PRODUCTS, photos_per_product=3, progress=False, image_size=96
    )
    config = ValidationConfig(data_docs=False, images=ImageLimits(min_side=32))
    summary = validate_catalog(manifest, root / "validated", config, progress=False)
    assert summary["valid_products"] == PRODUCTS
    validated = Path(summary["outputs"]["validated"])
    with validated.open(newline="", encoding="utf-8") as handle:
        products = {row["product_id"]: row for row in csv.DictReader(handle)}
    world = World(root, manifest.parent, validated, root / "milvus", packages, {}, products)
    world.first = _build(world, packages["a"])
    return world


def _wait_ready(client: TestClient | httpx.Client, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get("/readyz")
        if response.status_code == 200:
            return response.json()
        assert time.monotonic() < deadline, f"not ready after {timeout} s: {response.text}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(world: World) -> Iterator[TestClient]:
    """The service over the first collection, admin enabled."""
    with TestClient(create_app(world.settings())) as client:
        _wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def strict_client(world: World) -> Iterator[TestClient]:
    """A second service over the same Milvus folder with a small upload limit, admin off."""
    settings = world.settings(admin_token="", max_upload_bytes=SMALL_LIMIT)
    with TestClient(create_app(settings)) as client:
        _wait_ready(client)
        yield client


def _search(client, data: bytes, content_type: str = "image/jpeg", **form) -> httpx.Response:
    files = {"image": ("query.jpg", data, content_type)}
    return client.post("/v1/search/image", files=files, data={k: str(v) for k, v in form.items()})


def _ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def _error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """Assert a JSON error ``{"error": {"code", "message"}}`` with ``status``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def _assert_good_search(client, world: World, product_id: str = "P00004") -> dict:
    body = _ok(_search(client, world.photo(product_id, 1), top_k=3))
    assert body["results"][0]["product_id"] == product_id
    return body


def _new_product_photo(seed: int = 123) -> bytes:
    """A photo of a product the catalogue does not have (the 13th of the same generator)."""
    product = make_products(PRODUCTS + 1)[-1]
    photo = photograph(render_product(product), np.random.default_rng(seed), 96)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# --- search -------------------------------------------------------------------------------


def test_search_by_image_finds_the_photos_product_first(client: TestClient, world: World) -> None:
    info = _ok(client.get("/v1/info"))
    body = _ok(_search(client, world.photo("P00003"), top_k=5))
    SearchResponse.model_validate(body, strict=True)  # the route serialises it by hand
    results = body["results"]
    assert len(results) == 5
    ids = [r["product_id"] for r in results]
    assert len(set(ids)) == 5
    assert ids[0] == "P00003"
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-3)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    for hit in results:
        row = world.products[hit["product_id"]]
        assert hit["title"] == row["title"]
        assert hit["category"] == row["category"]
        assert hit["price"] == pytest.approx(float(row["price"]))
    assert body["model_version"] == package_version(world.packages["a"])
    assert body["collection"] == world.first["collection"] == info["collection"]
    assert body["index_type"] == "HNSW"
    assert {"decode", "prepare", "embed", "search", "fetch"} <= set(body["stages_ms"])

    image = client.get(results[0]["image_url"])
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/jpeg"
    assert image.content[:3] == b"\xff\xd8\xff"


def test_search_filters_by_category_and_price(client: TestClient, world: World) -> None:
    mugs = _ok(_search(client, world.photo("P00003"), top_k=10, category="mugs"))["results"]
    assert mugs and all(hit["category"] == "mugs" for hit in mugs)
    assert {hit["product_id"] for hit in mugs} == {
        pid for pid, row in world.products.items() if row["category"] == "mugs"
    }

    prices = sorted(float(row["price"]) for row in world.products.values())
    low, high = prices[3], prices[8]
    body = _ok(_search(client, world.photo("P00003"), top_k=12, price_min=low, price_max=high))
    found = {hit["product_id"] for hit in body["results"]}
    assert found == {
        pid for pid, row in world.products.items() if low <= float(row["price"]) <= high
    }


def test_search_by_product_excludes_the_product(client: TestClient, world: World) -> None:
    body = _ok(client.get("/v1/search/product/P00005", params={"top_k": 4}))
    SearchResponse.model_validate(body, strict=True)
    ids = [hit["product_id"] for hit in body["results"]]
    assert len(ids) == 4 and len(set(ids)) == 4
    assert "P00005" not in ids
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)

    toys = _ok(client.get("/v1/search/product/P00005", params={"category": "toys"}))["results"]
    assert toys and all(hit["category"] == "toys" for hit in toys)
    for category in ("crème", 'say "cheese"', "back\\slash", "two\nlines"):
        params = {"category": category}
        assert _ok(client.get("/v1/search/product/P00005", params=params))["results"] == []


def test_unknown_product_and_image_are_404(client: TestClient) -> None:
    _error(client.get("/v1/search/product/NOPE"), 404, "unknown_product")
    _error(client.get("/v1/products/NOPE"), 404, "unknown_product")
    _error(client.get("/v1/images/nope"), 404, "unknown_image")
    _error(client.get("/v1/no/such/route"), 404, "not_found")


def test_product_and_info(client: TestClient, world: World) -> None:
    product = _ok(client.get("/v1/products/P00002"))
    assert product["title"] == world.products["P00002"]["title"]
    assert len(product["images"]) == 3
    info = _ok(client.get("/v1/info"))
    assert info["categories"] == sorted({row["category"] for row in world.products.values()})
    assert info["rows"] == 3 * PRODUCTS
    assert info["model_version"] == package_version(world.packages["a"])


# --- bad input ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bomb(world: World) -> bytes:
    return write_png_bomb(world.root / "bomb.png", 20_000, 20_000).read_bytes()


def test_bad_uploads_are_refused_and_the_service_goes_on(
    client: TestClient, world: World, bomb: bytes
) -> None:
    jpeg = world.photo("P00001")
    cases = [
        (b"", "image/jpeg", 400, "empty_upload"),
        (jpeg[: len(jpeg) // 2], "image/jpeg", 400, "corrupt_image"),
        (jpeg[:200] + bytes(range(256)) * 8, "image/jpeg", 400, "corrupt_image"),
        (b"just some text, not a photo\n" * 10, "image/jpeg", 400, "not_an_image"),
        (b"just some text, not a photo\n" * 10, "application/octet-stream", 400, "not_an_image"),
        (bomb, "image/png", 413, "too_many_pixels"),
        (jpeg, "text/plain", 415, "unsupported_media_type"),
    ]
    for data, content_type, status, code in cases:
        _error(_search(client, data, content_type), status, code)
        _assert_good_search(client, world)
    # The type is checked before the query-embedding cache is: an upload it holds is refused
    # under a wrong type all the same.
    cached = world.photo("P00004", 1)  # just searched by _assert_good_search
    _error(_search(client, cached, "text/plain"), 415, "unsupported_media_type")


def test_every_use_of_the_model_runs_on_the_model_thread(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading, warm-up, searches and the recall canary: a forward on any other thread would
    give libgomp a second OpenMP team, and with more threads than cores it stops spinning
    between parallel regions (forwards about 1.8x slower; see MicroBatcher.executor)."""
    import serving.pair

    threads: dict[str, set[str]] = {}

    class RecordingEmbedder(Embedder):
        def __init__(self, *args, **kwargs) -> None:
            threads.setdefault("load", set()).add(threading.current_thread().name)
            self.loaded = False
            super().__init__(*args, **kwargs)  # checks prepare() once, on the model thread
            self.loaded = True

        def warm_up(self, *args, **kwargs) -> None:
            threads.setdefault("warm_up", set()).add(threading.current_thread().name)
            super().warm_up(*args, **kwargs)

        def embed_prepared(self, inputs):  # every forward: searches, canary, embed_images
            threads.setdefault("embed", set()).add(threading.current_thread().name)
            return super().embed_prepared(inputs)

        def prepare(self, image):  # off the model threads (see Embedder.prepare)
            if self.loaded:
                threads.setdefault("prepare", set()).add(threading.current_thread().name)
            return super().prepare(image)

    monkeypatch.setattr(serving.pair, "Embedder", RecordingEmbedder)
    settings = world.settings(threads=2, embed_workers=1, canary_interval_s=0)
    torch_threads = torch.get_num_threads()  # process-wide: put back for the other tests
    try:
        with TestClient(create_app(settings)) as client:
            _wait_ready(client)
            _assert_good_search(client, world)
            canary = _ok(client.post("/v1/admin/canary", headers=ADMIN))
    finally:
        torch.set_num_threads(torch_threads)
    assert canary["probes"] > 0
    preparing = threads.pop("prepare")
    assert set(threads) == {"load", "warm_up", "embed"}
    (name,) = set().union(*threads.values())
    assert name.startswith("embed")
    # With one model thread (here) a request never prepares on it: see MicroBatcher.run_alone.
    assert not any(thread.startswith("embed") for thread in preparing)


def test_a_lone_search_is_one_job_on_a_model_thread(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two model threads and nothing else to embed, a search decodes, embeds and
    searches on one model thread (MicroBatcher.run_alone): no hand-offs between threads."""
    import serving.pair
    import serving.store

    threads: dict[str, set[str]] = {}

    class RecordingEmbedder(Embedder):
        def embed_prepared(self, inputs):
            threads.setdefault("embed", set()).add(threading.current_thread().name)
            return super().embed_prepared(inputs)

        def prepare(self, image):
            threads.setdefault("prepare", set()).add(threading.current_thread().name)
            return super().prepare(image)

    search = serving.store.VectorStore.search

    def recorded_search(self, *args, **kwargs):
        threads.setdefault("search", set()).add(threading.current_thread().name)
        return search(self, *args, **kwargs)

    monkeypatch.setattr(serving.pair, "Embedder", RecordingEmbedder)
    monkeypatch.setattr(serving.store.VectorStore, "search", recorded_search)
    settings = world.settings(threads=1, embed_workers=2, canary_interval_s=0, cache_size=0)
    with TestClient(create_app(settings)) as client:
        _wait_ready(client)
        threads.clear()  # loading prepared a test card
        answer = _assert_good_search(client, world)
    assert set(answer["stages_ms"]) == {"decode", "prepare", "embed", "search", "fetch"}
    (name,) = set().union(*threads.values())
    # The model thread kept for lone jobs (one torch thread): it never forwards a large batch.
    assert name.startswith("embed-lone") and set(threads) == {"prepare", "embed", "search"}


def test_invalid_parameters_are_422(client: TestClient, world: World) -> None:
    jpeg = world.photo("P00001")
    _error(_search(client, jpeg, top_k=0), 422, "invalid_top_k")
    _error(_search(client, jpeg, top_k=10**6), 422, "invalid_top_k")
    _error(_search(client, jpeg, price_min="cheap"), 422, "invalid_request")
    _error(_search(client, jpeg, price_max="nan"), 422, "invalid_request")
    missing = client.post("/v1/search/image", data={"top_k": "3"})
    assert "image" in _error(missing, 422, "invalid_request")["message"]
    _error(client.get("/v1/search/product/P00001", params={"top_k": 0}), 422, "invalid_top_k")
    swapped = _error(_search(client, jpeg, price_min=20, price_max=5), 422, "invalid_price_range")
    assert "swap" in swapped["message"]
    by_product = client.get("/v1/search/product/P00001", params={"price_min": 9, "price_max": 1})
    _error(by_product, 422, "invalid_price_range")
    _ok(_search(client, jpeg, price_min=5, price_max=5))  # a single price is a fine range
    _assert_good_search(client, world)


def test_bodies_over_the_limit_are_413(strict_client: TestClient, world: World) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(160, 160, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    big_photo = buffer.getvalue()
    assert SMALL_LIMIT < len(big_photo) < SMALL_LIMIT + ENVELOPE_BYTES // 2
    # Under the envelope: the route reads the upload and refuses it.
    refused = _error(_search(strict_client, big_photo), 413, "upload_too_large")
    assert f"a photo may be at most 19.5 KiB ({SMALL_LIMIT} bytes)" in refused["message"]
    _assert_good_search(strict_client, world)
    # A declared Content-Length over limit + envelope: refused before the body is read.
    huge = big_photo * 8
    refused = _error(_search(strict_client, huge), 413, "upload_too_large")
    assert f"a photo may be at most 19.5 KiB ({SMALL_LIMIT} bytes)" in refused["message"]
    _assert_good_search(strict_client, world)
    # No Content-Length (chunked): counted as it streams in, and refused long before a
    # 64 MB body is read (the multipart parser would otherwise spool all of it to disk).
    status, chunks_read = _stream_upload(strict_client, chunks=4096, chunk_bytes=16 * 1024)
    assert status == 413
    assert chunks_read < 20  # of 4098
    _assert_good_search(strict_client, world)
    metrics = strict_client.get("/metrics").text
    assert 'vitrine_errors_total{kind="upload_too_large"} 3.0' in metrics


def _stream_upload(client: TestClient, chunks: int, chunk_bytes: int) -> tuple[int, int]:
    """POST a multipart upload of ``chunks`` x ``chunk_bytes`` without a Content-Length,
    straight to the ASGI app (as a server does with a chunked body) on the client's event
    loop; return the status and how many body chunks the app pulled."""
    boundary = "vitrineboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff"
    ).encode("latin-1")
    parts = iter([head, *([bytes(chunk_bytes)] * chunks), f"\r\n--{boundary}--\r\n".encode()])
    pulled = 0
    answer: dict[str, int] = {}

    async def receive() -> dict:
        nonlocal pulled
        part = next(parts, None)
        if part is None:
            return {"type": "http.disconnect"}
        pulled += 1
        return {"type": "http.request", "body": part, "more_body": pulled < chunks + 2}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/search/image",
        "raw_path": b"/v1/search/image",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
            (b"transfer-encoding", b"chunked"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }

    async def call() -> None:
        await client.app(scope, receive, send)

    assert client.portal is not None
    client.portal.call(call)
    return answer["status"], pulled


# --- admin --------------------------------------------------------------------------------


NEW_CATEGORY = 'jouets d\'été "spéciaux"\\'  # non-ASCII, quotes and a backslash


def _add(
    client, data: bytes, headers: dict[str, str], price: str = "9.5", product_id: str = "NEW0001"
):
    form = {
        "product_id": product_id,
        "category": NEW_CATEGORY,
        "title": "a new toy",
        "price": price,
    }
    files = {"image": ("new.jpg", data, "image/jpeg")}
    return client.post("/v1/admin/products", files=files, data=form, headers=headers)


def test_admin_needs_the_token(client: TestClient, strict_client: TestClient, world: World) -> None:
    photo = world.photo("P00001")
    _error(_add(client, photo, {}), 401, "unauthorized")
    _error(_add(client, photo, {"Authorization": "Bearer nope"}), 403, "forbidden")
    _error(_add(client, photo, {"X-Admin-Token": "nope"}), 403, "forbidden")
    _error(client.delete("/v1/admin/products/P00001"), 401, "unauthorized")
    _error(client.post("/v1/admin/rollout", headers={"X-Admin-Token": "x"}), 403, "forbidden")
    _error(_add(strict_client, photo, ADMIN), 403, "admin_disabled")
    _error(strict_client.post("/v1/admin/rollout", json={}, headers=ADMIN), 403, "admin_disabled")
    off = _error(strict_client.delete("/v1/admin/products/P00001"), 403, "admin_disabled")
    assert "VITRINE_ADMIN_TOKEN" in off["message"]  # no token would do: say how to turn it on
    assert _ok(client.get("/v1/products/P00001"))["images"]  # nothing was removed


def test_admin_adds_and_removes_a_product(client: TestClient, world: World) -> None:
    photo = _new_product_photo()
    before = _ok(_search(client, photo, top_k=3))["results"]
    assert "NEW0001" not in {hit["product_id"] for hit in before}

    assert _collection_facts(client) == (3 * PRODUCTS, False)
    added = _add(client, photo, ADMIN)
    assert added.status_code == 201, added.text
    assert added.json()["product_id"] == "NEW0001"
    assert _collection_facts(client) == (3 * PRODUCTS + 1, True)
    results = _ok(_search(client, photo, top_k=3))["results"]
    assert results[0]["product_id"] == "NEW0001"
    assert results[0]["title"] == "a new toy" and results[0]["price"] == 9.5
    assert results[0]["category"] == NEW_CATEGORY
    only = _ok(_search(client, photo, category=NEW_CATEGORY))["results"]
    assert [hit["product_id"] for hit in only] == ["NEW0001"]
    image = client.get(results[0]["image_url"])
    assert image.status_code == 200 and image.content == photo
    assert image.headers["content-type"] == "image/jpeg"
    assert len(_ok(client.get("/v1/products/NEW0001"))["images"]) == 1

    removed = _ok(client.delete("/v1/admin/products/NEW0001", headers=ADMIN))
    assert removed == {"product_id": "NEW0001", "removed_images": 1}
    after = _ok(_search(client, photo, top_k=3))["results"]
    assert "NEW0001" not in {hit["product_id"] for hit in after}
    assert _collection_facts(client) == (3 * PRODUCTS, False)  # its category went with it
    _error(client.get("/v1/products/NEW0001"), 404, "unknown_product")
    _error(client.delete("/v1/admin/products/NEW0001", headers=ADMIN), 404, "unknown_product")
    _error(_add(client, b"not an image at all", ADMIN), 400, "not_an_image")
    _error(_add(client, photo, ADMIN, price="inf"), 422, "invalid_request")


def test_admin_updates_a_products_fields_on_all_its_photos(
    client: TestClient, world: World
) -> None:
    product = "P00002"
    url = f"/v1/admin/products/{product}"
    was = _ok(client.get(f"/v1/products/{product}"))
    _error(client.patch(url, json={"price": 1.5}), 401, "unauthorized")
    _error(client.patch(url, json={}, headers=ADMIN), 422, "nothing_to_update")
    _error(client.patch(url, json={"price": -1}, headers=ADMIN), 422, "invalid_request")
    _error(client.patch("/v1/admin/products/NOPE", json={"price": 1}, headers=ADMIN), 404)
    try:
        change = {"price": 1.5, "category": NEW_CATEGORY}
        done = _ok(client.patch(url, json=change, headers=ADMIN))
        assert done == {"product_id": product, "updated_images": 3, **change}
        now = _ok(client.get(f"/v1/products/{product}"))
        assert (now["price"], now["category"], now["title"]) == (1.5, NEW_CATEGORY, was["title"])
        assert _collection_facts(client) == (3 * PRODUCTS, True)
        again = _ok(client.patch(url, json={"category": NEW_CATEGORY}, headers=ADMIN))
        assert again["updated_images"] == 0  # nothing differed: nothing written
        # The category is recorded with the collection: a service loading it (a restart, a
        # rollout, another replica) offers it too.
        with TestClient(create_app(world.settings())) as fresh:
            _wait_ready(fresh)
            assert NEW_CATEGORY in _ok(fresh.get("/v1/info"))["categories"]
        # Every photo moved: the category holds this product alone, at the new price only.
        hits = _ok(_search(client, world.photo(product, 2), category=NEW_CATEGORY))["results"]
        assert [hit["product_id"] for hit in hits] == [product]
        assert not _ok(
            _search(client, world.photo(product, 2), price_min=2, category=NEW_CATEGORY)
        )["results"]
    finally:
        back = {"price": was["price"], "category": was["category"]}
        _ok(client.patch(url, json=back, headers=ADMIN))
    assert _collection_facts(client) == (3 * PRODUCTS, False)


def test_a_photo_added_to_a_product_brings_its_fields_to_all_its_photos(
    client: TestClient,
) -> None:
    """One product, one price: a new photo sent with a new price reprices the others."""
    first, second = _new_product_photo(), _new_product_photo(seed=7)
    assert _add(client, first, ADMIN, product_id="NEW0002").status_code == 201
    try:
        assert _add(client, second, ADMIN, price="3", product_id="NEW0002").status_code == 201
        found = _ok(client.get("/v1/products/NEW0002"))
        assert len(found["images"]) == 2 and found["price"] == 3.0
        dear = _ok(_search(client, first, category=NEW_CATEGORY, price_min=9))["results"]
        assert dear == []  # the first photo's 9.5 is gone
    finally:
        _ok(client.delete("/v1/admin/products/NEW0002", headers=ADMIN))


def test_a_delete_during_an_update_is_not_undone(world: World) -> None:
    """An update reads a product's rows and writes them back: a delete landing in between
    would be undone by the write, so admin changes go one at a time."""
    app: FastAPI = create_app(world.settings())
    with serve_in_thread(app, log_level="warning") as url, httpx.Client(base_url=url) as http:
        _wait_ready(http)
        assert _add(http, _new_product_photo(seed=11), ADMIN, product_id="RACE01").is_success
        store = app.state.store
        upsert = store.upsert

        def slow_upsert(*args, **kwargs):  # widens the window between the read and the write
            time.sleep(0.5)
            return upsert(*args, **kwargs)

        store.upsert = slow_upsert
        try:
            with ThreadPoolExecutor(1) as pool:
                patch = pool.submit(
                    http.patch, "/v1/admin/products/RACE01", json={"price": 2.0}, headers=ADMIN
                )
                time.sleep(0.2)  # the update has read the rows and is writing them
                removed = http.delete("/v1/admin/products/RACE01", headers=ADMIN)
                assert patch.result().status_code == 200
        finally:
            store.upsert = upsert
        assert _ok(removed)["removed_images"] == 1
        _error(http.get("/v1/products/RACE01"), 404, "unknown_product")


def _collection_facts(client: TestClient) -> tuple[int, bool]:
    """Rows in the served collection (the same in /readyz, /v1/info and /metrics) and whether
    /v1/info offers the new product's category."""
    info = _ok(client.get("/v1/info"))
    text = client.get("/metrics").text
    gauge = next(line for line in text.splitlines() if line.startswith("vitrine_collection_rows "))
    assert info["rows"] == _ok(client.get("/readyz"))["rows"] == float(gauge.split()[1])
    return info["rows"], NEW_CATEGORY in info["categories"]


def test_a_product_id_with_a_slash_is_found_fetched_and_removed(client: TestClient) -> None:
    """Shops' SKUs hold slashes; the id is one path segment once percent-encoded."""
    photo = _new_product_photo()
    assert _add(client, photo, ADMIN, product_id="SKU/12 a").status_code == 201
    try:
        found = _ok(client.get("/v1/products/SKU%2F12%20a"))
        assert found["product_id"] == "SKU/12 a" and len(found["images"]) == 1
        hits = _ok(client.get("/v1/search/product/SKU%2F12%20a?top_k=2"))["results"]
        assert len(hits) == 2 and "SKU/12 a" not in {hit["product_id"] for hit in hits}
        image = client.get(found["images"][0]["image_url"])
        assert image.status_code == 200 and image.content == photo
    finally:
        removed = _ok(client.delete("/v1/admin/products/SKU%2F12%20a", headers=ADMIN))
    assert removed == {"product_id": "SKU/12 a", "removed_images": 1}
    _error(client.get("/v1/products/SKU%2F12%20a"), 404, "unknown_product")


def test_a_product_whose_photos_crowd_the_first_page_still_leaves_top_k_products(
    client: TestClient,
) -> None:
    """13 near-identical photos of one product fill the first page (top_k 3 x 4 hits): the
    search fetches again, deeper, until it has 3 products."""
    source = Image.open(io.BytesIO(_new_product_photo()))
    photos = []
    for quality in range(60, 99, 3):  # 13 encodings: different bytes, about the same picture
        buffer = io.BytesIO()
        source.save(buffer, format="JPEG", quality=quality)
        photos.append(buffer.getvalue())
    form = {"product_id": "CROWD01", "category": NEW_CATEGORY, "title": "crowd", "price": "1"}
    try:
        for number, photo in enumerate(photos):
            files = {"image": (f"crowd{number}.jpg", photo, "image/jpeg")}
            added = client.post("/v1/admin/products", files=files, data=form, headers=ADMIN)
            assert added.status_code == 201, added.text
        assert len(_ok(client.get("/v1/products/CROWD01"))["images"]) == len(photos)
        results = _ok(_search(client, photos[0], top_k=3))["results"]
        ids = [hit["product_id"] for hit in results]
        assert ids[0] == "CROWD01" and len(set(ids)) == 3
    finally:
        client.delete("/v1/admin/products/CROWD01", headers=ADMIN)


# --- service endpoints and metrics ---------------------------------------------------------


def test_metrics_openapi_and_page(client: TestClient, world: World) -> None:
    _assert_good_search(client, world)
    _ok(client.get("/v1/search/product/P00001"))
    _error(_search(client, b""), 400, "empty_upload")
    _ok(client.get("/readyz"))
    for made_up in ("FROB", "X-1", "FROB2"):  # any token a lenient HTTP parser lets through
        assert client.request(made_up, "/v1/info").status_code == 405
    text = client.get("/metrics").text
    assert 'method="other",route="/v1/info",status="405"} 3.0' in text
    assert "FROB" not in text
    info = _ok(client.get("/v1/info"))
    assert (
        'vitrine_http_requests_total{method="POST",route="/v1/search/image",status="200"}' in text
    )
    # Route templates as written in the API, without Starlette's converters (":path").
    product_route = 'route="/v1/search/product/{product_id}",status="200"'
    assert f'vitrine_http_requests_total{{method="GET",{product_route}}}' in text
    assert 'vitrine_http_requests_total{method="POST",route="/v1/search/image",status="400"}' in (
        text
    )
    for stage in ("decode", "prepare", "embed", "search", "fetch"):
        assert f'vitrine_stage_seconds_count{{stage="{stage}"}}' in text
    assert "vitrine_embed_batch_size_count" in text
    assert "vitrine_search_batch_size_count" in text
    serving = (
        f'vitrine_serving_info{{collection="{info["collection"]}",index_type="HNSW",'
        f'model_version="{info["model_version"]}"}} 1.0'
    )
    assert serving in text
    rows = next(line for line in text.splitlines() if line.startswith("vitrine_collection_rows "))
    assert float(rows.split()[1]) == 3 * PRODUCTS
    assert 'vitrine_errors_total{kind="empty_upload"}' in text
    assert "vitrine_ready 1.0" in text

    paths = _ok(client.get("/openapi.json"))["paths"]
    for path in (
        "/v1/search/image",
        "/v1/search/product/{product_id}",
        "/v1/products/{product_id}",
        "/v1/images/{image_id}",
        "/v1/info",
        "/v1/admin/products",
        "/v1/admin/products/{product_id}",
        "/v1/admin/rollout",
    ):
        assert path in paths
    answers = paths["/v1/search/image"]["post"]["responses"]
    assert answers["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SearchResponse"
    }
    # Errors are documented as they are sent: {"error": {"code", "message", ...}}.
    for status in ("400", "413", "415", "422", "503"):
        schema = answers[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (status, schema)
    admin = paths["/v1/admin/products/{product_id}"]["delete"]["responses"]
    assert {"401", "403", "404"} <= set(admin)
    assert "HTTPValidationError" not in client.get("/openapi.json").text

    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower()
    assert _ok(client.get("/healthz")) == {"status": "ok"}


def test_not_ready_until_a_build_appears(world: World) -> None:
    empty = world.root / "empty_milvus"
    settings = world.settings(milvus_uri=str(empty), reload_interval_s=0.05)
    with TestClient(create_app(settings)) as client:
        assert _ok(client.get("/healthz")) == {"status": "ok"}
        ready = client.get("/readyz")
        body = ready.json()
        assert ready.status_code == 503 and body["ready"] is False
        assert "alias" in body["reason"]
        _error(_search(client, world.photo("P00001")), 503, "not_ready")
        _error(client.get("/v1/info"), 503, "not_ready")

        built = _build(world, world.packages["a"], empty)
        body = _wait_ready(client, timeout=20)
        assert body["collection"] == built["collection"]
        _assert_good_search(client, world)


def test_a_killed_lite_process_is_503_then_searches_come_back(world: World) -> None:
    """Milvus Lite runs in a child process of the service: if it dies, the request that finds
    it gone is 503, and the next ones start another and are answered, no restart needed."""
    folder = world.root / "killed_milvus"
    _build(world, world.packages["a"], folder)
    with TestClient(create_app(world.settings(milvus_uri=str(folder)))) as client:
        _wait_ready(client)
        _assert_good_search(client, world)
        children = lite_pids(folder)
        assert len(children) == 1, "the served collection has one Lite process"
        (child,) = children
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)  # reaped here: the test process is its parent
        _error(_search(client, world.photo("P00004")), 503, "milvus_unavailable")
        deadline = time.monotonic() + 30
        while _search(client, world.photo("P00004")).status_code != 200:
            assert time.monotonic() < deadline, "searches did not come back"
            time.sleep(0.1)
        _assert_good_search(client, world)
        assert lite_pids(folder) - children, "another Lite process serves it now"


def test_the_ready_gauge_moves_without_readyz_calls_and_says_why(world: World) -> None:
    """The ServiceNotReady alert reads vitrine_ready: it must follow the store by itself, not
    only when something calls /readyz. A collection that is no longer loaded is not ready."""
    folder = world.root / "gauge_milvus"
    built = _build(world, world.packages["a"], folder)

    def gauge() -> str:
        lines = client.get("/metrics").text.splitlines()
        return next(line for line in lines if line.startswith("vitrine_ready "))

    settings = world.settings(milvus_uri=str(folder), readiness_interval_s=0.1)
    with TestClient(create_app(settings)) as client:
        _wait_ready(client)
        store = client.app.state.store
        store._call(built["collection"], "release_collection", built["collection"])
        deadline = time.monotonic() + 10
        while gauge() != "vitrine_ready 0.0":
            assert time.monotonic() < deadline, f"still {gauge()} after the release"
            time.sleep(0.05)
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["reason"] == f"collection {built['collection']} is not loaded (yet)"
        store.load(built["collection"])
        deadline = time.monotonic() + 10
        while gauge() != "vitrine_ready 1.0":
            assert time.monotonic() < deadline, f"still {gauge()} after the load"
            time.sleep(0.05)


# --- rollout ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second(world: World, client: TestClient) -> dict:
    """A second collection built with another model; the alias now points at it."""
    return _build(world, world.packages["b"])


def _pair(body: dict) -> tuple[str, str]:
    return body["model_version"], body["collection"]


def test_rollout_switches_model_and_collection_together(
    client: TestClient, world: World, second: dict
) -> None:
    start = _pair(_ok(client.get("/v1/info")))
    assert start == (world.first["model_version"], world.first["collection"])
    new = (second["model_version"], second["collection"])
    assert new[0] != start[0] and new[1] != start[1]

    done = _ok(client.post("/v1/admin/rollout", headers=ADMIN))
    assert _pair(done["serving"]) == new and _pair(done["previous"]) == start
    body = _assert_good_search(client, world)
    assert _pair(body) == new
    assert _pair(_ok(client.get("/v1/search/product/P00002"))) == new

    back = client.post("/v1/admin/rollout", json={"collection": start[1]}, headers=ADMIN)
    assert _pair(_ok(back)["serving"]) == start
    assert _pair(_assert_good_search(client, world)) == start

    _error(
        client.post("/v1/admin/rollout", json={"collection": "vitrine_nope"}, headers=ADMIN),
        404,
        "unknown_collection",
    )
    assert not (world.milvus / "vitrine_nope.db").exists()
    assert _pair(_assert_good_search(client, world)) == start


def test_rollout_without_its_model_is_refused(
    client: TestClient, world: World, second: dict
) -> None:
    serving = _pair(_ok(client.get("/v1/info")))
    package = world.root / "packages" / "doomed"
    shutil.copytree(world.packages["c"], package)
    broken = _build(world, package)
    shutil.rmtree(package)
    store = VectorStore(str(world.milvus))
    try:
        response = client.post(
            "/v1/admin/rollout", json={"collection": broken["collection"]}, headers=ADMIN
        )
        assert "still serving" in _error(response, 409, "rollout_refused")["message"]
        _error(client.post("/v1/admin/rollout", headers=ADMIN), 409, "rollout_refused")
        assert _pair(_ok(client.get("/v1/info"))) == serving
        assert _pair(_assert_good_search(client, world)) == serving
    finally:
        store.point_alias(second["collection"])  # the broken build must not stay the target
        store.close()
    assert 'vitrine_rollouts_total{outcome="refused"}' in client.get("/metrics").text


def _not_served(client: TestClient, world: World, second: dict) -> str:
    """Whichever of the two built collections the service is not answering from."""
    serving = _pair(_ok(client.get("/v1/info")))[1]
    return (
        second["collection"] if serving == world.first["collection"] else world.first["collection"]
    )


def _rollouts_refused(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('vitrine_rollouts_total{outcome="refused"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_rollout_failing_after_the_load_lets_go_of_what_it_opened(
    client: TestClient, world: World, second: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Milvus going away between loading the new pair and the swap: a 503, counted as a
    refused rollout, the previous pair serving on, and the target collection's client (a
    Milvus Lite file lock) closed rather than kept until a restart."""
    from serving.pair import PairHolder
    from serving.store import StoreUnavailable

    serving = _pair(_ok(client.get("/v1/info")))
    target = _not_served(client, world, second)
    refused = _rollouts_refused(client)

    async def milvus_gone(self: PairHolder, pair: object) -> None:
        raise StoreUnavailable("Milvus went away during the rollout")

    monkeypatch.setattr(PairHolder, "_reread_catalogue", milvus_gone)
    _error(client.post("/v1/admin/rollout", json={"collection": target}, headers=ADMIN), 503)
    monkeypatch.undo()
    assert _pair(_ok(client.get("/v1/info"))) == serving
    assert _pair(_assert_good_search(client, world)) == serving
    assert target not in client.app.state.store._clients
    assert _rollouts_refused(client) == refused + 1


def test_a_readiness_check_holds_its_pair_through_a_rollout(
    client: TestClient, world: World, second: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A readiness check in progress when a rollout swaps pairs keeps the old pair (and its
    collection) until it ends, as a request does: retired under it, the check would open the
    collection again, outside any pair, and report it not loaded."""
    store, holder = client.app.state.store, client.app.state.holder
    target = _not_served(client, world, second)
    entered, release = threading.Event(), threading.Event()
    check_ready = VectorStore.why_not_ready

    def held_up(self: VectorStore, collection: str | None = None) -> str:
        entered.set()
        assert release.wait(30)
        return check_ready(self, collection)

    monkeypatch.setattr(VectorStore, "why_not_ready", held_up)
    old = holder.current
    with ThreadPoolExecutor(2) as pool:
        checking = pool.submit(client.get, "/readyz")
        try:
            assert entered.wait(30)
            rolled = pool.submit(
                client.post, "/v1/admin/rollout", json={"collection": target}, headers=ADMIN
            )
            assert _ok(rolled.result(60))["serving"]["collection"] == target
            time.sleep(0.2)  # a retirement has every chance to run now
            assert old.collection in store._clients  # still held by the check
        finally:
            release.set()
        assert checking.result(60).status_code == 200
    monkeypatch.undo()
    deadline = time.monotonic() + 10
    while old.collection in store._clients and time.monotonic() < deadline:
        time.sleep(0.05)
    assert old.collection not in store._clients  # retired once the check let go
    assert _wait_ready(client)["collection"] == target


def test_vitrine_rollout_without_a_token_says_which_to_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from components.rollout import ServiceError, rollout_service

    monkeypatch.setenv("VITRINE_ADMIN_TOKEN", " ")
    for token in (None, ""):
        with pytest.raises(ServiceError, match="no admin token: set VITRINE_ADMIN_TOKEN"):
            rollout_service("http://127.0.0.1:9", token=token)  # nothing is sent


@pytest.fixture
def live_server(world: World, second: dict) -> Iterator[str]:
    """The app under a real uvicorn server on a free local port."""
    app: FastAPI = create_app(world.settings())
    with serve_in_thread(app, log_level="warning") as url:
        with httpx.Client(base_url=url, timeout=30) as probe_client:
            _wait_ready(probe_client)
        yield url


def test_rollout_under_concurrent_queries_drops_none(
    live_server: str, world: World, second: dict
) -> None:
    pairs = {
        (world.first["model_version"], world.first["collection"]),
        (second["model_version"], second["collection"]),
    }
    targets = [world.first["collection"], second["collection"], world.first["collection"]]
    rollouts_done = threading.Event()
    queries = [(f"P{i:05d}", world.photo(f"P{i:05d}", i % 3)) for i in range(PRODUCTS)]

    def query(worker: int) -> list[tuple[int, tuple[str, str] | None, str]]:
        seen = []
        after_rollouts = 0
        with httpx.Client(base_url=live_server, timeout=30) as http:
            n = 0
            while n < 25 or not rollouts_done.is_set() or after_rollouts < 2:
                after_rollouts += rollouts_done.is_set()
                product_id, photo = queries[(worker * 5 + n) % len(queries)]
                response = _search(http, photo, top_k=3)
                ok = response.status_code == 200
                body = response.json() if ok else {}
                first = body["results"][0]["product_id"] if ok else response.text
                seen.append((response.status_code, _pair(body) if ok else None, first))
                assert not ok or first == product_id, (product_id, body)
                n += 1
        return seen

    with (
        ThreadPoolExecutor(8) as pool,
        httpx.Client(base_url=live_server, timeout=60) as admin,
    ):
        futures = [pool.submit(query, worker) for worker in range(8)]
        time.sleep(0.3)
        for target in targets:
            done = admin.post("/v1/admin/rollout", json={"collection": target}, headers=ADMIN)
            assert _pair(_ok(done)["serving"]) in pairs
            time.sleep(0.3)
        rollouts_done.set()
        seen = [item for future in futures for item in future.result()]
        served = _pair(_ok(admin.get("/v1/info")))

    assert len(seen) >= 200
    assert [s for s in seen if s[0] != 200] == []
    assert {pair for _, pair, _ in seen} == pairs
    assert served == (world.first["model_version"], world.first["collection"])
