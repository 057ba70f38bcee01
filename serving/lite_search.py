"""Faster search and query for Milvus Lite 3.2, installed wherever Vitrine runs Lite.

Milvus Lite 3.2 searches (``milvus_lite.search.executor_indexed.execute_search_with_index``)
with two pieces of per-call Python whose cost has nothing to do with the query:

1. **Which rows count.** Rows shadowed by a later upsert or a delete must not be returned, so
   every call loops over every row of every segment (the highest sequence number per key,
   then a mask): about 7.6 ms per call at 20K rows and 47 ms at 100K, however few queries.
2. **The hits' fields.** Each hit's whole row is turned into Python, its embedding included
   (hundreds of floats), before the projection keeps the fields asked for: about 17 us a hit
   with 512-d embeddings, more at 1,280; the projection then spends 15 us more a hit scanning
   the schema again for every field.

Its ``query()`` (a product's rows, an image's row) makes the same pass over every row
(``search.bitmap.build_valid_mask``), after listing a ``(segment, row)`` pair for every row
and gathering every vector (``search.assembler.assemble_candidates``): 170 ms at 100K rows
to find four.

This module returns the same answers, in the same order, with the same fields:

1. Segments are immutable files, so the segments-only part of (1) is computed once per set of
   segments and cached; each call re-checks only the keys that the in-memory table or a
   tombstone touches (usually none, a few after admin changes). Search and query share it.
2. The hits' rows come from one Arrow ``take`` per segment, of every column except vector
   columns nobody asked for; :func:`project_record` projects them as Lite's does, with the
   schema's names looked up once per record instead of once per field.
3. A query's candidates are named by position and turned into ``(segment, row)`` only for
   the rows that match; the vectors, which query does not read, are not gathered.

What it cannot do exactly (a segment holding a key twice, an unknown tombstone layout) goes to
Lite's own functions. With many unflushed changes or deletes (thousands of keys, before Lite
compacts them away) the re-check costs about what Lite's own pass does (0.95-1.15x its time
in probes with 10,000 deletes and 5,000-10,000 unflushed rows over 10-40 segments).
``tests/test_lite_search.py`` holds both to the same answers, searches and queries, on
collections through inserts, upserts, deletes, flushes, filters and partitions. Installed only
on the Lite versions it was written against; ``VITRINE_LITE_FAST_SEARCH=0`` leaves Lite's own.
"""

from __future__ import annotations

import bisect
import collections
import collections.abc
import contextlib
import copy
import importlib
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# The Milvus Lite versions whose executor this one reproduces (tests/test_lite_search.py).
SUPPORTED_VERSIONS = frozenset({"3.2.2"})
SWITCH = "VITRINE_LITE_FAST_SEARCH"
# Sets of segments whose validity is kept: the served collection's, plus a few retired by a
# flush or compaction (9 bytes a row each: the masks, and the sequence numbers held so that
# the ids in the key stay theirs; the segments themselves are not held).
CACHED_SEGMENT_SETS = 4

Candidate = tuple[float, int, int]  # (distance, source, row within the source)


@dataclass(frozen=True)
class _SegmentsValidity:
    """Rows of a set of segments that are their key's latest version among those segments."""

    seqs: tuple[np.ndarray, ...]  # each segment's, held: the cache key is their ids
    valid: tuple[np.ndarray, ...]  # per segment: rows whose seq is their key's highest


_cache: collections.OrderedDict[tuple[int, ...], _SegmentsValidity] = collections.OrderedDict()
_cache_lock = threading.Lock()
_originals: dict[tuple[str, str], Callable[..., Any]] = {}  # replaced: (module, name) -> it
_install_lock = threading.Lock()
_lite_projection: Any = None  # milvus_lite.engine.projection, once project_record ran


def _import_lite_projection() -> Any:
    """Lite's projection module, whose helpers project_record shares (imported on first use:
    importing this module must not import Milvus Lite)."""
    global _lite_projection
    from milvus_lite.engine import projection

    _lite_projection = projection
    return projection


def lite_version() -> str:
    from milvus_lite import __version__

    return str(__version__)


def install() -> bool:
    """Make Milvus Lite's collections in this process search, query and project with this
    module's functions (see ``_REPLACEMENTS``).

    Idempotent. Returns whether it is installed: not on other Lite versions, nor with
    ``VITRINE_LITE_FAST_SEARCH=0``.
    """
    with _install_lock:
        return _install()


def _install() -> bool:
    if _originals:
        return True
    if os.environ.get(SWITCH, "1").strip().lower() in {"0", "false", "no", "off"}:
        log.info("Milvus Lite searches with its own executor (%s=0)", SWITCH)
        return False
    try:
        version = lite_version()
    except ImportError:
        return False
    if version not in SUPPORTED_VERSIONS:
        log.warning(
            "Milvus Lite %s: its own search executor is used (serving/lite_search.py was "
            "written for %s)",
            version,
            ", ".join(sorted(SUPPORTED_VERSIONS)),
        )
        return False
    for (module_name, name), faster in _REPLACEMENTS.items():
        module = importlib.import_module(module_name)
        _originals[module_name, name] = getattr(module, name)
        setattr(module, name, faster)
    log.debug("Milvus Lite %s searches with serving.lite_search", version)
    return True


def uninstall() -> None:
    """Give Milvus Lite its own functions back (tests compare the two)."""
    with _install_lock:
        _uninstall()


def _uninstall() -> None:
    if not _originals:
        return
    for (module_name, name), original in _originals.items():
        setattr(importlib.import_module(module_name), name, original)
    _originals.clear()
    with _cache_lock:
        _cache.clear()


@contextlib.contextmanager
def lite_own() -> Iterator[None]:
    """Milvus Lite's own functions for the duration (benchmarks compare the two)."""
    was_installed = bool(_originals)
    uninstall()
    try:
        yield
    finally:
        if was_installed:
            install()


def _lite_own_function(module_name: str, name: str) -> Callable[..., Any]:
    """Lite's own ``name`` of ``module_name``, installed or not."""
    if (module_name, name) in _originals:
        return _originals[module_name, name]
    return getattr(importlib.import_module(module_name), name)


def execute_search(
    query_vectors: np.ndarray,
    segments: Any,
    memtable: Any,
    delta_index: Any,
    top_k: int,
    metric_type: str,
    pk_field: str,
    vector_field: str,
    partition_names: list[str] | None = None,
    compiled_filter: Any = None,
    output_fields: list[str] | None = None,
    indexed_filter_plan: Any = None,
    project_record_fn: Callable[[dict], dict] | None = None,
    search_params: dict[str, Any] | None = None,
) -> list[list[dict]]:
    """``execute_search_with_index`` of Milvus Lite 3.2, same arguments and answers."""
    arguments = dict(
        query_vectors=query_vectors,
        segments=segments,
        memtable=memtable,
        delta_index=delta_index,
        top_k=top_k,
        metric_type=metric_type,
        pk_field=pk_field,
        vector_field=vector_field,
        partition_names=partition_names,
        compiled_filter=compiled_filter,
        output_fields=output_fields,
        indexed_filter_plan=indexed_filter_plan,
        project_record_fn=project_record_fn,
        search_params=search_params,
    )
    tombstones = getattr(delta_index, "_map", None)
    if not isinstance(tombstones, dict):  # a layout this module does not know
        return _lite_own_function(_COLLECTION, "execute_search_with_index")(**arguments)

    if query_vectors.ndim == 1:
        query_vectors = query_vectors.reshape(1, -1)
    if query_vectors.dtype != np.float32:
        query_vectors = query_vectors.astype(np.float32, copy=False)
    nq = int(query_vectors.shape[0])
    if nq == 0 or top_k <= 0:
        return [[] for _ in range(nq)]

    in_scope, (mt_pks, mt_seqs, mt_vecs, mt_row_refs, mt_table) = _sources(
        segments, memtable, vector_field, partition_names, compiled_filter is not None
    )
    if not in_scope and not mt_pks:
        return [[] for _ in range(nq)]
    live = _live_masks(
        in_scope, mt_pks, mt_seqs, tombstones, delta_index, memtable.delete_index_snapshot()
    )
    if live is None:  # a segment holds a key twice: Lite's own loop handles that
        return _lite_own_function(_COLLECTION, "execute_search_with_index")(**arguments)
    segment_masks, mt_mask = live

    filter_masks, mt_filter_mask = _filter_masks(
        in_scope, mt_pks, mt_table, compiled_filter, indexed_filter_plan
    )

    candidates: list[list[Candidate]] = [[] for _ in range(nq)]
    sources: list[Sequence[Any]] = []  # each source's keys, by row

    def recall(source: int, vectors: np.ndarray, mask: np.ndarray, index: Any) -> None:
        if not mask.any():
            return
        if index is None:
            from milvus_lite.index.brute_force import BruteForceIndex

            index = BruteForceIndex.build(vectors, metric_type)
        ids, distances = index.search(
            query_vectors,
            top_k,
            valid_mask=None if mask.all() else mask,
            params=search_params,
        )
        negative = ids < 0
        # Each query's hits up to its first padding id (-1), as Lite reads them.
        lengths = np.where(negative.any(axis=1), negative.argmax(axis=1), ids.shape[1]).tolist()
        for found, n, near, rows in zip(
            candidates, lengths, distances.tolist(), ids.tolist(), strict=True
        ):
            found.extend(zip(near[:n], itertools.repeat(source, n), rows[:n], strict=True))

    for number, seg in enumerate(in_scope):
        vectors, null_mask = seg.vector_data(vector_field)
        sources.append(seg.pks)
        mask = segment_masks[number]
        combined = filter_masks[number]
        if null_mask is not None:
            combined = null_mask if combined is None else combined & null_mask
        if combined is not None:
            mask = mask & combined.astype(bool)
        recall(number, vectors, mask, seg.indexes.get(vector_field))

    if mt_pks:
        sources.append(mt_pks)
        mask = mt_mask
        if mt_filter_mask is not None:
            mask = mask & mt_filter_mask.astype(bool)
        recall(len(sources) - 1, mt_vecs, mask, None)

    for each in candidates:
        each.sort(key=lambda c: (c[0], c[1], c[2]))  # as Lite breaks ties
    winners = [each[:top_k] for each in candidates]
    records = _records(winners, in_scope, memtable, mt_row_refs, output_fields)
    project = _projection(project_record_fn, output_fields, pk_field, vector_field)
    results: list[list[dict]] = []
    given: set[tuple[int, int]] = set()
    for each in winners:
        hits = []
        for distance, source, row in each:
            record = records[source, row]
            if (source, row) in given:  # a row two queries found: no list shared between hits
                record = copy.deepcopy(record)
            given.add((source, row))
            pk = record[pk_field] if pk_field in record else sources[source][row]
            hits.append({"id": pk, "distance": distance, "entity": project(record)})
        results.append(hits)
    return results


def _sources(
    segments: Any,
    memtable: Any,
    vector_field: str | None,
    partition_names: list[str] | None,
    with_table: bool,
) -> tuple[list[Any], tuple[Any, ...]]:
    """The segments a search or query reads (non-empty, in its partitions), and the snapshot
    of the in-memory rows (``MemTable.to_search_snapshot``), as Lite gathers them."""
    wanted = set(partition_names) if partition_names else None
    in_scope = [s for s in segments if s.num_rows > 0 and (wanted is None or s.partition in wanted)]
    snapshot = memtable.to_search_snapshot(
        vector_field=vector_field, partition_names=partition_names, include_table=with_table
    )
    return in_scope, snapshot


def _filter_masks(
    segments: list[Any], mt_pks: list[Any], mt_table: Any, compiled: Any, plan: Any
) -> tuple[list[np.ndarray | None], np.ndarray | None]:
    """The scalar filter's mask of each segment and of the in-memory rows (None: no filter,
    or no in-memory rows), as Lite evaluates it."""
    if compiled is None:
        return [None] * len(segments), None
    from milvus_lite.search.filter import evaluate_mask
    from milvus_lite.search.indexed_filter import evaluate_segment_filter

    masks = [evaluate_segment_filter(seg, compiled, plan) for seg in segments]
    memory = evaluate_mask(compiled, mt_table) if mt_pks and mt_table is not None else None
    return masks, memory


def _live_masks(
    segments: list[Any],
    mt_pks: list[Any],
    mt_seqs: Any,
    tombstones: dict[Any, int],
    delta_index: Any,
    mt_deletes: dict[Any, tuple[int, Any]],
) -> tuple[list[np.ndarray], np.ndarray] | None:
    """Lite's rule for which rows count, over ``segments`` then the in-memory rows: a row is
    its key's latest version (highest seq over all of them) and no later delete, flushed
    (``delta_index``) or in memory (``mt_deletes``), shadows it. One mask per segment, then
    the in-memory rows'; None when a segment holds a key twice (for Lite's own loop).

    The segments-only answer is cached (:func:`_validity_of`); only the keys that the
    in-memory rows and the tombstones touch are checked again."""
    validity = _validity_of(segments)
    if validity is None:
        return None
    mt_seq_list = np.asarray(mt_seqs).tolist()
    mt_max: dict[Any, int] = {}
    for pk, seq in zip(mt_pks, mt_seq_list, strict=True):
        if seq > mt_max.get(pk, -1):
            mt_max[pk] = seq
    touched = set(mt_max) | tombstones.keys() | mt_deletes.keys()
    touched_rows, segments_max = _rows_of_keys(segments, touched)

    def counts(pk: Any, seq: int) -> bool:
        in_segments, in_memory = segments_max.get(pk), mt_max.get(pk)
        latest = max(s for s in (in_segments, in_memory) if s is not None)
        if latest != seq or delta_index.is_deleted(pk, seq):
            return False
        deleted = mt_deletes.get(pk)
        return deleted is None or deleted[0] <= seq

    masks = []
    for valid, rows in zip(validity.valid, touched_rows, strict=True):
        if rows:
            valid = valid.copy()
            for row, pk, seq in rows:
                valid[row] = counts(pk, seq)
        masks.append(valid)
    mt_mask = np.fromiter(
        (counts(pk, seq) for pk, seq in zip(mt_pks, mt_seq_list, strict=True)),
        dtype=bool,
        count=len(mt_pks),
    )
    return masks, mt_mask


def _rows_of_keys(
    segments: list[Any], keys: set[Any]
) -> tuple[list[list[tuple[int, Any, int]]], dict[Any, int]]:
    """Each segment's rows of ``keys`` as ``(row, key, seq)``, found from whichever side is
    smaller (after mass deletes, the rows), and each such key's highest seq over them."""
    rows_of: list[list[tuple[int, Any, int]]] = []
    highest: dict[Any, int] = {}
    for seg in segments:
        if len(keys) < len(seg.pks):
            rows = [(row, pk) for pk in keys if (row := seg.pk_to_row.get(pk)) is not None]
            found = [(row, pk, int(seg.seqs[row])) for row, pk in rows]
        else:
            found = [
                (row, pk, seq)
                for row, (pk, seq) in enumerate(zip(seg.pks, seg.seqs.tolist(), strict=True))
                if pk in keys
            ]
        for _, pk, seq in found:
            if seq > highest.get(pk, -1):
                highest[pk] = seq
        rows_of.append(found)
    return rows_of, highest


def _validity_of(segments: list[Any]) -> _SegmentsValidity | None:
    """The segments-only validity of ``segments``, computed once per set; None when a
    segment holds a key twice (its key-to-row map cannot name every row)."""
    key = tuple(id(s.seqs) for s in segments)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    validity = _compute_validity(segments)
    if validity is not None:  # (a None would hold no sequence numbers to keep its key's ids)
        with _cache_lock:
            _cache[key] = validity
            while len(_cache) > CACHED_SEGMENT_SETS:
                _cache.popitem(last=False)
    return validity


def _compute_validity(segments: list[Any]) -> _SegmentsValidity | None:
    if any(len(seg.pk_to_row) != len(seg.pks) for seg in segments):
        return None
    if len(segments) == 1:  # every key once: every row is its key's latest
        return _SegmentsValidity((segments[0].seqs,), (np.ones(len(segments[0].pks), bool),))
    max_seq: dict[Any, int] = {}
    seqs_of = [seg.seqs.tolist() for seg in segments]
    for seg, seqs in zip(segments, seqs_of, strict=True):
        for pk, seq in zip(seg.pks, seqs, strict=True):
            if seq > max_seq.get(pk, -1):
                max_seq[pk] = seq
    valid = tuple(
        np.fromiter(
            (max_seq[pk] == seq for pk, seq in zip(seg.pks, seqs, strict=True)),
            dtype=bool,
            count=len(seqs),
        )
        for seg, seqs in zip(segments, seqs_of, strict=True)
    )
    return _SegmentsValidity(tuple(seg.seqs for seg in segments), valid)


def _heavy(field: Any) -> bool:
    """A column worth leaving in Arrow unless asked for: vectors (lists, binary, maps)."""
    import pyarrow as pa

    kind = field.type
    return (
        pa.types.is_list(kind)
        or pa.types.is_large_list(kind)
        or pa.types.is_fixed_size_list(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_fixed_size_binary(kind)
        or pa.types.is_struct(kind)
        or pa.types.is_map(kind)
    )


def _columns(table: Any, output_fields: list[str] | None) -> list[str]:
    """The columns a hit's record needs: all that Lite's ``row_to_dict`` gives, less vector
    columns that ``output_fields`` does not name (the projection cannot use them then)."""
    asked = None if output_fields is None or "*" in output_fields else set(output_fields)
    return [
        field.name
        for field in table.schema
        if field.name != "_seq" and (asked is None or field.name in asked or not _heavy(field))
    ]


def _records(
    winners: list[list[Candidate]],
    segments: list[Any],
    memtable: Any,
    mt_row_refs: list[tuple[int, int]],
    output_fields: list[str] | None,
) -> dict[tuple[int, int], dict]:
    """Each winning row as Lite's ``row_to_dict`` makes it (less unasked vector columns)."""
    import pyarrow as pa

    rows_of: dict[int, list[int]] = collections.defaultdict(list)
    for source, row in {(source, row) for each in winners for _, source, row in each}:
        rows_of[source].append(row)
    records: dict[tuple[int, int], dict] = {}
    for source, rows in rows_of.items():
        if source < len(segments):
            table = segments[source].table
            picked = table.select(_columns(table, output_fields)).take(pa.array(rows, pa.int64()))
            lite = _lite_projection or _import_lite_projection()
            for row, record in zip(rows, picked.to_pylist(), strict=True):
                # As Segment.row_to_dict does: dynamic fields in $meta become top-level keys.
                record.update(lite.decode_meta(record.get("$meta")))
                records[source, row] = record
        else:
            for row in rows:
                batch, batch_row = mt_row_refs[row]
                records[source, row] = memtable.materialize_row(batch, batch_row)
    return records


def _projection(
    project_record_fn: Callable[[dict], dict] | None,
    output_fields: list[str] | None,
    pk_field: str,
    vector_field: str,
) -> Callable[[dict], dict]:
    """The entity of a hit, as Lite's executor projects it."""
    if project_record_fn is not None:
        return project_record_fn
    if output_fields is None:
        return lambda record: {
            k: v for k, v in record.items() if k != pk_field and k != vector_field
        }
    keep = set(output_fields) - {pk_field}
    return lambda record: {k: record[k] for k in keep if k in record}


class _Keys(list):
    """``assemble_candidates``'s keys, remembering which segments and in-memory rows they
    are, so that :func:`build_valid_mask` can use the cached validity."""

    segments: list[Any]
    mt_pks: list[Any]
    mt_seqs: Any


class _RecordSources(collections.abc.Sequence):
    """``assemble_candidates``'s ``(source, row)`` of every candidate, made when asked for
    (Lite builds a list of them all on every query; a query reads the few that match)."""

    def __init__(self, segments: list[Any], memtable: Any, mt_row_refs: list[Any]) -> None:
        self._segments = segments
        self._memtable = memtable
        self._mt_row_refs = mt_row_refs
        self._starts = [0]
        for seg in segments:
            self._starts.append(self._starts[-1] + seg.num_rows)

    def __len__(self) -> int:
        return self._starts[-1] + len(self._mt_row_refs)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i >= self._starts[-1]:
            return self._memtable, self._mt_row_refs[i - self._starts[-1]]
        number = bisect.bisect_right(self._starts, i) - 1
        return self._segments[number], i - self._starts[number]


def assemble_candidates(
    segments: Any,
    memtable: Any,
    vector_field: str | None,
    partition_names: list[str] | None = None,
    filter_compiled: Any = None,
    indexed_filter_plan: Any = None,
) -> tuple[list[Any], np.ndarray, np.ndarray, Sequence[Any], np.ndarray | None]:
    """``milvus_lite.search.assembler.assemble_candidates`` as ``Collection.query`` (its one
    caller in Lite 3.2) uses it: the same keys, sequence numbers, record sources and filter
    mask, without Lite's per-row work. The vectors, which query does not read, are not
    gathered: an empty array stands in for them."""
    in_scope, (mt_pks, mt_seqs, _, mt_row_refs, mt_table) = _sources(
        segments, memtable, vector_field, partition_names, filter_compiled is not None
    )
    if not in_scope and not mt_pks:
        empty_filter = np.zeros(0, dtype=bool) if filter_compiled is not None else None
        return [], np.zeros(0, dtype=np.uint64), np.zeros((0, 0), np.float32), [], empty_filter
    keys = _Keys()
    for seg in in_scope:
        keys.extend(seg.pks)
    keys.extend(mt_pks)
    keys.segments, keys.mt_pks, keys.mt_seqs = in_scope, mt_pks, mt_seqs
    seqs = np.concatenate([seg.seqs for seg in in_scope] + ([mt_seqs] if mt_pks else []))
    filter_mask = None
    if filter_compiled is not None:
        segment_filters, mt_filter = _filter_masks(
            in_scope, mt_pks, mt_table, filter_compiled, indexed_filter_plan
        )
        chunks = segment_filters + ([] if mt_filter is None else [mt_filter])
        filter_mask = np.concatenate(chunks) if chunks else np.zeros(0, dtype=bool)
    sources = _RecordSources(in_scope, memtable, mt_row_refs if mt_pks else [])
    return keys, seqs, np.zeros((0, 0), np.float32), sources, filter_mask


def build_valid_mask(
    all_pks: list[Any],
    all_seqs: np.ndarray,
    delta_index: Any,
    filter_mask: np.ndarray | None = None,
    memtable: Any = None,
) -> np.ndarray:
    """``milvus_lite.search.bitmap.build_valid_mask``: the same mask. For the candidates of
    :func:`assemble_candidates`, from the cached validity of their segments; for any others,
    Lite's own function."""
    tombstones = getattr(delta_index, "_map", None)
    live = None
    if isinstance(all_pks, _Keys) and memtable is not None and isinstance(tombstones, dict):
        live = _live_masks(
            all_pks.segments,
            all_pks.mt_pks,
            all_pks.mt_seqs,
            tombstones,
            delta_index,
            memtable.delete_index_snapshot(),
        )
    if live is None or (filter_mask is not None and len(filter_mask) != len(all_pks)):
        own = _lite_own_function("milvus_lite.search.bitmap", "build_valid_mask")
        return own(all_pks, all_seqs, delta_index, filter_mask=filter_mask, memtable=memtable)
    segment_masks, mt_mask = live
    mask = np.concatenate([*segment_masks, mt_mask]) if all_pks else np.zeros(0, dtype=bool)
    return mask if filter_mask is None else mask & filter_mask.astype(bool)


def project_record(record: dict[str, Any], schema: Any, plan: Any) -> dict[str, Any]:
    """``milvus_lite.engine.projection.project_record``: the same entity from the same
    record, reading the schema's names once (Lite's scans the schema for every field)."""
    names = set()
    primary = set()
    for field in schema.fields:
        names.add(field.name)
        if field.is_primary:
            primary.add(field.name)
    # extract_dynamic_fields: $meta's keys, then top-level keys that are not schema fields.
    lite = _lite_projection or _import_lite_projection()
    dynamic = lite.decode_meta(record.get("$meta"))
    internal = lite._INTERNAL_FIELDS
    for key, value in record.items():
        if key not in names and key not in internal:
            dynamic[key] = value
    for name in names:
        dynamic.pop(name, None)
    if plan.include_all_dynamic:
        result = dict(dynamic)
    else:
        result = {name: dynamic[name] for name in plan.explicit_dynamic_fields if name in dynamic}
    search = plan.api_kind == "search"
    for name in plan.response_schema_fields:
        if search and name in primary:
            continue
        if name in record:
            result[name] = record[name]
    if not search:
        pk_name = next(field.name for field in schema.fields if field.is_primary)
        if pk_name in record:
            result[pk_name] = record[pk_name]
    result.pop("$meta", None)
    return result


# (module, name) of the Milvus Lite functions that install() points at this module's.
_COLLECTION = "milvus_lite.engine.collection"
_REPLACEMENTS: dict[tuple[str, str], Callable[..., Any]] = {
    (_COLLECTION, "execute_search_with_index"): execute_search,
    (_COLLECTION, "project_record"): project_record,
    (_COLLECTION, "assemble_candidates"): assemble_candidates,  # used by query() alone
    ("milvus_lite.search.bitmap", "build_valid_mask"): build_valid_mask,
}
