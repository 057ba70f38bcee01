"""The vector store on real Milvus Lite: index choice, rows, search, metadata, alias, files."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from components.cli import main
from serving.store import (
    COLLECTION_PREFIX,
    IndexConfig,
    IndexSpec,
    StoreError,
    StoreUnavailable,
    VectorStore,
    choose_index,
    is_embedded,
    lite_index_types,
    rows_in_batches,
    spec_from_dict,
)

DIM = 32
ROWS = 3000
CATEGORIES = ("mugs", "bottles", "boxes", "bags")


def _clustered(rows: int, dim: int = DIM, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Seeded unit vectors around a few centres, as catalogue embeddings are."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    vectors = centres[rng.integers(0, clusters, rows)] + 0.5 * rng.normal(size=(rows, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def _rows(vectors: np.ndarray) -> list[dict]:
    """Three images per product, categories in turn, prices 0.5 .. 99.5, one extra field."""
    return [
        {
            "image_id": f"img{i:05d}",
            "product_id": f"p{i // 3:04d}",
            "category": CATEGORIES[(i // 3) % len(CATEGORIES)],
            "title": f"product {i // 3}",
            "price": float((i // 3) % 100) + 0.5,
            "image_uri": f"/images/{i}.jpg",
            "colour": ("red", "green", "blue")[i % 3],  # not in the schema: a dynamic field
            "embedding": vector,
        }
        for i, vector in enumerate(vectors)
    ]


def _recall(store: VectorStore, name: str, vectors: np.ndarray, spec: IndexSpec | None) -> float:
    """ANN recall@10 against exact search for the first 100 vectors as queries."""
    queries, k = vectors[:100], 10
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :k]
    found = store.search(name, queries, k, spec)
    return float(
        np.mean(
            [
                len({f"img{j:05d}" for j in row} & {hit["image_id"] for hit in hits}) / k
                for row, hits in zip(exact, found, strict=True)
            ]
        )
    )


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return _clustered(ROWS)


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, vectors: np.ndarray):
    """One HNSW collection of 3000 rows (dim 32), built once for the read-only tests."""
    store = VectorStore(str(tmp_path_factory.mktemp("store") / "milvus"))
    name = f"{COLLECTION_PREFIX}20240601T000000000000_filled"
    store.create_collection(name, DIM)
    for batch in rows_in_batches(_rows(vectors), 1000):
        store.insert(name, batch)
    spec = store.build_index(name, IndexConfig())
    yield store, name, spec
    store.close()


# --- choosing the index ---------------------------------------------------------------------


def test_auto_on_lite_is_hnsw_because_lite_has_no_diskann() -> None:
    spec = choose_index(True, IndexConfig(hnsw_m=24, hnsw_ef_construction=120, hnsw_ef=64))
    assert spec.index_type == "HNSW"
    assert "Lite" in spec.reason and "DiskANN" in spec.reason
    assert spec.metric_type == "IP"
    assert spec.build_params == {"M": 24, "efConstruction": 120}
    assert spec.search_params == {"ef": 64}


def test_auto_on_a_server_is_diskann() -> None:
    spec = choose_index(False, IndexConfig(search_list=150))
    assert spec.index_type == "DISKANN"
    assert "server" in spec.reason
    assert spec.build_params == {}
    assert spec.search_params == {"search_list": 150}


def test_diskann_is_never_asked_of_lite() -> None:
    on_lite = choose_index(True, IndexConfig(index_type="diskann"))
    assert on_lite.index_type == "HNSW"
    assert "DISKANN" in on_lite.reason and "Lite" in on_lite.reason
    assert choose_index(False, IndexConfig(index_type="DISKANN")).index_type == "DISKANN"


def test_what_lite_builds_is_asked_of_lite_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    from milvus_lite.index import factory

    import serving.store

    assert lite_index_types()[0] == "HNSW"  # milvus-lite installs faiss-cpu
    # A Lite without faiss-cpu builds no graph and no IVF: exact search is what it has left,
    # and the spec says so rather than asking for an HNSW that would fail.
    monkeypatch.setattr(factory, "is_faiss_available", lambda: False)
    serving.store.lite_index_types.cache_clear()
    try:
        assert lite_index_types() == ("AUTOINDEX", "FLAT")
        spec = choose_index(True, IndexConfig())
        assert spec.index_type == "AUTOINDEX"
        assert "Milvus Lite" in spec.reason and "(AUTOINDEX, FLAT)" in spec.reason
        assert choose_index(True, IndexConfig(index_type="HNSW")).index_type == "AUTOINDEX"
        assert choose_index(False, IndexConfig(index_type="HNSW")).index_type == "HNSW"
    finally:
        serving.store.lite_index_types.cache_clear()


@pytest.mark.parametrize("embedded", [True, False])
def test_an_explicit_index_type_is_honoured(embedded: bool) -> None:
    spec = choose_index(embedded, IndexConfig(index_type="ivf_flat", ivf_nlist=32, ivf_nprobe=4))
    assert spec.index_type == "IVF_FLAT"
    assert spec.reason == "IVF_FLAT as configured"
    assert spec.build_params == {"nlist": 32}
    assert spec.search_params == {"nprobe": 4}


@pytest.mark.parametrize(
    ("uri", "embedded"),
    [
        ("artifacts/milvus", True),
        ("/var/lib/vitrine/milvus.db", True),
        ("./milvus", True),
        ("http://milvus:19530", False),
        ("https://in01-xxx.cloud.zilliz.com", False),
        ("HTTP://milvus:19530", False),  # schemes are case-insensitive
        ("tcp://10.0.0.5:19530", False),
        ("unix:///tmp/milvus.sock", False),
    ],
)
def test_is_embedded(uri: str, embedded: bool) -> None:
    assert is_embedded(uri) is embedded
    assert VectorStore(uri).embedded is embedded


@pytest.mark.parametrize("folder", ["backup:1", "run-12:30", "2026-11-24:1", "./milvus:19530"])
def test_folder_names_with_a_colon_stay_lite_folders(folder: str) -> None:
    assert VectorStore(folder).embedded


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("htp://127.0.0.1:19530", "unknown scheme 'htp'"),
        ("milvus://host:19530", "unknown scheme 'milvus'"),
        ("127.0.0.1:19530", "write http://127.0.0.1:19530"),
        ("milvus-standalone:19530", "write http://milvus-standalone:19530"),
    ],
)
def test_a_mistyped_server_uri_is_refused_not_made_a_lite_folder(
    uri: str, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(says)):
        VectorStore(uri)
    assert main(["serve", "--uri", uri]) == 2
    assert says in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no folder named after the typo


def test_spec_survives_metadata_json_and_rows_batch() -> None:
    spec = choose_index(True, IndexConfig())
    from dataclasses import asdict

    assert spec_from_dict({**asdict(spec), "unrelated": 1}) == spec
    assert [len(b) for b in rows_in_batches(({"i": i} for i in range(7)), 3)] == [3, 3, 1]


def test_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="alias"):
        VectorStore(str(tmp_path), alias="bad-alias")
    store = VectorStore(str(tmp_path))
    with pytest.raises(ValueError, match=COLLECTION_PREFIX):
        store.create_collection("products", DIM)
    with pytest.raises(ValueError):
        store.create_collection(f"{COLLECTION_PREFIX}x; drop", DIM)


# --- rows and search ------------------------------------------------------------------------


def test_a_stored_vector_finds_itself_first(filled, vectors: np.ndarray) -> None:
    store, name, spec = filled
    assert spec.index_type == "HNSW"
    assert store.count(name) == ROWS
    picked = np.arange(0, ROWS, 97)
    found = store.search(name, vectors[picked], 5, spec)
    assert len(found) == len(picked)
    for i, hits in zip(picked, found, strict=True):
        assert len(hits) == 5
        assert hits[0]["image_id"] == f"img{i:05d}"
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        scores = [hit["score"] for hit in hits]
        assert scores == sorted(scores, reverse=True)
    first = found[0][0]
    assert first["product_id"] == "p0000"
    assert first["category"] == "mugs"
    assert first["title"] == "product 0"
    assert first["price"] == pytest.approx(0.5)
    assert first["image_uri"] == "/images/0.jpg"


def test_hnsw_agrees_with_exact_search(filled, vectors: np.ndarray) -> None:
    store, name, spec = filled
    assert _recall(store, name, vectors, spec) >= 0.95


def test_filters_are_respected(filled, vectors: np.ndarray) -> None:
    store, name, spec = filled
    queries = vectors[:20]
    by_category = store.search(name, queries, 10, spec, filter='category == "bags"')
    assert all(len(hits) == 10 for hits in by_category)
    assert {hit["category"] for hits in by_category for hit in hits} == {"bags"}

    by_price = store.search(name, queries, 10, spec, filter="price >= 10 and price < 20")
    prices = [hit["price"] for hits in by_price for hit in hits]
    assert prices and all(10 <= p < 20 for p in prices)

    both = store.search(
        name, queries, 10, spec, filter='category == "mugs" and price >= 40 and price <= 60'
    )
    assert all(
        hit["category"] == "mugs" and 40 <= hit["price"] <= 60 for hits in both for hit in hits
    )
    nothing = store.search(name, queries[:2], 10, spec, filter="price > 1000")
    assert nothing == [[], []]


def test_dynamic_fields_come_back(filled, vectors: np.ndarray) -> None:
    store, name, spec = filled
    hits = store.search(name, vectors[:3], 3, spec)
    assert [h[0]["colour"] for h in hits] == ["red", "green", "blue"]
    assert "$meta" not in hits[0][0]
    assert store.row_by_image(name, "img00004")["colour"] == "green"


def test_rows_of_a_product_upsert_and_delete(tmp_path: Path) -> None:
    store = VectorStore(str(tmp_path / "milvus"))
    name = f"{COLLECTION_PREFIX}20240601T000000000000_rows"
    vectors = _clustered(30, seed=1)
    store.create_collection(name, DIM)
    store.insert(name, _rows(vectors))
    store.build_index(name, IndexConfig())
    try:
        rows = store.rows_of_product(name, "p0003")
        assert sorted(r["image_id"] for r in rows) == ["img00009", "img00010", "img00011"]
        assert "embedding" not in rows[0]
        with_vectors = store.rows_of_product(name, "p0003", with_embedding=True)
        got = {r["image_id"]: np.asarray(r["embedding"]) for r in with_vectors}
        np.testing.assert_allclose(got["img00010"], vectors[10], atol=1e-6)
        assert store.rows_of_product(name, "no-such-product") == []

        assert store.row_by_image(name, "img00010")["product_id"] == "p0003"
        assert store.row_by_image(name, "missing") is None
        quoted = 'p"1\\ odd'
        store.upsert(
            name,
            [
                {
                    "image_id": "img00010",
                    "product_id": quoted,
                    "title": "renamed",
                    "price": 12.25,
                    "embedding": vectors[10],
                }
            ],
        )
        replaced = store.row_by_image(name, "img00010")
        assert replaced["title"] == "renamed"
        assert replaced["price"] == pytest.approx(12.25)
        assert replaced["category"] == ""  # missing catalogue fields become empty values
        assert store.rows_of_product(name, quoted)[0]["image_id"] == "img00010"
        assert store.count(name) == 30  # replaced, not added

        assert len(store.delete_product(name, "p0003")) == 2
        assert store.rows_of_product(name, "p0003") == []
        assert store.row_by_image(name, "img00009") is None
        assert store.count(name) == 28
        assert len(store.delete_product(name, "p0003")) == 0
        hits = store.search(name, vectors[9:10], 30)[0]
        assert not {"img00009", "img00011"} & {hit["image_id"] for hit in hits}
    finally:
        store.close()


def test_ivf_parameters_reach_lite_and_its_index_is_searched(tmp_path: Path) -> None:
    """nlist/nprobe take effect: with one probe recall drops, with all of them it is exact.

    Guards two things: build parameters must reach Milvus Lite (it reads only a JSON ``params``
    entry), and inserted rows must be flushed before indexing (unflushed rows are searched by
    brute force, so the index, and its verification, would be bypassed).
    """
    store = VectorStore(str(tmp_path / "milvus"))
    name = f"{COLLECTION_PREFIX}20240601T000000000000_ivf"
    vectors = _clustered(ROWS, seed=2)
    store.create_collection(name, DIM)
    store.insert(name, _rows(vectors))
    config = IndexConfig(index_type="IVF_FLAT", ivf_nlist=64, ivf_nprobe=1)
    try:
        spec = store.build_index(name, config)
        assert (spec.index_type, spec.build_params, spec.search_params) == (
            "IVF_FLAT",
            {"nlist": 64},
            {"nprobe": 1},
        )
        assert _recall(store, name, vectors, spec) < 0.9
        every_list = IndexSpec("IVF_FLAT", "IP", spec.build_params, {"nprobe": 64})
        assert _recall(store, name, vectors, every_list) == pytest.approx(1.0)
    finally:
        store.close()


# --- metadata, alias, files -----------------------------------------------------------------


def test_metadata_round_trip(filled) -> None:
    store, name, spec = filled
    from dataclasses import asdict

    recorded = {
        "model_version": "tiny-2024-06-01-abc",
        "index": asdict(spec),
        "categories": ["bags", "mugs"],
        "verification": {"recall_at_k": 0.99, "passed": True},
    }
    store.set_metadata(name, recorded)
    found = store.metadata(name)
    assert found == {**recorded, "collection": name, "rows": ROWS}
    assert spec_from_dict(found["index"]) == spec
    store.set_metadata(name, {"model_version": "second"})  # replaces, not appends
    assert store.metadata(name)["model_version"] == "second"
    assert "categories" not in store.metadata(name)
    assert store.recorded(name) == {"model_version": "second"}


def test_metadata_of_a_collection_never_described_is_empty(tmp_path: Path) -> None:
    store = VectorStore(str(tmp_path / "milvus"))
    name = f"{COLLECTION_PREFIX}20240601T000000000000_bare"
    store.create_collection(name, 4)
    try:
        assert store.metadata(name) == {"collection": name, "rows": 0}
        assert store.recorded(name) == {}
    finally:
        store.close()


def test_alias_pointer_file(tmp_path: Path) -> None:
    folder = tmp_path / "milvus"
    store = VectorStore(str(folder), alias="shop")
    first = f"{COLLECTION_PREFIX}20240601T000000000000_a"
    second = f"{COLLECTION_PREFIX}20240602T000000000000_b"
    assert store.alias_target() is None
    assert not store.ping()  # nothing served yet
    store.create_collection(first, 4)
    store.create_collection(second, 4)
    try:
        assert store.point_alias(first) is None
        assert store.alias_target() == first
        assert (folder / "shop.alias").read_text().strip() == first
        assert store.point_alias(second) == first
        assert store.alias_target() == second
        assert sorted(p.name for p in folder.iterdir() if p.suffix != ".db") == ["shop.alias"]
        assert not list(folder.glob("*.tmp"))

        other = VectorStore(str(folder), alias="shop")  # e.g. the service beside the index step
        assert other.alias_target() == second
        assert VectorStore(str(folder)).alias_target() is None  # another alias, unset
        assert VectorStore(f"{folder}.db", alias="shop").alias_target() == second  # .db suffix
        assert store.ping()
        assert other.ping()
        other.close()
    finally:
        store.close()


def test_collections_sort_by_name_and_drop_removes_files(tmp_path: Path) -> None:
    folder = tmp_path / "milvus"
    store = VectorStore(str(folder))
    assert store.collections() == []  # no folder yet
    names = [f"{COLLECTION_PREFIX}20240603T000000000000_c", f"{COLLECTION_PREFIX}20240601T0_a"]
    names.append(f"{COLLECTION_PREFIX}20240602T000000000000_b")
    for name in names:
        store.create_collection(name, 4)
    (folder / "notes.db").mkdir()  # not ours: ignored
    try:
        assert store.collections() == sorted(names)  # oldest first; no *_meta companions
        store.drop(names[1])
        assert store.collections() == sorted(names[:1] + names[2:])
        assert not list(folder.glob(f"{names[1]}*"))
        store.drop(names[1])  # again: nothing to do
    finally:
        store.close()
    store.close()  # closing twice is harmless
    assert not list(folder.glob(f"{names[1]}*"))  # not written back when servers stop


def test_reopen_after_close_needs_load(tmp_path: Path) -> None:
    folder = tmp_path / "milvus"
    name = f"{COLLECTION_PREFIX}20240601T000000000000_reopen"
    vectors = _clustered(200, seed=3)
    store = VectorStore(str(folder))
    store.create_collection(name, DIM)
    store.insert(name, _rows(vectors))
    spec = store.build_index(name, IndexConfig())
    store.set_metadata(name, {"model_version": "v1"})
    store.point_alias(name)
    store.close()

    reopened = VectorStore(str(folder))
    try:
        with pytest.raises(StoreError, match="load"):
            reopened.search(name, vectors[:1], 1, spec)
        reopened.load(name)
        assert reopened.search(name, vectors[7:8], 1, spec)[0][0]["image_id"] == "img00007"
        assert reopened.metadata(name) == {"model_version": "v1", "collection": name, "rows": 200}
        assert reopened.ping()
    finally:
        reopened.close()


def _locked(data_dir: Path) -> bool:
    """Whether a process holds Milvus Lite's advisory lock on a database folder."""
    import fcntl

    lock = data_dir / "LOCK"
    assert lock.is_file(), f"Milvus Lite keeps its lock in {lock}; has the layout changed?"
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_close_releases_the_lite_file_for_another_process(tmp_path: Path) -> None:
    """The index step and the service are separate processes: a closed store must unlock.

    pymilvus never stops the in-process Lite server it starts for a file, so without the
    store stopping it the lock would be held until the process exits. (flock conflicts between
    two opens even in one process, so no second process is needed to see it.)
    """
    folder = tmp_path / "milvus"
    name = f"{COLLECTION_PREFIX}20240601T000000000000_shared"
    store = VectorStore(str(folder))
    store.create_collection(name, 4)
    store.insert(name, [{"image_id": "a", "embedding": [1.0, 0.0, 0.0, 0.0]}])
    store.build_index(name, IndexConfig())
    other = VectorStore(str(folder))
    other.load(name)  # two stores of one process share the file's server
    assert _locked(folder / f"{name}.db")
    store.forget(name)
    assert _locked(folder / f"{name}.db")  # the other store still uses it
    assert other.count(name) == 1
    other.close()
    assert not _locked(folder / f"{name}.db")
    store.load(name)  # and it opens again afterwards
    assert store.count(name) == 1
    store.close()
    assert not _locked(folder / f"{name}.db")


def test_an_unreachable_server_is_unavailable_quickly() -> None:
    store = VectorStore("http://127.0.0.1:1", timeout=1.0)
    started = time.perf_counter()
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:1\b"):
        store.collections()
    with pytest.raises(StoreUnavailable):
        store.alias_target()
    assert store.ping() is False
    # Connection refused fails at once: pymilvus does not retry for long here.
    assert time.perf_counter() - started < 10


def test_candidate_lists_grow_to_the_results_asked_for() -> None:
    from serving.store import widened

    assert widened({"ef": 96}, 10) == {"ef": 96}
    assert widened({"ef": 96}, 800) == {"ef": 800}
    assert widened({"search_list": 100}, 400) == {"search_list": 400}
    assert widened({"nprobe": 16}, 400) == {"nprobe": 16}


def test_an_unknown_index_type_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown index type 'HSNW': auto, or one of .*HNSW"):
        IndexConfig(index_type="HSNW")
    assert IndexConfig(index_type="hnsw").index_type == "hnsw"  # any case
    with pytest.raises(
        ValueError, match="index_type must be auto or a Milvus index type, not None"
    ):
        IndexConfig(index_type=None)  # `index_type:` left empty in params.yaml


def test_readiness_of_a_missing_lite_collection_does_not_create_it(tmp_path: Path) -> None:
    """The alias pointing at a collection that is gone (dropped by hand, say): readiness says
    so, and does not leave an empty collection of that name behind (opening a Lite file
    creates it)."""
    folder = tmp_path / "milvus"
    store = VectorStore(str(folder), alias="shop")
    gone = f"{COLLECTION_PREFIX}20240601T000000000000_gone"
    store.point_alias(gone)
    try:
        assert "is gone" in store.why_not_ready()
        assert not (folder / f"{gone}.db").exists()
        assert store.collections() == []
    finally:
        store.close()


def test_a_lease_name_fits_the_metadata_key_on_any_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pod names run to 63 characters; a lease key over the companion's 64 would not be
    written, and the index step's clean-up would drop what the replica answers from."""
    from serving.pair import lease_holder_name
    from serving.store import LEASE_PREFIX, META_KEY_CHARS

    monkeypatch.setattr("socket.gethostname", lambda: "vitrine-search-" + "x" * 48)
    names = {lease_holder_name() for _ in range(3)}
    assert len(names) == 3  # replicas sharing the kept prefix stay apart
    assert all(len(LEASE_PREFIX + name) <= META_KEY_CHARS for name in names)
    assert all(name.startswith("vitrine-search-") for name in names)
