"""The index step: embed the validated catalogue, build a new Milvus collection, verify it
against exact search, move the alias, clean up. And its undo, :func:`rollback_index`.

A failed build never touches the alias: the collection being built is dropped and the
service keeps searching the previous one. The CLI (``vitrine index``), the DVC stage, the KFP
component and the Airflow task all call :func:`build_index`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from serving.catalogue_rules import RULES_KEY, CatalogueRules
from serving.store import (
    COLLECTION_PREFIX,
    DEFAULT_ALIAS,
    META_VALUE_CHARS,
    AliasBusy,
    IndexConfig,
    IndexSpec,
    StoreError,
    StoreUnavailable,
    VectorStore,
    rows_in_batches,
)

log = logging.getLogger(__name__)
CATALOG_FIELDS = ("product_id", "category", "title", "price")
# Columns of a validated manifest that are validation's own, not catalogue data.
_VALIDATION_COLUMNS = {"source_row", "image_uri", "image_sha256", "image_format", "width", "height"}


class IndexVerificationError(RuntimeError):
    """The new collection's ANN results disagree with exact search more than allowed."""


class UnreadableCatalogueError(ValueError):
    """Too many of the validated catalogue's images could not be read to index them."""


# An unfinished collection on a server (no file lock tells whether its build still runs) is
# taken for a killed build's leftover once its name is this old.
ORPHAN_AFTER = timedelta(hours=12)
_STAMP = "%Y%m%dT%H%M%S%f"  # a collection name's build time (UTC): names sort by it


@dataclass(frozen=True)
class IndexBuildConfig:
    """Where and how to build (the ``index`` section of ``params.yaml``).

    Attributes:
        uri: A folder for embedded Milvus Lite, or ``http://host:19530`` for a server.
        alias: The alias the search service reads.
        index: Index type and parameters.
        verify_queries: Catalogue images used as queries to verify the index (at least 200,
            or all images when there are fewer).
        verify_k: Depth compared between ANN and exact search.
        verify_floor: Lowest acceptable ANN recall@k against exact search.
        keep_collections: Older collections kept for rollback, besides the served one (the
            collection the alias pointed at before the build is always kept).
        max_unreadable: Largest fraction of the catalogue's images that may fail to read at
            indexing time (they passed validation, so they vanished or broke since); above
            it the build fails before creating a collection.
        batch_size: Images per forward pass when embedding.
        insert_batch: Rows per insert call.
        canary_queries: Probe photos the service's recall canary searches with (one per
            product with several photos).
        drift_window: Recent queries the service's drift gauge compares with the catalogue.
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    uri: str = "artifacts/milvus"
    alias: str = DEFAULT_ALIAS
    index: IndexConfig = field(default_factory=IndexConfig)
    verify_queries: int = 200
    verify_k: int = 10
    verify_floor: float = 0.95
    keep_collections: int = 2
    max_unreadable: float = 0.05
    batch_size: int = 64
    insert_batch: int = 1000
    device: str = "auto"
    canary_queries: int = 100
    drift_window: int = 256

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> IndexBuildConfig:
        """From a mapping; index parameters may be flat or under ``index:``."""
        from model.config import split_nested

        raw, index = split_nested(raw, cls, "index", IndexConfig, "index")
        return cls(index=IndexConfig(**index), **raw)


def collection_name(model_version: str, now: datetime | None = None) -> str:
    """``vitrine_<UTC time>_<model>``: names sort by build time."""
    stamp = (now or datetime.now(UTC)).strftime(_STAMP)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", model_version).strip("_")[:80]
    return f"{COLLECTION_PREFIX}{stamp}_{slug}"


def catalogue_rows(validated_manifest: str | Path) -> list[dict[str, Any]]:
    """The validated manifest as store rows (without embeddings yet)."""
    from model.datasets.catalog import read_manifest

    table = read_manifest(validated_manifest, ("product_id", "image_path", "image_uri"))
    rows = []
    for row in table.rows:
        values = row.values
        extras = {
            k: v
            for k, v in values.items()
            if k not in _VALIDATION_COLUMNS and k not in CATALOG_FIELDS
        }
        extras.pop("image_path", None)
        rows.append(
            {
                "image_id": values.get("image_sha256") or values["image_uri"],
                "product_id": values["product_id"],
                "category": values.get("category", ""),
                "title": values.get("title", ""),
                "price": float(values.get("price") or 0.0),
                "image_uri": values["image_uri"],
                "image_path": values["image_path"],
                **{k: v for k, v in extras.items() if v},
            }
        )
    return rows


def embed_catalogue(
    rows: list[dict[str, Any]], package_dir: Path, config: IndexBuildConfig, progress: bool
) -> tuple[np.ndarray, list[int]]:
    """Embed every row's image with the package's model; return vectors and the rows kept."""
    from model.datasets.records import ImageRecord
    from model.embed import embed_records
    from model.package import load_package
    from model.train import resolve_device

    device = resolve_device(config.device)
    model, model_config = load_package(package_dir, device)
    records = [
        ImageRecord(path=Path(r["image_uri"]), label=0, class_key=r["product_id"]) for r in rows
    ]
    found = embed_records(
        model,
        records,
        model_config.data,
        batch_size=config.batch_size,
        device=device,
        description="embedding catalogue",
        progress=progress,
    )
    return found.vectors, [int(i) for i in found.kept]


def check_readable(
    rows: list[dict[str, Any]], kept: list[int], max_unreadable: float, manifest: str | Path
) -> None:
    """Refuse to index a catalogue whose images mostly vanished since validation.

    Raises:
        UnreadableCatalogueError: None could be read, or more than ``max_unreadable`` of them
            could not; the message names the first ones.
    """
    if not rows:
        raise UnreadableCatalogueError(f"{manifest} lists no image: nothing to index")
    missing = len(rows) - len(kept)
    if kept and missing <= max_unreadable * len(rows):
        if missing:
            log.warning("%d of %d images could not be read and are not indexed", missing, len(rows))
        return
    readable = set(kept)
    first = [rows[i]["image_uri"] for i in range(len(rows)) if i not in readable][:3]
    raise UnreadableCatalogueError(
        f"{missing} of {len(rows)} images of {manifest} could not be read (more than "
        f"max_unreadable {max_unreadable:.0%}), e.g. {', '.join(map(str, first))}: were the "
        "images moved or deleted since validation? Fix their paths and re-run `vitrine "
        "validate`, or raise max_unreadable (params.yaml index section); the served "
        "collection was left as it was"
    )


def verify_collection(
    store: VectorStore,
    name: str,
    vectors: np.ndarray,
    image_ids: list[str],
    spec: IndexSpec,
    config: IndexBuildConfig,
    seed: int = 0,
) -> dict[str, Any]:
    """ANN top-k of the collection against exact top-k over the same embeddings.

    Returns:
        ``{"queries", "k", "recall_at_k", "floor", "passed"}``.
    """
    count = min(len(image_ids), max(config.verify_queries, 200))
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(image_ids), size=count, replace=False)
    k = min(config.verify_k, len(image_ids))
    exact = np.argsort(-(vectors[picked] @ vectors.T), axis=1)[:, :k]
    ann = store.search(name, vectors[picked], k, spec)
    overlap = [
        len({image_ids[j] for j in exact_row} & {hit["image_id"] for hit in hits}) / k
        for exact_row, hits in zip(exact, ann, strict=True)
    ]
    recall = float(np.mean(overlap)) if overlap else 1.0
    return {
        "queries": int(count),
        "k": int(k),
        "recall_at_k": recall,
        "floor": config.verify_floor,
        "passed": recall >= config.verify_floor,
    }


def build_index(
    validated_manifest: str | Path,
    package_dir: str | Path,
    config: IndexBuildConfig | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Build, verify and serve a new collection for a validated catalogue and a model.

    Args:
        validated_manifest: ``validated.csv`` from the validate step.
        package_dir: The model package whose embeddings fill the collection.
        config: Where and how; :class:`IndexBuildConfig` defaults when None.
        progress: Show progress bars.

    Returns:
        The build summary: collection, previous collection, index spec, rows, verification,
        timings, and what was cleaned up.

    Raises:
        IndexVerificationError: ANN recall@k against exact search is below the floor (the new
            collection is dropped; the alias still points at the previous one).
        StoreUnavailable: Milvus cannot be reached.
    """
    from model.package import package_version

    config = config or IndexBuildConfig()
    package_dir = Path(package_dir).resolve()
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    version = package_version(package_dir)
    all_rows = catalogue_rows(validated_manifest)
    store = VectorStore(config.uri, alias=config.alias)
    try:
        store.check()  # before embedding the catalogue (an hour, for a large one)
        served_at_start = store.alias_target()
        vectors, kept = embed_catalogue(all_rows, package_dir, config, progress)
        rows = [all_rows[i] for i in kept]
        check_readable(all_rows, kept, config.max_unreadable, validated_manifest)
    except BaseException:
        store.close()
        raise
    seconds["embed"] = time.perf_counter() - started

    name = collection_name(version)
    tick = time.perf_counter()
    try:
        store.create_collection(name, int(vectors.shape[1]))
        with tqdm(total=len(rows), desc="inserting", unit="row", disable=not progress) as bar:
            for offset, batch in enumerate(rows_in_batches(rows, config.insert_batch)):
                start = offset * config.insert_batch
                vectors_batch = vectors[start : start + len(batch)]
                store.insert(
                    name,
                    [{**row, "embedding": v} for row, v in zip(batch, vectors_batch, strict=True)],
                )
                bar.update(len(batch))
        seconds["insert"] = time.perf_counter() - tick
        tick = time.perf_counter()
        spec = store.build_index(name, config.index)
        seconds["index"] = time.perf_counter() - tick
        tick = time.perf_counter()
        verification = verify_collection(
            store, name, vectors, [r["image_id"] for r in rows], spec, config
        )
        seconds["verify"] = time.perf_counter() - tick
        if not verification["passed"]:
            raise IndexVerificationError(
                f"collection {name}: ANN recall@{verification['k']} against exact search is "
                f"{verification['recall_at_k']:.3f}, below the floor "
                f"{config.verify_floor} (index {spec.index_type} {spec.build_params}, search "
                f"{spec.search_params}); it was dropped and the alias left as it was"
            )
        metadata = {
            "model_version": version,
            "model_package": str(package_dir),
            "manifest": str(Path(validated_manifest).resolve()),
            # What the admin API holds its adds and updates to (serving/catalogue_rules.py).
            RULES_KEY: CatalogueRules.of_validated_manifest(validated_manifest).to_dict(),
            "index": dataclasses.asdict(spec),
            "verification": verification,
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "dim": int(vectors.shape[1]),
            "categories": sorted({r["category"] for r in rows if r["category"]}),
        }
        yardsticks = service_yardsticks(rows, vectors, config)
        for key, document in yardsticks.items():
            store.set_metadata(name, document, key=key)
        store.set_metadata(name, metadata)  # marks the build complete
        card = {
            "model_version": version,
            "built_at": metadata["built_at"],
            "index_type": spec.index_type,
            "rows": len(rows),
            "replaced": store.alias_target(),  # where a rollback from it goes
        }
        store.set_card(name, card)
    except BaseException:
        store.drop(name)
        store.close()
        raise
    try:
        with store.alias_lock():  # one alias move or clean-up at a time (see alias_lock)
            previous = store.point_alias(name)
            if previous != card["replaced"]:  # another build moved the alias in between
                store.set_card(name, {**card, "replaced": previous})
            removed = cleanup_collections(store, config.keep_collections, previous)
    except AliasBusy:  # the alias never pointed at it: a retry would leave it behind
        store.drop(name)
        raise
    finally:
        store.close()
    if previous != served_at_start:
        log.warning(
            "alias %s moved while this build ran (%s -> %s: another build, or a rollback); "
            "this build now replaces %s. If that was a rollback, roll back again: "
            "vitrine index --rollback %s",
            config.alias,
            served_at_start,
            previous,
            previous,
            previous,
        )
    seconds["total"] = time.perf_counter() - started
    summary = {
        "collection": name,
        "previous": previous,
        "alias_moved_during_build": previous != served_at_start,
        "alias": config.alias,
        "uri": config.uri,
        "rows": len(rows),
        "skipped_images": len(all_rows) - len(rows),
        **metadata,
        "removed": removed,
        "seconds": seconds,
    }
    log.info(
        "alias %s -> %s (%d rows, %s, recall@%d %.3f)",
        config.alias,
        name,
        len(rows),
        spec.index_type,
        verification["k"],
        verification["recall_at_k"],
    )
    return summary


def service_yardsticks(
    rows: list[dict[str, Any]], vectors: np.ndarray, config: IndexBuildConfig
) -> dict[str, dict[str, Any]]:
    """The recall canary's probes and the drift reference the service watches itself with
    (see serving/probes.py), trimmed to fit one metadata document."""
    from serving.probes import canary_probes, drift_reference

    canary = canary_probes(rows, vectors, config.canary_queries)
    while len(canary["probes"]) > 1 and len(json.dumps(canary)) > META_VALUE_CHARS:
        canary = canary_probes(rows, vectors, len(canary["probes"]) // 2)
    return {"canary": canary, "drift": drift_reference(vectors, config.drift_window)}


def _build_record(store: VectorStore, name: str) -> tuple[bool | None, dict[str, Any]]:
    """Whether a build finished ``name`` (a killed build never records its metadata), and
    what it recorded: its card, or for a collection built before cards the same facts from
    its metadata. None: it cannot be told (another process holds a collection without a
    card: a build still running, or a service on a collection built before cards)."""
    card = store.card(name)  # written after the metadata, readable without opening ``name``
    if card:
        return True, card
    try:
        build = store.recorded(name)
    except StoreUnavailable:  # held by another process (Lite file lock)
        return None, {}
    except StoreError:  # no companion collection: the build died before creating it
        return False, {}
    facts = {
        "model_version": build.get("model_version"),
        "built_at": build.get("built_at"),
        "index_type": build.get("index", {}).get("index_type"),
    }
    return bool(build.get("model_version")), facts


def _finished(store: VectorStore, name: str) -> bool:
    """Whether a build recorded its metadata in ``name`` (a killed build never does; one
    that cannot be told is not taken for finished: the alias must never go to it)."""
    return _build_record(store, name)[0] is True


def _built_at(name: str) -> datetime | None:
    """When the build that created ``name`` started (its name says), or None."""
    stamp = name.removeprefix(COLLECTION_PREFIX).split("_", 1)[0]
    try:
        return datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC)
    except ValueError:
        return None


def _may_still_be_building(store: VectorStore, name: str) -> bool:
    """Whether an unfinished collection could belong to a build that is still running: on a
    server, one created less than :data:`ORPHAN_AFTER` ago (on Lite a running build holds
    the file lock, which :func:`cleanup_collections` checks first)."""
    if store.embedded:
        return False
    built = _built_at(name)
    return built is None or datetime.now(UTC) - built < ORPHAN_AFTER


def rollback_order(
    store: VectorStore, served: str | None, names: list[str], limit: int | None = None
) -> list[str]:
    """Where successive rollbacks from ``served`` go, nearest first (at most ``limit``).

    Each build records the collection it replaced; the order follows those links back (so a
    collection rolled back from is not returned to when a later build replaced the one
    rolled back to). Where a link is missing (a collection built before links were
    recorded) or leads to a dropped or unfinished collection, the newest finished collection
    older than the current step stands in.
    """
    present = set(names)
    order: list[str] = []
    seen = {served}
    current = served
    while limit is None or len(order) < limit:
        linked = store.card(current).get("replaced") if current in present else None
        if linked in present and linked not in seen and _finished(store, linked):
            step = linked
        else:
            older = (n for n in reversed(names) if current is None or n < current)
            step = next((n for n in older if n not in seen and _finished(store, n)), None)
        if step is None:
            return order
        order.append(step)
        seen.add(step)
        current = step
    return order


def cleanup_collections(store: VectorStore, keep: int, previous: str | None = None) -> list[str]:
    """Drop the collections a rollback will not need, and the leftovers of killed builds.

    Kept: the served collection; ``previous`` (what the alias pointed at before, which
    running services still answer from until they roll out); ``keep`` older finished
    collections, the first ones of the :func:`rollback_order` before the newest others (so
    a collection rolled back from goes before the one rolled back to); finished collections
    newer than the served one (a build that ran beside this one); any collection another
    process uses (a Milvus Lite file lock: a service or a build; a service's lease on a
    server, see VectorStore.hold); and, on a server,
    unfinished collections younger than :data:`ORPHAN_AFTER`. Dropped: other finished
    collections older than the served one, and unfinished ones (killed builds). Returns the
    dropped names, oldest first.
    """
    with store.alias_lock():  # no rollback or other build moves the alias meanwhile
        return _clean_up(store, keep, previous)


def _clean_up(store: VectorStore, keep: int, previous: str | None) -> list[str]:
    served = store.alias_target()
    names = store.collections()
    if served not in names:
        return []
    chain = rollback_order(store, served, names, keep)
    spared = {served, previous, *chain}
    # The rollback order fills the ``keep`` places first; what it leaves, the newest others.
    kept = len(chain)
    doomed = []
    for name in reversed(names):  # newest first
        if name in spared:
            continue
        held = store.held_elsewhere(name)
        if held is not False:
            log.info("collection %s is in use elsewhere (or cannot be told): kept", name)
            continue
        finished = _build_record(store, name)[0]
        if finished is None:  # held since the check above, or a server's blip: not dropped
            log.info("collection %s: whether its build finished cannot be told: kept", name)
            continue
        if not finished:
            if not _may_still_be_building(store, name):
                doomed.append(name)
        elif name < served:
            if kept < keep:
                kept += 1
            else:
                doomed.append(name)
    doomed.sort()  # oldest first
    dropped = []
    for name in doomed:
        # A server has no alias lock: a rollback may have moved the alias here meanwhile.
        if not store.embedded and store.alias_target() == name:
            log.warning("alias %s moved to %s during the clean-up: kept", store.alias, name)
            continue
        store.drop(name)
        dropped.append(name)
    return dropped


def rollback_index(config: IndexBuildConfig | None = None, to: str | None = None) -> dict[str, Any]:
    """Point the alias back at the collection served before the current one (see
    :func:`rollback_order`), or at ``to``, any finished collection kept.

    Raises:
        RuntimeError: There is nothing to roll back to, or ``to`` is not a finished
            collection of this store.
    """
    config = config or IndexBuildConfig()
    store = VectorStore(config.uri, alias=config.alias)
    try:
        if store.embedded and not store.folder.is_dir():  # a typo must not make a folder
            raise RuntimeError(
                f"nothing to roll back to: {config.uri} is not a Milvus Lite folder "
                "(give --uri the folder `vitrine index` built into)"
            )
        with store.alias_lock():  # no build's clean-up drops the target meanwhile
            return _roll_back(store, config, to)
    finally:
        store.close()


def _roll_back(store: VectorStore, config: IndexBuildConfig, to: str | None) -> dict[str, Any]:
    served = store.alias_target()
    names = store.collections()
    if to is not None:
        finished = _build_record(store, to)[0] if to in names else False
        if finished is None:
            raise RuntimeError(
                f"{to} is open in another process and records no finished build: it may be a "
                "build still running; roll back to it once that build is done"
            )
        if not finished:
            raise RuntimeError(
                f"{to} is not a finished collection in {config.uri}; "
                "`vitrine index --list` shows the ones kept"
            )
        target = to
    else:
        target = next(iter(rollback_order(store, served, names, 1)), None)
    if target is None:
        raise RuntimeError(
            f"nothing to roll back to: alias {config.alias} serves {served} and no older "
            f"finished collection is kept in {config.uri}"
        )
    if store.embedded:
        # Lite loads a collection per process, so loading it here would serve nobody, and
        # fail while a running service (the one to switch back) has it open.
        details = {**_recorded_or_empty(store, target), **store.card(target)}
    else:
        store.load(target)  # a server's services search it as soon as they roll out
        details = store.metadata(target)
    store.point_alias(target)
    return {"alias": config.alias, "collection": target, "previous": served, **details}


def list_collections(config: IndexBuildConfig | None = None) -> list[dict[str, Any]]:
    """The store's Vitrine collections, oldest first: for each, whether the alias serves it,
    its place in the rollback order (1 = where ``--rollback`` goes), whether its build
    finished, and what the build recorded (model version, build time, index type, rows)."""
    config = config or IndexBuildConfig()
    store = VectorStore(config.uri, alias=config.alias)
    try:
        served = store.alias_target()
        names = store.collections()
        order = rollback_order(store, served, names) if served in names else []
        listed = []
        for name in names:
            finished, facts = _build_record(store, name)
            listed.append(
                {
                    "collection": name,
                    "served": name == served,
                    "rollback": order.index(name) + 1 if name in order else None,
                    "finished": finished,
                    **{key: facts.get(key) for key in _CARD_FIELDS},
                }
            )
        return listed
    finally:
        store.close()


_CARD_FIELDS = ("model_version", "built_at", "index_type", "rows")


def _recorded_or_empty(store: VectorStore, name: str) -> dict[str, Any]:
    try:
        return store.recorded(name)
    except StoreError:  # held by another process, or no metadata
        return {}
