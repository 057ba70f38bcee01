"""serving.lite_search gives Milvus Lite's own answers: the same hits, order and fields.

Each check searches one collection twice in the same state, with Lite's executor and with
ours, after every kind of change that decides which rows count (flushes into new segments,
upserts over flushed rows, deletes of flushed and in-memory rows, rows only in memory) and
under every projection (all fields, some, dynamic ones, vectors, none) and filter."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pymilvus import DataType, MilvusClient

from serving import lite_search

DIM = 8
NAME = "things"
OUTPUTS = [None, [], ["*"], ["category"], ["price", "brand"], ["$meta"], ["vec", "category"]]
SETTLE_TRIES = 20
FILTERS = ["", 'category == "b"', "price >= 20.0 and price <= 70.0", 'brand == "x"']


@pytest.fixture
def lite_executor_restored():
    """Leave the process with our executor installed, as the service and store have it."""
    yield
    lite_search.install()


def _client(tmp_path, pk: DataType, index_type: str) -> MilvusClient:
    client = MilvusClient(str(tmp_path / "lite.db"))
    schema = client.create_schema(auto_id=False, enable_dynamic_field=True)
    if pk == DataType.VARCHAR:
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    else:
        schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("category", DataType.VARCHAR, max_length=16)
    schema.add_field("price", DataType.FLOAT)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=DIM)
    params = client.prepare_index_params()
    extra = {"M": 8, "efConstruction": 64} if index_type == "HNSW" else {}
    params.add_index("vec", index_type=index_type, metric_type="IP", params=extra)
    client.create_collection(NAME, schema=schema, index_params=params)
    client.load_collection(NAME)
    return client


def _rows(rng: np.random.Generator, keys, pk: DataType) -> list[dict]:
    rows = []
    for key in keys:
        vec = rng.normal(size=DIM).astype(np.float32)
        if key % 10 == 0:  # the same vector in many rows, segments and memory: tied hits
            vec = np.ones(DIM, np.float32)
        row = {
            "id": f"k{key}" if pk == DataType.VARCHAR else int(key),
            "category": str(rng.choice(["a", "b", "c"])),
            "price": float(rng.integers(0, 100)),
            "vec": (vec / np.linalg.norm(vec)).tolist(),
        }
        if key % 3 == 0:
            row["brand"] = str(rng.choice(["x", "y"]))  # a dynamic field, in $meta
        rows.append(row)
    return rows


def _both(client: MilvusClient, queries: np.ndarray, **kwargs) -> tuple[list, list]:
    """Lite's answer and ours in the same state. After a flush, Lite compacts and indexes
    segments in the background, which can change the answer between the two searches: they
    are repeated until the state settles (a real difference stays)."""
    for _ in range(SETTLE_TRIES):
        lite_search.uninstall()
        theirs = [list(hits) for hits in client.search(NAME, data=queries.tolist(), **kwargs)]
        assert lite_search.install()
        ours = [list(hits) for hits in client.search(NAME, data=queries.tolist(), **kwargs)]
        if ours == theirs:
            break
        time.sleep(0.25)
    return theirs, ours


def _both_queries(client: MilvusClient, **kwargs) -> tuple[list, list]:
    """Lite's query() and ours (which shares the validity of search) in the same state."""
    for _ in range(SETTLE_TRIES):
        lite_search.uninstall()
        theirs = list(client.query(NAME, **kwargs))
        assert lite_search.install()
        ours = list(client.query(NAME, **kwargs))
        if ours == theirs:
            break
        time.sleep(0.25)
    return theirs, ours


def _compare_queries(client: MilvusClient, stage: str, pk: DataType) -> int:
    compared = 0
    some = ", ".join(repr(k) if isinstance(k, str) else str(k) for k in _ids(range(0, 600, 9), pk))
    for output_fields in OUTPUTS:
        for expr in [*FILTERS[1:], f"id in [{some}]"]:
            theirs, ours = _both_queries(client, filter=expr, output_fields=output_fields)
            assert ours == theirs, f"{stage}: query output_fields={output_fields} {expr!r}"
            compared += len(ours)
    theirs, ours = _both_queries(client, filter="", limit=50, offset=20, output_fields=["price"])
    assert ours == theirs and len(ours) == 50, f"{stage}: query with limit and offset"
    return compared


def _compare_all(client: MilvusClient, queries: np.ndarray, stage: str) -> int:
    compared = 0
    for output_fields in OUTPUTS:
        for expr in FILTERS:
            theirs, ours = _both(
                client,
                queries,
                limit=7,
                filter=expr,
                output_fields=output_fields,
                search_params={"metric_type": "IP", "params": {"ef": 32}},
            )
            assert ours == theirs, f"{stage}: output_fields={output_fields} filter={expr!r}"
            compared += sum(len(hits) for hits in ours)
    return compared


def _ids(keys, pk: DataType) -> list:
    return [f"k{k}" if pk == DataType.VARCHAR else int(k) for k in keys]


@pytest.mark.parametrize(
    "pk, index_type",
    [(DataType.VARCHAR, "HNSW"), (DataType.INT64, "FLAT"), (DataType.VARCHAR, "IVF_FLAT")],
)
def test_same_answers_as_lite_through_every_change(
    tmp_path, lite_executor_restored, pk, index_type
):
    rng = np.random.default_rng(7)
    client = _client(tmp_path, pk, index_type)
    queries = np.vstack([rng.normal(size=(4, DIM)), np.ones((1, DIM))]).astype(np.float32)
    hits = 0
    try:
        client.insert(NAME, _rows(rng, range(0, 300), pk))
        hits += _compare_all(client, queries, "in memory only")
        rows = _compare_queries(client, "in memory only", pk)
        client.flush(NAME)
        client.insert(NAME, _rows(rng, range(300, 500), pk))
        client.flush(NAME)
        hits += _compare_all(client, queries, "two segments")
        rows += _compare_queries(client, "two segments", pk)
        client.upsert(NAME, _rows(rng, range(250, 350), pk))  # over both segments, in memory
        client.delete(NAME, ids=_ids(range(0, 500, 7), pk))  # flushed rows
        client.insert(NAME, _rows(rng, range(500, 560), pk))
        client.delete(NAME, ids=_ids(range(500, 560, 5), pk))  # rows only in memory
        hits += _compare_all(client, queries, "upserts and deletes in memory")
        rows += _compare_queries(client, "upserts and deletes in memory", pk)
        client.flush(NAME)
        hits += _compare_all(client, queries, "upserts and deletes flushed")
        rows += _compare_queries(client, "upserts and deletes flushed", pk)
        client.upsert(NAME, _rows(rng, range(0, 40), pk))  # deleted keys come back
        hits += _compare_all(client, queries, "deleted keys upserted again")
        rows += _compare_queries(client, "deleted keys upserted again", pk)
    finally:
        client.close()
    assert hits > 1000 and rows > 1000  # the comparisons compared hits, not empty lists


def test_partitions_answer_as_lite(tmp_path, lite_executor_restored):
    rng = np.random.default_rng(3)
    client = _client(tmp_path, DataType.VARCHAR, "HNSW")
    try:
        client.create_partition(NAME, "p1")
        client.insert(NAME, _rows(rng, range(0, 100), DataType.VARCHAR))
        client.insert(NAME, _rows(rng, range(100, 200), DataType.VARCHAR), partition_name="p1")
        client.flush(NAME)
        client.delete(NAME, ids=_ids(range(100, 200, 4), DataType.VARCHAR))
        queries = rng.normal(size=(4, DIM)).astype(np.float32)
        for partitions in (["p1"], ["_default"], ["_default", "p1"]):
            theirs, ours = _both(
                client, queries, limit=9, output_fields=["category"], partition_names=partitions
            )
            assert ours == theirs and all(len(hits) == 9 for hits in ours), partitions
    finally:
        client.close()


def test_validity_is_computed_once_per_set_of_segments(tmp_path, lite_executor_restored):
    """The per-row work is done once per set of segments, not once per search."""
    rng = np.random.default_rng(5)
    client = _client(tmp_path, DataType.VARCHAR, "HNSW")
    try:
        client.insert(NAME, _rows(rng, range(0, 200), DataType.VARCHAR))
        client.flush(NAME)
        lite_search.install()
        computed = []
        real = lite_search._compute_validity
        lite_search._compute_validity = lambda segments: computed.append(1) or real(segments)
        try:
            for _ in range(5):
                client.search(NAME, data=rng.normal(size=(1, DIM)).tolist(), limit=3)
            client.insert(NAME, _rows(rng, range(200, 220), DataType.VARCHAR))
            client.flush(NAME)  # a new segment: a new set
            client.search(NAME, data=rng.normal(size=(1, DIM)).tolist(), limit=3)
        finally:
            lite_search._compute_validity = real
        assert len(computed) == 2
    finally:
        client.close()


def test_install_leaves_unknown_lite_versions_alone(monkeypatch, lite_executor_restored, caplog):
    lite_search.uninstall()
    monkeypatch.setattr(lite_search, "lite_version", lambda: "9.9.9")
    assert not lite_search.install()
    assert "Milvus Lite 9.9.9: its own search executor is used" in caplog.text
    from milvus_lite.engine import collection

    assert collection.execute_search_with_index is not lite_search.execute_search


def test_switch_turns_it_off(monkeypatch, lite_executor_restored):
    lite_search.uninstall()
    monkeypatch.setenv(lite_search.SWITCH, "0")
    assert not lite_search.install()
    monkeypatch.delenv(lite_search.SWITCH)
    assert lite_search.install()
    from milvus_lite.engine import collection

    assert collection.execute_search_with_index is lite_search.execute_search
    assert collection.project_record is lite_search.project_record


def test_queries_finding_the_same_row_share_no_objects(tmp_path, lite_executor_restored):
    """As Lite builds each hit afresh, a caller changing one query's hit (its vector, a list)
    must not change another's: here through Lite's engine, which hands the objects over."""
    from milvus_lite.db import MilvusLite
    from milvus_lite.schema.types import CollectionSchema, FieldSchema
    from milvus_lite.schema.types import DataType as LiteType

    db = MilvusLite(str(tmp_path / "engine"))
    schema = CollectionSchema(
        fields=[
            FieldSchema("id", LiteType.INT64, is_primary=True),
            FieldSchema("vec", LiteType.FLOAT_VECTOR, dim=2),
        ]
    )
    collection = db.create_collection("t", schema)
    collection.insert([{"id": 1, "vec": [1.0, 0.0]}, {"id": 2, "vec": [0.0, 1.0]}])
    collection.load()
    assert lite_search.install()
    try:
        for state in ("in memory", "flushed"):
            hits = collection.search([[1.0, 0.0], [1.0, 0.1]], top_k=1, output_fields=["vec"])
            assert hits[0][0]["id"] == hits[1][0]["id"] == 1
            hits[0][0]["entity"]["vec"].append(99.0)
            assert hits[1][0]["entity"]["vec"] == [1.0, 0.0], state
            collection.flush()
    finally:
        db.close()
