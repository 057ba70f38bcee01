"""The index step on real Milvus Lite: build, verify, swap the alias, clean up, roll back."""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch

from components.catalog.config import ImageLimits, ValidationConfig
from components.catalog.demo import CATEGORIES, generate_demo_catalog
from components.cli import main
from components.index import (
    ORPHAN_AFTER,
    IndexBuildConfig,
    IndexVerificationError,
    UnreadableCatalogueError,
    _may_still_be_building,
    build_index,
    cleanup_collections,
    collection_name,
    list_collections,
    rollback_index,
)
from components.validate import validate_catalog
from model.config import load_params
from model.package import ModelConfig, build_model, package_version, save_package
from serving.lite_process import LiteProcess
from serving.store import (
    CARD_SUFFIX,
    COLLECTION_PREFIX,
    DEFAULT_ALIAS,
    TRASH_FOLDER,
    AliasBusy,
    IndexConfig,
    StoreError,
    StoreUnavailable,
    VectorStore,
)
from tests.conftest import TINY_BACKBONE

REPO = Path(__file__).resolve().parents[1]
PRODUCTS, PHOTOS = 10, 3


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model package (random weights, 16-d embeddings)."""
    torch.manual_seed(0)
    config = ModelConfig(backbone=TINY_BACKBONE, weights="none", embed_dim=16, pooling="gem")
    directory = tmp_path_factory.mktemp("packages") / "tiny-2024-06-01"
    return save_package(build_model(config).eval(), config, directory)


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo catalogue (10 products x 3 photos, plus its bad rows) after validation."""
    root = tmp_path_factory.mktemp("catalogue")
    manifest = generate_demo_catalog(
        root / "demo", products=PRODUCTS, photos_per_product=PHOTOS, progress=False, image_size=96
    )
    config = ValidationConfig(data_docs=False, images=ImageLimits(min_side=32))
    summary = validate_catalog(manifest, root / "validated", config=config, progress=False)
    assert summary["valid_rows"] == PRODUCTS * PHOTOS
    return Path(summary["outputs"]["validated"])


def _config(tmp_path: Path, **changes) -> IndexBuildConfig:
    return IndexBuildConfig(uri=str(tmp_path / "milvus"), device="cpu", **changes)


def _build(validated: Path, package: Path, config: IndexBuildConfig) -> dict:
    return build_index(validated, package, config, progress=False)


def _served(config: IndexBuildConfig) -> str | None:
    return VectorStore(config.uri, alias=config.alias).alias_target()


def _collections(config: IndexBuildConfig) -> list[str]:
    return VectorStore(config.uri, alias=config.alias).collections()


def _orphan(config: IndexBuildConfig, name: str) -> str:
    """Leave ``name`` as a killed build does: rows inserted, no index, no metadata."""
    store = VectorStore(config.uri, alias=config.alias)
    store.create_collection(name, 16)
    store.insert(name, [{"image_id": "half", "embedding": [0.25] * 16}])
    store.close()
    return name


def test_build_fail_rebuild_and_roll_back(tmp_path: Path, validated: Path, package: Path) -> None:
    config = _config(tmp_path)
    first = _build(validated, package, config)

    name = first["collection"]
    assert name.startswith(COLLECTION_PREFIX)
    assert first["previous"] is None
    assert first["alias"] == DEFAULT_ALIAS
    assert (first["rows"], first["skipped_images"]) == (PRODUCTS * PHOTOS, 0)
    assert first["dim"] == 16
    check = first["verification"]
    assert check["passed"] and check["recall_at_k"] >= check["floor"] == 0.95
    assert (check["queries"], check["k"]) == (PRODUCTS * PHOTOS, 10)
    assert first["index"]["index_type"] == "HNSW"
    assert "DiskANN" in first["index"]["reason"]
    assert first["model_package"] == str(package.resolve())
    assert first["model_version"] == package_version(package)
    assert first["categories"] and set(first["categories"]) <= set(CATEGORIES)
    assert first["categories"] == sorted(first["categories"])
    assert first["removed"] == []
    assert set(first["seconds"]) >= {"embed", "insert", "index", "verify", "total"}
    assert _served(config) == name

    store = VectorStore(config.uri)
    store.load(name)  # build_index closed it: a new reader loads first
    recorded = store.metadata(name)
    assert recorded["rows"] == PRODUCTS * PHOTOS
    assert recorded["model_package"] == first["model_package"]
    assert recorded["model_version"] == first["model_version"]
    assert recorded["categories"] == first["categories"]
    assert recorded["index"] == first["index"]
    store.close()

    # A night whose index really loses recall: IVF with one cell per image (nlist is clamped
    # to the 30 rows) probing a single cell finds the query image and hardly anything else.
    lossy = dataclasses.replace(
        config, index=IndexConfig(index_type="IVF_FLAT", ivf_nlist=1024, ivf_nprobe=1)
    )
    with pytest.raises(IndexVerificationError, match=r"recall@10 .* is 0\.\d{3}, below") as err:
        _build(validated, package, lossy)
    message = str(err.value)
    assert "IVF_FLAT" in message and "0.95" in message
    failed = message.split(":")[0].removeprefix("collection ")
    assert failed.startswith(COLLECTION_PREFIX) and failed > name
    assert not list((tmp_path / "milvus").glob(f"{failed}*"))  # dropped, files and all
    assert _collections(config) == [name]
    assert _served(config) == name  # the previous collection keeps serving

    second = _build(validated, package, config)
    assert second["previous"] == name
    assert second["collection"] > failed
    assert _served(config) == second["collection"]
    assert _collections(config) == [name, second["collection"]]

    # A build killed after the second one began leaves an unfinished collection older than
    # the served one: rollback must skip it and go back to the first.
    started = second["collection"].removeprefix(COLLECTION_PREFIX).split("_")[0]
    killed = collection_name(
        "killed", datetime.strptime(started, "%Y%m%dT%H%M%S%f") - timedelta(microseconds=1)
    )
    _orphan(config, killed)
    assert name < killed < second["collection"]
    back = rollback_index(config)
    assert back["collection"] == name
    assert back["previous"] == second["collection"]
    assert back["model_version"] == package_version(package)
    assert back["rows"] == PRODUCTS * PHOTOS
    assert _served(config) == name

    with pytest.raises(RuntimeError, match="nothing to roll back to"):
        rollback_index(config)
    assert _served(config) == name


def test_rollback_returns_to_what_was_served_before_not_to_what_was_rolled_back_from(
    tmp_path: Path, validated: Path, package: Path, capsys: pytest.CaptureFixture
) -> None:
    """a served, b built (bad), rolled back to a, c built: undoing c must bring back a, the
    collection c replaced, not b (the newest older one); a clean-up fills its places in that
    order. The links are read without opening a collection, so
    they hold while a service has the served one open."""
    config = _config(tmp_path, keep_collections=2)
    a, b = (_build(validated, package, config)["collection"] for _ in range(2))
    assert rollback_index(config)["collection"] == a
    c = _build(validated, package, config)["collection"]
    assert [(e["collection"], e["served"], e["rollback"]) for e in list_collections(config)] == [
        (a, False, 1),
        (b, False, None),
        (c, True, None),
    ]
    holder = _hold(config, c)  # a running service answers from c
    try:
        back = rollback_index(config)
    finally:
        holder.stop()
    assert (back["collection"], back["previous"]) == (a, c)

    # Forward again by name, while a service still answers from c; an unknown name is
    # refused with what to do.
    holder = _hold(config, c)
    try:
        assert rollback_index(config, to=c)["collection"] == c
    finally:
        holder.stop()
    with pytest.raises(RuntimeError, match=r"vitrine_nope .*vitrine index --list"):
        rollback_index(config, to="vitrine_nope")
    assert _served(config) == c

    assert main(["index", "--uri", config.uri, "--list"]) == 0
    listed = capsys.readouterr().out
    assert f"served      {c}  model {package_version(package)}" in listed
    assert f"rollback 1  {a}  model" in listed and "30 rows" in listed
    assert main(["index", "--uri", config.uri, "--rollback", a]) == 0
    assert f"-> {a} (was {c})" in capsys.readouterr().out

    # With room for one older collection, the rollback order takes it: b, rolled back from,
    # goes first (then a, beyond the room).
    rollback_index(config, to=c)
    d = _build(validated, package, dataclasses.replace(config, keep_collections=1))
    assert (d["previous"], d["removed"]) == (c, [a, b])
    assert not list((tmp_path / "milvus").glob(f"{b}*"))  # its card went with it


def test_a_build_warns_when_the_alias_moved_while_it_ran(
    tmp_path: Path,
    validated: Path,
    package: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An operator's rollback during a nightly build is undone by the build's swap: the build
    says so, and how to roll back again."""
    import components.index as index

    config = _config(tmp_path)
    a, b = (_build(validated, package, config)["collection"] for _ in range(2))
    verify = index.verify_collection

    def rolled_back_meanwhile(store: VectorStore, *args, **kwargs) -> dict:
        store.point_alias(a)  # what `vitrine index --rollback` does
        return verify(store, *args, **kwargs)

    monkeypatch.setattr(index, "verify_collection", rolled_back_meanwhile)
    with caplog.at_level("WARNING", logger="components.index"):
        c = _build(validated, package, config)
    assert (c["previous"], c["alias_moved_during_build"]) == (a, True)
    assert f"moved while this build ran ({b} -> {a}" in caplog.text
    assert f"vitrine index --rollback {a}" in caplog.text
    monkeypatch.undo()
    assert _build(validated, package, config)["alias_moved_during_build"] is False


def test_cleanup_keeps_the_newest_and_drops_orphans(
    tmp_path: Path, validated: Path, package: Path
) -> None:
    config = _config(tmp_path, keep_collections=1)
    first = _build(validated, package, config)["collection"]
    second = _build(validated, package, config)
    assert second["removed"] == []  # one older collection: kept
    # What killed builds leave: rows, no index, no metadata. One started while the second
    # collection was served; one is newer than anything (the newest-first rule alone).
    orphan = _orphan(config, collection_name("killed"))
    future = _orphan(config, collection_name("killed", datetime(2999, 1, 1, tzinfo=UTC)))
    assert _collections(config) == [first, second["collection"], orphan, future]

    third = _build(validated, package, config)
    assert third["previous"] == second["collection"]
    # The orphan is older than the new collection but is not one of the kept ones.
    assert third["removed"] == [first, orphan, future]
    assert _collections(config) == [second["collection"], third["collection"]]
    for gone in third["removed"]:
        assert not list((tmp_path / "milvus").glob(f"{gone}*"))
    assert _served(config) == third["collection"]


def test_config_from_a_mapping() -> None:
    flat = IndexBuildConfig.from_dict({"uri": "x", "index_type": "HNSW", "hnsw_ef": 32})
    nested = IndexBuildConfig.from_dict(
        {"uri": "x", "index": {"index_type": "HNSW", "hnsw_ef": 32}}
    )
    assert flat == nested
    assert flat.index == IndexConfig(index_type="HNSW", hnsw_ef=32)
    assert IndexBuildConfig.from_dict({}) == IndexBuildConfig()
    with pytest.raises(ValueError, match="hnsw_eff"):
        IndexBuildConfig.from_dict({"hnsw_eff": 1})
    with pytest.raises(ValueError, match="nope"):
        IndexBuildConfig.from_dict({"index": {"nope": 1}})


def test_the_repository_params_parse() -> None:
    raw = load_params(REPO / "params.yaml", "index")
    config = IndexBuildConfig.from_dict(raw)
    assert config.uri == raw["uri"]
    assert config.index.index_type == raw["index_type"]
    assert config.verify_floor == raw["verify_floor"]
    assert config.keep_collections == raw["keep_collections"]


def test_collection_names_sort_by_build_time() -> None:
    early = collection_name("tiny v1/2", datetime(2024, 6, 1, 2, 3, 4, 5, tzinfo=UTC))
    late = collection_name("tiny v1/2", datetime(2024, 6, 1, 2, 3, 4, 6, tzinfo=UTC))
    assert early == f"{COLLECTION_PREFIX}20240601T020304000005_tiny_v1_2"
    assert early < late


def _hold(config: IndexBuildConfig, name: str) -> LiteProcess:
    """Open ``name`` in another process, as a running service or build holds its file."""
    return LiteProcess(Path(config.uri) / f"{name}.db")


def test_cleanup_spares_what_another_process_has_open_and_what_the_alias_left(
    tmp_path: Path, validated: Path, package: Path
) -> None:
    """A service answers from the previous collection until it rolls out, and may serve any
    collection it was rolled out to; a build may be writing one beside this one. None of
    them may lose its files under a clean-up (keep_collections 0 keeps no other)."""
    config = _config(tmp_path, keep_collections=3)
    a, b, c = (_build(validated, package, config)["collection"] for _ in range(3))
    rollback_index(config)
    assert rollback_index(config)["collection"] == a  # served; b and c are newer
    running = _orphan(config, collection_name("running"))  # a build still inserting
    holders = [_hold(config, b), _hold(config, running)]
    try:
        with pytest.raises(StoreUnavailable, match="open in another process"):
            VectorStore(config.uri).load(b)
        d = _build(validated, package, dataclasses.replace(config, keep_collections=0))
    finally:
        for holder in holders:
            holder.stop()
    assert d["previous"] == a
    assert d["removed"] == [c]  # finished, older than d, not open anywhere
    assert _collections(config) == [a, b, running, d["collection"]]
    assert _served(config) == d["collection"]


def test_a_catalogue_whose_images_vanished_is_refused_before_milvus(
    tmp_path: Path, validated: Path, package: Path
) -> None:
    config = _config(tmp_path)
    served = _build(validated, package, config)["collection"]
    with validated.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    moved = tmp_path / "moved.csv"

    def write(broken: int) -> None:
        gone = [{**row, "image_uri": str(tmp_path / "gone" / f"{n}.jpg")} for n, row in
                enumerate(rows[:broken])]  # fmt: skip
        with moved.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fields)
            writer.writeheader()
            writer.writerows(gone + rows[broken:])

    write(broken=PRODUCTS * PHOTOS)  # every image gone
    with pytest.raises(UnreadableCatalogueError, match=r"30 of 30 images .* could not be read"):
        _build(moved, package, config)
    write(broken=2)  # 2 of 30: over the default 5%
    with pytest.raises(UnreadableCatalogueError, match=r"2 of 30 .*gone/.*max_unreadable"):
        _build(moved, package, config)
    assert _collections(config) == [served] and _served(config) == served
    lenient = _build(moved, package, dataclasses.replace(config, max_unreadable=0.1))
    assert (lenient["rows"], lenient["skipped_images"]) == (28, 2)


def test_lite_folder_drops_only_a_db_suffix(tmp_path: Path) -> None:
    assert VectorStore(str(tmp_path / "milvus.db")).folder == tmp_path / "milvus"
    assert VectorStore(str(tmp_path / "milvus.a")).folder == tmp_path / "milvus.a"
    assert VectorStore(str(tmp_path / "milvus")).folder == tmp_path / "milvus"


def test_an_unfinished_collection_on_a_server_is_kept_while_its_build_may_run() -> None:
    server = VectorStore("http://127.0.0.1:1")  # never reached: only its kind matters
    young = collection_name("m", datetime.now(UTC) - timedelta(hours=1))
    old = collection_name("m", datetime.now(UTC) - ORPHAN_AFTER - timedelta(minutes=1))
    assert _may_still_be_building(server, young)
    assert not _may_still_be_building(server, old)
    assert _may_still_be_building(server, "vitrine_not_a_build")  # unknown age: keep
    assert not _may_still_be_building(VectorStore("/tmp/lite"), young)  # Lite: its lock says


def test_a_collection_open_in_this_process_is_not_held_elsewhere(
    tmp_path: Path, validated: Path, package: Path
) -> None:
    config = _config(tmp_path)
    name = _build(validated, package, config)["collection"]
    reader = VectorStore(config.uri)
    reader.load(name)  # this process holds the file lock now
    try:
        assert VectorStore(config.uri).held_elsewhere(name) is False
    finally:
        reader.close()
    holder = _hold(config, name)
    try:
        assert VectorStore(config.uri).held_elsewhere(name) is True
    finally:
        holder.stop()


def test_rollback_refuses_a_collection_another_process_holds_without_a_finished_build(
    tmp_path: Path, validated: Path, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A build still running holds its collection and has recorded nothing: the alias must
    not go to it (it may fail its verification and be dropped)."""
    config = _config(tmp_path)
    served = _build(validated, package, config)["collection"]
    running = _orphan(config, collection_name("running"))
    holder = _hold(config, running)
    try:
        with pytest.raises(RuntimeError, match="may be a build still running"):
            rollback_index(config, to=running)
        listed = {entry["collection"]: entry for entry in list_collections(config)}
        assert listed[running]["finished"] is None  # cannot be told, not "finished"
        capsys.readouterr()
        assert main(["index", "--list", "--uri", config.uri]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if running in x)
        assert line.split()[0] == "unknown", line
    finally:
        holder.stop()
    with pytest.raises(RuntimeError, match="not a finished collection"):
        rollback_index(config, to=running)  # released: known unfinished
    assert _served(config) == served


def test_alias_moves_wait_for_a_clean_up_in_progress(
    tmp_path: Path, validated: Path, package: Path
) -> None:
    """A rollback landing while a build cleans up (or moves the alias) waits for it: it
    could otherwise point the alias at a collection the clean-up is about to drop."""
    config = _config(tmp_path)
    first = _build(validated, package, config)["collection"]
    second = _build(validated, package, config)["collection"]
    cleaning = VectorStore(config.uri, alias=config.alias)
    rolled: dict = {}
    with cleaning.alias_lock():  # what a build holds through its alias move and clean-up
        thread = threading.Thread(target=lambda: rolled.update(rollback_index(config)))
        thread.start()
        thread.join(1.0)
        assert thread.is_alive() and _served(config) == second  # waiting
    thread.join(30)
    assert not thread.is_alive() and rolled["collection"] == first == _served(config)
    cleaning.close()


def test_two_alias_moves_at_once_each_land_whole(tmp_path: Path) -> None:
    """Each move writes a staging file of its own: concurrent moves never swap each other's
    file (the alias ends at one of the targets, and no move fails)."""
    folder = tmp_path / "milvus"
    names = [f"{COLLECTION_PREFIX}20240601T00000000000{n}_m" for n in range(4)]
    errors: list[BaseException] = []

    def move(name: str) -> None:
        store = VectorStore(str(folder))
        try:
            for _ in range(200):
                store.point_alias(name)
        except BaseException as err:  # collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=move, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert VectorStore(str(folder)).alias_target() in names
    assert [p.name for p in folder.iterdir()] == [f"{DEFAULT_ALIAS}.alias"]  # no staging left


def test_a_bad_uri_fails_before_the_catalogue_is_embedded(
    tmp_path: Path, validated: Path, package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_folder = tmp_path / "milvus"
    not_a_folder.write_text("a file where the Milvus Lite folder should be")

    def embed(*args, **kwargs):
        raise AssertionError("the catalogue was embedded before the store was checked")

    monkeypatch.setattr("components.index.embed_catalogue", embed)
    with pytest.raises(StoreError, match="cannot be a Milvus Lite folder"):
        _build(validated, package, _config(tmp_path))
    assert main(["index", str(validated), "--package", str(package), "--uri",
                 str(not_a_folder), "--quiet"]) == 2  # fmt: skip


def test_a_drop_killed_half_way_leaves_no_half_collection(
    tmp_path: Path, validated: Path, package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drop killed while deleting the files (which takes a while for a large collection)
    leaves nothing that --list and --rollback could take for a whole collection: its card
    and files left in one step each, and the next drop empties what was left."""
    config = _config(tmp_path)
    doomed = _build(validated, package, config)["collection"]
    served = _build(validated, package, config)["collection"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill during the deletion of the files

    monkeypatch.setattr("serving.store.shutil.rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        VectorStore(config.uri).drop(doomed)
    monkeypatch.undo()
    assert _collections(config) == [served]
    with pytest.raises(RuntimeError, match="nothing to roll back to"):
        rollback_index(config)
    assert _served(config) == served
    leftovers = Path(config.uri) / TRASH_FOLDER
    assert any(leftovers.iterdir())
    VectorStore(config.uri).drop("vitrine_no_such_collection")  # any later drop clears it
    assert not leftovers.exists()


def test_cleanup_keeps_a_collection_whose_build_cannot_be_told(
    tmp_path: Path, validated: Path, package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collection built before cards whose record cannot be read (a service opened it since
    the clean-up's check, or a server's blip) is kept: it may be whole and in use."""
    config = _config(tmp_path, keep_collections=3)
    first, second, served = (_build(validated, package, config)["collection"] for _ in range(3))
    (Path(config.uri) / f"{first}{CARD_SUFFIX}").unlink()  # built before cards
    recorded = VectorStore.recorded

    def unreadable(self: VectorStore, name: str) -> dict:
        if name == first:
            raise StoreUnavailable(f"{name} is held by another process")
        return recorded(self, name)

    monkeypatch.setattr(VectorStore, "recorded", unreadable)
    store = VectorStore(config.uri, alias=config.alias)
    try:
        assert cleanup_collections(store, keep=0) == [second]
    finally:
        store.close()
    assert _collections(config) == [first, served]


def test_a_drop_survives_another_drop_emptying_the_trash_meanwhile(
    tmp_path: Path, validated: Path, package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two drops share the trash folder: one emptying it while the other moves its files
    there must not leave a collection half-dropped (its card gone, its files kept)."""
    config = _config(tmp_path)
    doomed = _build(validated, package, config)["collection"]
    served = _build(validated, package, config)["collection"]
    trash = Path(config.uri) / TRASH_FOLDER
    real_replace = os.replace
    emptied = []

    def after_another_drop(source, target) -> None:
        if not emptied and Path(target).parent == trash:
            shutil.rmtree(trash)  # the other drop's last step, just before this rename
            emptied.append(target)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", after_another_drop)
    VectorStore(config.uri).drop(doomed)
    monkeypatch.undo()
    assert emptied, "the drop moved nothing into the trash"
    assert _collections(config) == [served]
    assert not list(Path(config.uri).glob(f"{doomed}*"))


def test_rollback_with_a_wrong_uri_says_so_and_makes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a Milvus Lite folder")
    typo = tmp_path / "milvsu"
    for uri in (a_file, typo):
        assert main(["index", "--rollback", "--uri", str(uri)]) == 2
        assert "is not a Milvus Lite folder" in capsys.readouterr().err
    assert not typo.exists()


def test_a_build_that_cannot_take_the_alias_lock_leaves_no_collection_behind(
    tmp_path: Path, validated: Path, package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process held the alias too long: the build fails saying to try again, and its
    collection, which nothing points at, goes (each retry would leave one more)."""
    config = _config(tmp_path)
    served = _build(validated, package, config)["collection"]
    monkeypatch.setattr("serving.store.ALIAS_LOCK_WAIT_S", 0.3)
    other = VectorStore(config.uri, alias=config.alias)  # its own lock file handle
    with other.alias_lock(), pytest.raises(AliasBusy, match="try again"):
        _build(validated, package, config)
    other.close()
    assert _collections(config) == [served] and _served(config) == served
