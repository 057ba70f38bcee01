"""The server path against a real Milvus 2.3.5 standalone server (the ``milvus`` package's
binary, started by :mod:`tests.milvus_server` on loopback with a temporary data folder).

What the Lite tests cannot show: the server's own collections and aliases, which index types
this server really builds, and what the service does when the server goes away and comes back
(the service keeps running, answers 503 meanwhile, and serves again without a restart).
Timings go to stdout (``pytest -s``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from components.catalog.config import ImageLimits, ValidationConfig
from components.catalog.demo import generate_demo_catalog
from components.index import IndexBuildConfig, build_index, cleanup_collections
from components.validate import validate_catalog
from model.package import ModelConfig, build_model, save_package
from serving.app import create_app
from serving.settings import Settings
from serving.store import LEASE_PREFIX, LEASE_TTL_S, IndexConfig, StoreUnavailable, VectorStore
from tests.conftest import TINY_BACKBONE
from tests.milvus_server import MilvusServerError, MilvusTestServer, milvus_missing

pytestmark = pytest.mark.slow

DIM = 16
TEST_ALIAS = "vitrine_server_test"  # not the service's alias: the service test builds its own
# Rows per segment from which Milvus 2.3 builds an index at all
# (dataCoord.index.minSegmentNumRowsToEnableIndex); smaller segments are searched by brute
# force whatever the index type says.
MIN_INDEXED_ROWS = 1024


def _say(message: str) -> None:
    print(f"[milvus-server] {message}", flush=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusTestServer]:
    """One server for the module; the service test stops and restarts it."""
    missing = milvus_missing()
    if missing:
        pytest.skip(missing)
    milvus = MilvusTestServer(tmp_path_factory.mktemp("milvus") / "server")
    try:
        seconds = milvus.start()
    except (MilvusServerError, OSError, RuntimeError, EOFError) as err:  # EOF: a bad archive
        pytest.skip(f"milvus-server did not start: {err}")
    where = "a private network namespace" if milvus.isolated else "the host network"
    _say(f"started in {seconds:.1f} s on {milvus.uri} ({where})")
    # pymilvus logs every failed call with its traceback on stderr: the outage test fails
    # calls on purpose.
    quiet = logging.getLogger("pymilvus")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        yield milvus
    finally:
        quiet.setLevel(level)
        milvus.stop(kill=True)


def _unit_vectors(count: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _rows(vectors: np.ndarray, prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "image_id": f"{prefix}{i}",
            "product_id": f"p{i // 2}",
            "category": "even" if i % 2 == 0 else "odd",
            "title": f"item {i}",
            "price": float(i),
            "image_uri": f"/nowhere/{prefix}{i}.jpg",
            "colour": "red",  # an extra field: the dynamic field keeps it
            "embedding": vector,
        }
        for i, vector in enumerate(vectors)
    ]


def _in_thread(fn: Callable[[], Any], limit: float) -> tuple[bool, Any, float]:
    """Run ``fn`` in a daemon thread for at most ``limit`` seconds: (finished, result or
    the exception it raised, seconds). A call that hangs must fail the test, not stall it."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as err:  # handed back to the test
            out["value"] = err

    started = time.perf_counter()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    return not thread.is_alive(), out.get("value"), time.perf_counter() - started


def _eventually(check: Callable[[], bool], limit: float = 5.0) -> bool:
    deadline = time.perf_counter() + limit
    while not check():
        if time.perf_counter() > deadline:
            return False
        time.sleep(0.1)
    return True


def _names(server: MilvusTestServer) -> list[str]:
    from pymilvus import MilvusClient

    client = MilvusClient(server.uri, timeout=10)
    try:
        return client.list_collections()
    finally:
        client.close()


# --- the store --------------------------------------------------------------------------


def test_store_server_path(server: MilvusTestServer) -> None:
    """Collections, rows, index, search, alias and drop on the server's own objects."""
    from pymilvus import MilvusClient

    store = VectorStore(server.uri, alias=TEST_ALIAS)
    raw = MilvusClient(server.uri, timeout=10)
    first, second = "vitrine_server_a", "vitrine_server_b"
    vectors = _unit_vectors(64)
    try:
        for name in (first, second):
            store.create_collection(name, DIM)
            store.insert(name, _rows(vectors, prefix=name[-1]))
        assert store.collections() == [first, second]  # not the _meta companions
        assert {f"{first}_meta", f"{second}_meta"} <= set(raw.list_collections())

        tick = time.perf_counter()
        spec = store.build_index(first, IndexConfig())
        _say(
            f"build_index(IndexConfig()) -> {spec.index_type} in "
            f"{time.perf_counter() - tick:.1f} s: {spec.reason}"
        )
        assert spec.index_type in ("DISKANN", "HNSW")
        # 64 rows: under the server's minimum for an index, and the spec says so.
        assert "no segment reaches the server's minimum for an index" in spec.reason
        assert store.count(first) == 64

        hits = store.search(first, vectors[:3], 5, spec)
        assert [h[0]["image_id"] for h in hits] == ["a0", "a1", "a2"]
        for found in hits:
            assert found[0]["score"] == pytest.approx(1.0, abs=1e-4)
            scores = [hit["score"] for hit in found]
            assert scores == sorted(scores, reverse=True)
        best = hits[0][0]
        assert (best["product_id"], best["category"], best["title"], best["price"]) == (
            "p0",
            "even",
            "item 0",
            0.0,
        )
        assert best["colour"] == "red"  # back from the dynamic field
        even = store.search(first, vectors[1:2], 5, spec, filter='category == "even"')[0]
        assert even and all(hit["category"] == "even" for hit in even)

        # Collections are Strong-consistent: reads see the writes before them.
        store.set_metadata(first, {"model_version": "m1", "index": {"index_type": "X"}})
        assert _eventually(lambda: store.metadata(first).get("model_version") == "m1")
        assert store.card(second) == {}  # none yet
        store.set_card(second, {"replaced": first, "rows": 64})
        assert _eventually(lambda: store.card(second) == {"replaced": first, "rows": 64})
        assert store.row_by_image(first, "a3")["product_id"] == "p1"
        before, changed = store.update_product(first, "p0", {"price": 7.5, "title": "renamed"})
        assert sorted(row["image_id"] for row in before) == ["a0", "a1"] and changed == 2
        rewritten = {(7.5, "renamed", "red")}  # the dynamic field survives the rewrite
        assert _eventually(
            lambda: {(r["price"], r["title"], r.get("colour")) for r in store.rows_of_product(
                first, "p0")} == rewritten
        )  # fmt: skip
        assert len(store.delete_product(first, "p1")) == 2
        # At once, not eventually: Session reads right after a delete by filter returned the
        # deleted rows, and an update then wrote them back.
        assert store.row_by_image(first, "a3") is None
        assert store.update_product(first, "p1", {"price": 1.0}) == ([], 0)
        assert store.rows_of_product(first, "p1") == []

        # The alias: created on the first move, altered on the next.
        assert store.alias_target() is None
        assert store.point_alias(first) is None
        assert store.alias_target() == first
        via_alias = store.search(TEST_ALIAS, vectors[:1], 1, spec)[0]
        assert via_alias[0]["image_id"] == "a0"  # Milvus resolves the alias itself
        assert store.point_alias(second) == first  # an alias may point at any collection
        assert store.alias_target() == second
        assert store.ping(first)  # loaded: it can answer
        assert not store.ping()  # the alias target was never loaded: not ready to serve

        store.drop(first)
        assert store.collections() == [second]
        assert f"{first}_meta" not in raw.list_collections()
    finally:
        if TEST_ALIAS in raw.list_aliases().get("aliases", []):
            raw.drop_alias(TEST_ALIAS)
        for name in (first, second):
            store.drop(name)
        store.close()
        raw.close()
    assert first not in _names(server) and second not in _names(server)


def test_build_index_merges_the_segments_a_bulk_insert_left(server: MilvusTestServer) -> None:
    """Each flush seals a segment; build_index compacts them so a search runs once, not
    once per segment, and the merged rows are indexed and found."""
    from pymilvus import MilvusClient

    store = VectorStore(server.uri)
    raw = MilvusClient(server.uri, timeout=10)
    name = "vitrine_server_segments"
    vectors = _unit_vectors(3 * MIN_INDEXED_ROWS, seed=3)
    try:
        store.create_collection(name, DIM)
        for part in np.array_split(np.arange(len(vectors)), 3):
            store.insert(name, _rows(vectors[part], prefix=f"s{part[0]}_"))
            raw.flush(name)
        sealed = [s for s in raw.list_persistent_segments(name) if s.num_rows]
        assert len(sealed) == 3
        spec = store.build_index(name, IndexConfig(index_type="HNSW"))
        live = [s for s in raw.list_persistent_segments(name) if s.num_rows]
        _say(f"segments: {len(sealed)} sealed -> {len(live)} after build_index")
        assert len(live) == 1 and live[0].num_rows == len(vectors)
        info = raw.describe_index(name, "embedding")
        assert int(info["indexed_rows"]) == len(vectors) and int(info["pending_index_rows"]) == 0
        assert "minimum for an index" not in spec.reason
        hits = store.search(name, vectors[[0, 1500, 3000]], 1, spec)
        assert [h[0]["score"] for h in hits] == pytest.approx([1.0] * 3, abs=1e-4)
    finally:
        store.drop(name)
        store.close()
        raw.close()


def test_auto_index_falls_back_to_hnsw_when_the_server_cannot_build_diskann(
    server: MilvusTestServer,
) -> None:
    """``IndexConfig()`` asks a server for DiskANN; this 2.3.5 build has no DiskANN, so the
    store should end up with HNSW and say why. Enough rows that Milvus really builds."""
    from pymilvus import MilvusClient

    name = "vitrine_server_diskann"
    rows = 2 * MIN_INDEXED_ROWS
    store = VectorStore(server.uri, alias=TEST_ALIAS, timeout=2)
    raw = MilvusClient(server.uri, timeout=10)
    try:
        store.create_collection(name, 8)
        vectors = _unit_vectors(rows, dim=8, seed=1)
        store.insert(name, _rows(vectors, prefix="d"))
        limit = 90  # stall detection (5 s) + the HNSW build and load; a busy CI box is slow
        config = IndexConfig(build_stall_s=5)  # no row indexed in 5 s: DiskANN refused
        finished, spec, seconds = _in_thread(lambda: store.build_index(name, config), limit)
        if not finished:
            state = raw.describe_index(name, "embedding")
            pytest.fail(
                f"build_index({rows} rows, IndexConfig()) had not returned after {limit:.0f} s; "
                f"the server's index: {state}"
            )
        _say(f"auto index on {rows} rows: {spec!r} after {seconds:.1f} s")
        assert not isinstance(spec, BaseException), spec
        assert spec.index_type == "HNSW"
        assert "DISKANN" in spec.reason and "refused" in spec.reason
        assert store.search(name, vectors[:1], 1, spec)[0][0]["image_id"] == "d0"
    finally:
        # Dropping the collection also ends a build_index still waiting in its thread.
        store.drop(name)
        store.close()
        raw.close()


def test_reads_see_the_writes_before_them(server: MilvusTestServer) -> None:
    """What the index step records is what the service reads next (Milvus Lite reads its
    writes; a server, by default, may not for a moment)."""
    name = "vitrine_server_consistency"
    store = VectorStore(server.uri, alias=TEST_ALIAS)
    try:
        store.create_collection(name, DIM)
        store.set_metadata(name, {"model_version": "m2"})
        recorded = store.recorded(name)
        _say(f"metadata read right after it was written: {recorded}")
        assert recorded.get("model_version") == "m2"
    finally:
        store.drop(name)
        store.close()


def test_letting_go_of_a_retired_collection_keeps_the_client_of_the_current_one(
    server: MilvusTestServer,
) -> None:
    """On a server one client serves every collection: a rollout retiring the old collection
    (``forget(old)``) must not close the client the new pair's searches are using."""
    store = VectorStore(server.uri, alias=TEST_ALIAS)
    try:
        current = store._client("vitrine_current")
        store.forget("vitrine_retired")
        assert store._client("vitrine_current") is current
        assert isinstance(current.list_collections(), list)  # still connected
        store.forget()  # no collection: the client itself goes (as close() does)
        assert store._client("vitrine_current") is not current
    finally:
        store.close()


def test_a_frozen_server_is_reported_unavailable_within_the_store_timeout(
    server: MilvusTestServer,
) -> None:
    """A server that accepts connections but does not answer (SIGSTOP: a hung process, a
    network black hole) must not hold a call longer than ``VectorStore.timeout``: here the
    listing behind ``ping`` and /readyz; searches hang the same way."""
    store = VectorStore(server.uri, alias=TEST_ALIAS, timeout=2)
    store.collections()  # connected
    server.pause()
    try:
        limit = store.timeout + 5
        finished, result, seconds = _in_thread(store.collections, limit)
    finally:
        server.resume()
        store.close()
    _say(
        f"a call on a frozen server: {type(result).__name__} after {seconds:.1f} s"
        if finished
        else f"a call on a frozen server: no answer after {seconds:.1f} s"
    )
    assert finished, f"a call on a frozen server had no answer after {limit:.0f} s"
    assert isinstance(result, StoreUnavailable), result


# --- the service ------------------------------------------------------------------------


def _package(directory: Path) -> Path:
    """A tiny model package (random weights)."""
    torch.manual_seed(0)
    config = ModelConfig(backbone=TINY_BACKBONE, weights="none", embed_dim=24, pooling="gem")
    return save_package(build_model(config).eval(), config, directory)


def _wait_for(check: Callable[[], bool], limit: float, step: float = 0.25) -> float | None:
    """Seconds until ``check()`` holds, or None after ``limit`` seconds."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        if check():
            return time.perf_counter() - started
        time.sleep(step)
    return None


def test_service_survives_a_milvus_outage(server: MilvusTestServer, tmp_path: Path) -> None:
    """Build with the index step against the server, serve, stop Milvus (503 at once, the
    process stays up), restart it on the same data and port: the same app serves again."""
    manifest = generate_demo_catalog(
        tmp_path / "catalogue", products=8, photos_per_product=3, progress=False, image_size=96
    )
    config = ValidationConfig(data_docs=False, images=ImageLimits(min_side=32))
    summary = validate_catalog(manifest, tmp_path / "validated", config, progress=False)
    assert summary["valid_products"] == 8
    package = _package(tmp_path / "packages" / "tiny-server")
    built = build_index(
        summary["outputs"]["validated"], package, IndexBuildConfig(uri=server.uri), progress=False
    )
    _say(
        f"index step: {built['rows']} rows in {built['collection']}, "
        f"{built['index']['index_type']} ({built['index']['reason']}), "
        f"{built['seconds']['total']:.1f} s"
    )
    assert built["verification"]["passed"]
    photo = (manifest.parent / "images" / "P00003_1.jpg").read_bytes()

    def search() -> Any:
        return client.post("/v1/search/image", files={"image": ("q.jpg", photo, "image/jpeg")})

    settings = Settings(
        milvus_uri=server.uri,
        reload_interval_s=0.5,
        max_wait_ms=1.0,
        upload_dir=str(tmp_path / "uploads"),
    )
    with TestClient(create_app(settings)) as client:
        assert _wait_for(lambda: client.get("/readyz").status_code == 200, 60) is not None
        answer = search()
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["collection"] == built["collection"]
        assert body["results"][0]["product_id"] == "P00003"  # the photo itself is indexed
        assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
        # The service leases what it serves, so an index build's clean-up leaves it alone.
        assert VectorStore(server.uri).held_elsewhere(built["collection"]) is True

        # --- Milvus goes away ---
        server.stop(kill=True)
        finished, answer, seconds = _in_thread(search, 120)
        assert finished, "a search did not answer within 120 s of Milvus stopping"
        _say(f"Milvus stopped: search answered {answer.status_code} in {seconds:.3f} s")
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "milvus_unavailable"
        assert answer.headers.get("retry-after")
        by_product = client.get("/v1/search/product/P00003")
        assert by_product.status_code == 503
        assert by_product.json()["error"]["code"] == "milvus_unavailable"
        finished, ready, seconds = _in_thread(lambda: client.get("/readyz"), 120)
        assert finished, "/readyz did not answer within 120 s of Milvus stopping"
        _say(f"Milvus stopped: /readyz answered {ready.status_code} in {seconds:.3f} s")
        assert ready.status_code == 503
        assert ready.json()["ready"] is False
        assert client.get("/healthz").status_code == 200

        # --- Milvus comes back on the same data and port; the app is not restarted ---
        restart = server.start()
        _say(f"Milvus restarted in {restart:.1f} s")
        seen: list[tuple[float, str, int, str]] = []  # (seconds, what, status, error code)
        started = time.perf_counter()

        def both_answer() -> bool:
            for what, answer in (("readyz", client.get("/readyz")), ("search", search())):
                body = answer.json()
                if answer.status_code == 200:
                    why = ""
                elif what == "search":
                    why = body["error"]["code"]
                else:
                    why = str(body.get("reason", ""))[:80]
                seen.append((time.perf_counter() - started, what, answer.status_code, why))
            return all(
                any(w == what and s == 200 for _, w, s, _ in seen) for what in ("readyz", "search")
            )

        recovered = _wait_for(both_answer, 90, step=0.5)
        first_ok = {
            what: next((round(t, 1) for t, w, s, _ in seen if w == what and s == 200), None)
            for what in ("readyz", "search")
        }
        meanwhile = sorted({f"{w} {s} {c}" for _, w, s, c in seen if s != 200})
        _say(
            f"after the restart (no load_collection called): /readyz 200 after "
            f"{first_ok['readyz']} s, search 200 after {first_ok['search']} s; "
            f"before that: {meanwhile}"
        )
        assert recovered is not None, f"not serving 90 s after the restart: {seen[-4:]}"
        again = search().json()
        assert again["results"][0]["product_id"] == "P00003"
        assert client.get("/readyz").json()["ready"] is True
    assert VectorStore(server.uri).held_elsewhere(built["collection"]) is False  # let go


def test_a_collection_a_service_leases_survives_the_clean_up(server: MilvusTestServer) -> None:
    """On a server no file lock says which collections a running service answers from: its
    lease does. A collection served after a rollback, older than everything kept, survives a
    clean-up with no room for older collections; once the lease ends or expires, it goes."""
    store = VectorStore(server.uri, alias=TEST_ALIAS)
    names = [f"vitrine_20240601T00000{i}000000_lease" for i in range(3)]
    try:
        for name in names:
            store.create_collection(name, DIM)
            store.set_metadata(name, {"model_version": "m"})  # a finished build
        store.point_alias(names[2])
        store.hold(names[0], "replica-1")
        assert store.held_elsewhere(names[0]) is True
        assert store.held_elsewhere(names[1]) is False
        assert cleanup_collections(store, keep=0) == [names[1]]
        assert [n for n in store.collections() if n in names] == [names[0], names[2]]

        store.release_hold(names[0], "replica-1")
        assert store.held_elsewhere(names[0]) is False
        stale = {"at": time.time() - LEASE_TTL_S - 1}  # a replica that died long ago
        store.set_metadata(names[0], stale, key=f"{LEASE_PREFIX}replica-2")
        assert store.held_elsewhere(names[0]) is False
        assert cleanup_collections(store, keep=0) == [names[0]]
    finally:
        raw = store._client()
        if TEST_ALIAS in raw.list_aliases().get("aliases", []):
            raw.drop_alias(TEST_ALIAS)
        for name in names:
            store.drop(name)
        store.close()
