"""The vector store: Milvus through pymilvus' ``MilvusClient``, embedded or on a server.

The URI decides. A path (``artifacts/milvus``) is embedded Milvus Lite: nothing to start.
Lite allows one process per database file, and the nightly index step must build while the
service keeps serving, so each collection lives in its own file ``<folder>/<name>.db`` and the
alias is a pointer file ``<folder>/<alias>.alias`` replaced atomically (``os.replace``). An
``http://host:19530`` URI is a Milvus standalone or distributed server: collections and the
alias are the server's own.

Each collection records what built it (model version and package, index type and why, row
count, build time) in a small companion collection ``<name>_meta``, so the alias alone says
which model must serve it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from serving import lite_search
from serving.lite_process import LiteProcess, LiteProcessError

log = logging.getLogger(__name__)

COLLECTION_PREFIX = "vitrine_"
DEFAULT_ALIAS = "vitrine_products"
META_VALUE_CHARS = 65535  # one metadata document (VARCHAR's limit)
META_KEY_CHARS = 64  # a metadata document's key (the companion's primary key)
CARD_KEY = "card"  # metadata key of a collection's card on a server (see VectorStore.set_card)
CARD_SUFFIX = ".card.json"  # its file beside a Milvus Lite collection's
TRASH_FOLDER = ".dropped"  # where a Lite collection's files go to be deleted (see drop)
# On a server, a service that answers from a collection says so in the collection's metadata
# (a lease, renewed every LEASE_EVERY_S; one older than LEASE_TTL_S is a service that died),
# as a Milvus Lite file lock does, so that no index clean-up drops it under the service.
LEASE_PREFIX = "lease:"
LEASE_EVERY_S = 30.0
LEASE_TTL_S = 120.0
# How long alias moves and clean-ups wait for another one (another build, a rollback) on
# the same Milvus Lite folder before giving up.
ALIAS_LOCK_WAIT_S = 600.0
# Dense-vector index types Milvus Lite may build, best first for catalogue-sized collections
# (graph, then quantised graph, then inverted lists, then exact). No DiskANN: Lite 3.2.2 takes
# the request, then fails to index segments and to load after a restart.
LITE_INDEX_PREFERENCE = ("HNSW", "HNSW_SQ", "IVF_SQ8", "IVF_FLAT", "AUTOINDEX", "FLAT")
_NEEDS_FAISS = frozenset({"HNSW", "HNSW_SQ", "IVF_SQ8", "IVF_FLAT"})
SCHEMA_FIELDS = ("image_id", "product_id", "category", "title", "price", "image_uri")
OUTPUT_FIELDS = ["product_id", "category", "title", "price", "image_uri", "$meta"]
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")

# pymilvus starts one in-process Milvus Lite server per ``.db`` path and never stops it: closing
# a client keeps the file lock (and the data open) until the process exits. Count the clients
# this process opened on each path and stop its server when the last one is closed, so that
# ``forget``/``close`` really release the file for another process (the index step, a rollback).
# A store with ``lite_process=True`` serves each path from a child process instead
# (serving/lite_process.py), counted the same way.
_LITE_LOCK = threading.Lock()
_LITE_OPEN: dict[str, int] = {}
_LITE_CHILDREN: dict[str, LiteProcess] = {}
# Paths whose child process died under a client: the next one must load the collection again
# (a Milvus server reloads its collections after a restart; Lite leaves that to its client).
_LITE_DIED: set[str] = set()
# Lite builds an index inside load_collection. pymilvus' default wait after create_index asks
# for a timestamp Lite does not implement (an error logged by its server), then sleeps 0.5 s.
_NO_WAIT = {"sync": False}
# Rows a server's segment needs before it gets an index (Milvus's
# dataCoord.index.minSegmentNumRowsToEnableIndex); smaller segments are searched exactly.
SERVER_MIN_INDEXED_ROWS = 1024
# Server calls that move or index data and may legitimately take long.
_SLOW_CALLS = frozenset(
    {"insert", "flush", "create_index", "drop_index", "load_collection", "create_collection"}
)
# Server answers that mean "not yet" rather than "broken": the service answers 503 and retries.
_NOT_YET = ("not loaded", "collection not loaded", "loading")


class StoreError(RuntimeError):
    """A vector-store operation failed for a reason other than reachability."""


class StoreUnavailable(StoreError):
    """Milvus cannot be reached (server down, network, database file locked)."""


class AliasBusy(StoreError):
    """Another process held a Milvus Lite folder's alias lock too long (see alias_lock)."""


@dataclass(frozen=True)
class IndexConfig:
    """How collections are indexed and searched (the ``index`` section of ``params.yaml``).

    Attributes:
        index_type: ``auto`` (DISKANN on a server, HNSW on Milvus Lite) or a Milvus index type.
        metric_type: ``IP``: embeddings are L2-normalised, so inner product is cosine.
        search_list: DiskANN's candidate list at search time (larger: better recall, slower).
        hnsw_m: HNSW graph degree.
        hnsw_ef_construction: HNSW build-time candidate list.
        hnsw_ef: HNSW search-time candidate list.
        ivf_nlist: IVF clusters.
        ivf_nprobe: IVF clusters searched.
        build_timeout_s: A server's index build may take this long before it counts as failed.
        build_stall_s: A first-choice index (DiskANN) whose build has indexed no row after this
            long counts as refused, and HNSW is built instead (a server without DiskANN
            accepts the request and then retries the failing build for ever).
    """

    index_type: str = "auto"
    metric_type: str = "IP"
    search_list: int = 100
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_ef: int = 96
    ivf_nlist: int = 128
    ivf_nprobe: int = 16
    build_timeout_s: int = 3600
    build_stall_s: int = 120

    def __post_init__(self) -> None:
        if not isinstance(self.index_type, str):
            raise ValueError(
                f"index_type must be auto or a Milvus index type, not {self.index_type!r}"
            )
        kind = self.index_type.upper()
        if kind != "AUTO" and kind not in MILVUS_INDEX_TYPES:
            raise ValueError(
                f"unknown index type {self.index_type!r}: auto, or one of "
                + ", ".join(sorted(MILVUS_INDEX_TYPES))
            )


# Milvus's index types for float vectors (2.3 to 2.6): a name outside them is a typo, which
# would otherwise end as a fallback index with the typo in its recorded reason.
MILVUS_INDEX_TYPES = frozenset(
    {"FLAT", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "IVF_RABITQ", "HNSW", "HNSW_SQ", "HNSW_PQ",
     "HNSW_PRQ", "SCANN", "DISKANN", "AUTOINDEX", "GPU_CAGRA", "GPU_IVF_FLAT", "GPU_IVF_PQ",
     "GPU_BRUTE_FORCE"}
)  # fmt: skip


@dataclass(frozen=True)
class IndexSpec:
    """The index a collection got, its search parameters, and why it is that one."""

    index_type: str
    metric_type: str
    build_params: dict[str, Any] = field(default_factory=dict)
    search_params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


def _lite_folder(uri: str) -> Path:
    """The folder of a Lite store's collection files: the URI, less a ``.db`` suffix (only
    that one: ``milvus.a`` and ``milvus.b`` are two stores)."""
    path = Path(uri)
    return path.with_suffix("") if path.suffix == ".db" else path


def _locked_by_another_process(lock_file: Path) -> bool | None:
    """Whether a process holds ``flock`` on Milvus Lite's ``LOCK`` file (taken and given
    back at once when free); None when that cannot be told (a file this user may not open,
    an older single-file database). Call only for a file this process has not opened: a
    second open of the same file in one process conflicts with the first too."""
    import fcntl

    try:
        fd = os.open(lock_file, os.O_RDONLY)  # flock needs no write access
    except FileNotFoundError:
        return False
    except OSError as err:
        log.debug("cannot check the lock of %s: %s", lock_file, err)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def is_embedded(uri: str) -> bool:
    """True for a Milvus Lite path, False for a server URI (``http(s)://``, ``tcp://``)."""
    return not re.match(r"^(https?|tcp|grpc|unix)://", uri, re.IGNORECASE)


def check_uri(uri: str) -> None:
    """Refuse what is neither a server URI nor plausibly a folder for Milvus Lite: a typo in a
    server's address would otherwise build an embedded store in a folder named after it.

    Raises:
        ValueError: An unknown scheme (``htp://``) or a bare ``host:port``.
    """
    if not is_embedded(uri):
        return
    scheme = re.match(r"^([A-Za-z][\w+.-]*)://", uri)
    if scheme:
        raise ValueError(
            f"Milvus URI {uri!r}: unknown scheme {scheme.group(1)!r}; a server is "
            "http://host:19530 (or https://, tcp://, grpc://, unix://), Milvus Lite a folder"
        )
    # A host (letters first, or an IPv4 address) and a port of 4-5 digits, as servers listen
    # on (19530): ``backup:1`` or ``2026-11-24:1`` stay folder names.
    if re.fullmatch(r"([A-Za-z][\w.-]*|\d{1,3}(\.\d{1,3}){3}):\d{4,5}", uri):
        raise ValueError(
            f"Milvus URI {uri!r} looks like a server's host:port: write http://{uri} (for a "
            f"Milvus Lite folder of that name, write ./{uri})"
        )


def index_spec(index_type: str, config: IndexConfig, reason: str) -> IndexSpec:
    """The build and search parameters Milvus expects for one index type."""
    kind = index_type.upper()
    build: dict[str, Any] = {}
    search: dict[str, Any] = {}
    if kind == "DISKANN":
        search = {"search_list": config.search_list}
    elif kind.startswith("HNSW"):
        build = {"M": config.hnsw_m, "efConstruction": config.hnsw_ef_construction}
        search = {"ef": config.hnsw_ef}
    elif kind.startswith("IVF"):
        build = {"nlist": config.ivf_nlist}
        search = {"nprobe": config.ivf_nprobe}
    return IndexSpec(kind, config.metric_type, build, search, reason)


@functools.cache
def lite_index_types() -> tuple[str, ...]:
    """What the installed Milvus Lite builds, of :data:`LITE_INDEX_PREFERENCE`, best first.

    Asked of Lite's own index factory (its capability discovery: HNSW and IVF need faiss-cpu
    there, and without it ``AUTOINDEX`` is exact search). A Lite whose factory cannot be
    asked gets the list verified with Milvus Lite 3.2.2.
    """
    try:
        from milvus_lite.index import factory

        known = factory.KNOWN_VECTOR_INDEX_TYPES
        faiss = factory.is_faiss_available()
    except (ImportError, AttributeError) as err:
        log.debug("cannot ask Milvus Lite which indexes it builds (%s): assuming 3.2.2's", err)
        return LITE_INDEX_PREFERENCE
    return tuple(
        kind
        for kind in LITE_INDEX_PREFERENCE
        if kind in known and (faiss or kind not in _NEEDS_FAISS)
    )


def _lite_version() -> str:
    try:
        from importlib.metadata import version

        return f"Milvus Lite {version('milvus-lite')}"
    except Exception:  # metadata missing (a source checkout): the name alone
        return "Milvus Lite"


def choose_index(embedded: bool, config: IndexConfig) -> IndexSpec:
    """The best index the backend accepts for ``config.index_type``, and the reason."""
    wanted = config.index_type.upper()
    if not embedded:
        if wanted == "AUTO":
            return index_spec("DISKANN", config, "DiskANN on a Milvus server (auto)")
        return index_spec(wanted, config, f"{wanted} as configured")
    builds = lite_index_types()
    if wanted in builds:
        return index_spec(wanted, config, f"{wanted} as configured")
    best = builds[0] if builds else "FLAT"
    lite = _lite_version()
    if wanted == "AUTO":
        why = f"{lite} has no DiskANN; {best} is the best index it builds ({', '.join(builds)})"
    else:
        why = f"{lite} cannot build {wanted}; {best} is the best it builds ({', '.join(builds)})"
    return index_spec(best, config, why)


def _unavailable(err: Exception) -> bool:
    text = str(err).lower()
    return any(
        s in text for s in ("connect", "unavailable", "deadline", "timeout", "lock", "closed")
    )


class VectorStore:
    """Collections of catalogue embeddings, an alias, and the searches the service runs.

    Args:
        uri: A folder for Milvus Lite (``.db`` suffix allowed: its stem names the folder) or
            ``http://host:19530`` for a Milvus server.
        token: Server credentials (``user:password`` or an API key); unused by Lite.
        alias: The alias the service reads from.
        timeout: Seconds a server call may take before the store is reported unavailable.
        lite_process: Milvus Lite only: run each database in a child process
            (:class:`~serving.lite_process.LiteProcess`) rather than on threads of this one, so
            that its searches do not compete with this process for Python's lock. The service
            does; one-shot commands (the index step) need not.
    """

    def __init__(
        self,
        uri: str,
        token: str = "",
        alias: str = DEFAULT_ALIAS,
        timeout: float = 10.0,
        lite_process: bool = False,
    ):
        if not _NAME.match(alias):
            raise ValueError(f"alias {alias!r} must be letters, digits and underscores")
        self.uri = str(uri)
        check_uri(self.uri)
        self.token = token
        self.alias = alias
        self.timeout = timeout
        self.build_timeout = 3600  # raised to IndexConfig.build_timeout_s by build_index
        self.embedded = is_embedded(self.uri)
        self.lite_process = lite_process and self.embedded
        self.folder = _lite_folder(self.uri) if self.embedded else None
        self._clients: dict[str, Any] = {}
        self._lite_paths: dict[str, str] = {}  # collection -> the .db path its client holds
        self._lite_uris: dict[str, str] = {}  # collection -> what its client connected to
        self._lock = threading.RLock()
        self._alias_guard = threading.RLock()  # alias_lock: this store's holders, re-entrant
        self._alias_depth = 0
        self._alias_file: Any = None

    # --- connections -------------------------------------------------------------------

    def _client(self, collection: str | None = None):
        """The client for a collection (Lite: its own file) or the server's one client."""
        from pymilvus import MilvusClient

        key = collection if self.embedded else ""
        with self._lock:
            if key not in self._clients:
                try:
                    if self.embedded:
                        if collection is None:
                            raise StoreError("Milvus Lite needs a collection to open its file")
                        self.folder.mkdir(parents=True, exist_ok=True)
                        path = os.path.abspath(self.folder / f"{collection}.db")
                        if self.held_elsewhere(collection):
                            raise StoreUnavailable(
                                f"{path} is open in another process (a running `vitrine "
                                "serve`, or a build): Milvus Lite lets one process open a "
                                "collection. Stop that process, or switch a running service "
                                "with `vitrine rollout`"
                            )
                        with _LITE_LOCK:
                            lite_uri = self._lite_uri(path)
                            client = MilvusClient(lite_uri)
                            self._clients[key] = client
                            self._lite_uris[key] = lite_uri
                            _LITE_OPEN[path] = _LITE_OPEN.get(path, 0) + 1
                            revived = path in _LITE_DIED
                            _LITE_DIED.discard(path)
                        self._lite_paths[key] = path
                        if revived and client.has_collection(collection):
                            log.warning("reloading %s in its new Milvus Lite process", collection)
                            client.load_collection(collection)
                    else:
                        self._clients[key] = MilvusClient(
                            self.uri, token=self.token, timeout=self.timeout
                        )
                except StoreError:
                    raise
                except Exception as err:
                    raise StoreUnavailable(f"cannot reach Milvus at {self.uri}: {err}") from err
            return self._clients[key]

    def held_elsewhere(self, name: str) -> bool | None:
        """Whether another process uses collection ``name`` (None: it cannot be told).

        Milvus Lite: another process has its file open (the file lock). A server, where any
        number of clients share a collection: a service holds a lease on it (see
        :meth:`hold`) renewed less than :data:`LEASE_TTL_S` ago.
        """
        if not self.embedded:
            return self._leased(name)
        path = os.path.abspath(self.folder / f"{name}.db")
        with _LITE_LOCK:
            if _LITE_OPEN.get(path) or path in _LITE_CHILDREN:
                return False  # this process (or its own Lite child) holds it
            return _locked_by_another_process(Path(path) / "LOCK")

    def check(self) -> None:
        """Fail now, with what to do, if this store cannot be used: a Milvus Lite folder that
        cannot be created (the path is a file, say) or a server that does not answer. The
        index step calls it before embedding a catalogue, which can take an hour.

        Raises:
            StoreError: The Lite folder cannot be made.
            StoreUnavailable: The server cannot be reached.
        """
        if not self.embedded:
            self._call(None, "list_collections")
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(
                f"{self.uri} cannot be a Milvus Lite folder ({err}): give --uri a folder path "
                "(it is created if missing) or http://host:19530 for a Milvus server"
            ) from err

    @contextlib.contextmanager
    def alias_lock(self) -> Iterator[None]:
        """Hold the alias against other alias moves and clean-ups of this Milvus Lite folder
        (another build, a rollback, in any process): what reads the alias target, decides
        and acts on it (move it, drop collections it does not point at) runs under it.
        Re-entrant within this store. A server has no such lock: its alias moves are atomic,
        and the clean-up reads the target again before each drop.

        Raises:
            AliasBusy: Another process held it for :data:`ALIAS_LOCK_WAIT_S`.
            StoreError: The lock file cannot be made (the folder is a file, say).
        """
        if not self.embedded:
            yield
            return
        with self._alias_guard:
            if self._alias_depth == 0:
                self._alias_file = _take_file_lock(
                    self.folder / f"{self.alias}.lock", ALIAS_LOCK_WAIT_S
                )
            self._alias_depth += 1
            try:
                yield
            finally:
                self._alias_depth -= 1
                if self._alias_depth == 0:
                    self._alias_file.close()  # closing the file releases its lock
                    self._alias_file = None

    def _lite_uri(self, path: str) -> str:
        """What ``MilvusClient`` opens for a Lite database: the path itself (Lite on threads of
        this process), or the URI of the child process serving it. Call under ``_LITE_LOCK``.
        """
        child = _LITE_CHILDREN.get(path)
        if child is not None and child.alive():
            return child.uri
        if child is not None:  # it died (killed, crashed): start another
            log.warning("the Milvus Lite process for %s is gone; starting another", path)
            child.stop()
            _LITE_CHILDREN.pop(path, None)
            _LITE_DIED.add(path)
        elif not self.lite_process or _LITE_OPEN.get(path):
            lite_search.install()  # Lite on threads of this process searches faster
            return path  # already open on threads here: a child could not take the lock
        try:
            child = LiteProcess(path)
        except LiteProcessError as err:
            raise StoreUnavailable(str(err)) from err
        _LITE_CHILDREN[path] = child
        log.info("Milvus Lite for %s runs in process %d (%s)", path, child.pid, child.uri)
        return child.uri

    def _call(self, collection: str | None, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a client method, turning connection failures into StoreUnavailable.

        On a server every call gets a deadline (the client's own timeout bounds only the
        connection): ``timeout`` for what answers a request, ``build_timeout`` for calls that
        move or index data. A frozen server then costs a request seconds, not minutes.
        """
        if not self.embedded or self.lite_process:  # a child process can hang like a server
            limit = self.build_timeout if method in _SLOW_CALLS else self.timeout
            kwargs.setdefault("timeout", limit)
        client = self._client(collection)
        try:
            return getattr(client, method)(*args, **kwargs)
        except StoreError:
            raise
        except Exception as err:
            if _unavailable(err):
                self._forget_broken(collection, client)
                raise StoreUnavailable(f"Milvus at {self.uri} is unavailable: {err}") from err
            if any(marker in str(err).lower() for marker in _NOT_YET):
                raise StoreUnavailable(f"Milvus at {self.uri} is not ready yet: {err}") from err
            raise StoreError(f"Milvus {method} on {collection}: {err}") from err

    def forget(self, collection: str | None = None) -> None:
        """Drop a cached client so the next call reconnects (after an outage).

        Lite: once no client of this process holds the collection's file any more, its
        in-process server is stopped, which releases the file lock. A server: its one client
        serves every collection, so only ``forget()`` (no collection) or :meth:`close` drops
        it; forgetting a retired collection must not cut off the searches of the current one.
        """
        if not self.embedded and collection is not None:
            return
        key = collection if self.embedded else ""
        with self._lock:
            client = self._clients.pop(key, None)
            path = self._lite_paths.pop(key, None)
            used = self._lite_uris.pop(key, None)
        self._close(client, path, used, broken=False)

    def _forget_broken(self, collection: str | None, client: Any) -> None:
        """A call on ``client`` found Milvus unavailable (dead, or hung past the timeout).

        Only that client is dropped: calls that failed on it together, or later on a client
        already replaced, must not close the replacement. Lite: the child process it talked
        to is stopped now, whoever else holds it, and the next one loads the collection
        again; a newer child that already replaced it is left alone.
        """
        key = collection if self.embedded else ""
        with self._lock:
            if self._clients.get(key) is not client:
                return  # dropped already by another failed call
            del self._clients[key]
            path = self._lite_paths.pop(key, None)
            used = self._lite_uris.pop(key, None)
        self._close(client, path, used, broken=True)

    @staticmethod
    def _close(client: Any, path: str | None, used: str | None, broken: bool) -> None:
        if client is not None:
            with contextlib.suppress(Exception):  # already broken: nothing more to release
                client.close()
        if path is not None:
            _release_lite(path, force=broken, broken=broken, used=used)

    def close(self) -> None:
        """Close every client (Lite releases its file locks)."""
        with self._lock:
            keys = list(self._clients)
        for key in keys:
            self.forget(key or None)

    def ping(self, collection: str | None = None) -> bool:
        """Whether Milvus answers now: ``collection`` (default: the alias target) is there and
        loaded, so that it can be searched."""
        return not self.why_not_ready(collection)

    def why_not_ready(self, collection: str | None = None) -> str:
        """What stops ``collection`` (default: the alias target) from answering searches now,
        or ``""`` when nothing does."""
        try:
            target = collection or self.alias_target()
            if target is None:
                if self.embedded:
                    return f"alias {self.alias} points at no collection in {self.uri}"
                self._call(None, "list_collections")
                return ""
            gone = self.embedded and not (self.folder / f"{target}.db").exists()
            # (Lite: opening a missing collection's file would create an empty one.)
            if gone or not self._call(target, "has_collection", target):
                return (
                    f"collection {target} is gone from {self.uri} (dropped?): roll out another "
                    "with `vitrine rollout`"
                )
            # A collection answers searches only while loaded: after a server restart Milvus
            # reloads it itself (in tens of seconds); a new Lite child has it loaded again.
            state = self._call(target, "get_load_state", target)
            loaded = "loaded" in str(state.get("state", "")).lower().split(".")[-1]
            return "" if loaded else f"collection {target} is not loaded (yet)"
        except StoreUnavailable:
            return f"Milvus at {self.uri} is unreachable"
        except StoreError as err:
            return str(err)

    # --- collections ------------------------------------------------------------------

    def collections(self) -> list[str]:
        """Vitrine's collections, oldest first (their names sort by build time)."""
        if self.embedded:
            if self.folder is None or not self.folder.is_dir():
                return []
            names = [p.stem for p in self.folder.glob(f"{COLLECTION_PREFIX}*.db")]
        else:
            names = self._call(None, "list_collections")
        return sorted(
            n for n in names if n.startswith(COLLECTION_PREFIX) and not n.endswith("_meta")
        )

    def create_collection(self, name: str, dim: int) -> None:
        """An empty collection with the catalogue schema and a dynamic field for extras."""
        from pymilvus import DataType, MilvusClient

        if not _NAME.match(name) or not name.startswith(COLLECTION_PREFIX):
            raise ValueError(f"collection name {name!r} must start with {COLLECTION_PREFIX}")
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
        schema.add_field("image_id", DataType.VARCHAR, is_primary=True, max_length=128)
        schema.add_field("product_id", DataType.VARCHAR, max_length=512)
        schema.add_field("category", DataType.VARCHAR, max_length=512)
        schema.add_field("title", DataType.VARCHAR, max_length=4096)
        schema.add_field("price", DataType.DOUBLE)
        schema.add_field("image_uri", DataType.VARCHAR, max_length=4096)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
        # Session: this client's own writes (the admin API's adds and removes) are seen by its
        # next search, without Strong's wait for the server's time tick (~200 ms per search,
        # measured by bench/bench_index.py --server). Lite ignores the setting.
        self._call(name, "create_collection", name, schema=schema, consistency_level="Session")
        meta = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        meta.add_field("key", DataType.VARCHAR, is_primary=True, max_length=META_KEY_CHARS)
        meta.add_field("value", DataType.VARCHAR, max_length=META_VALUE_CHARS)
        meta.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
        params = self._client(name).prepare_index_params()
        params.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
        if self.embedded:  # create_collection(index_params=...) would wait on the index
            self._call(
                name, "create_collection", f"{name}_meta", schema=meta, consistency_level="Strong"
            )
            self._call(name, "create_index", f"{name}_meta", params, **_NO_WAIT)
            self._call(name, "load_collection", f"{name}_meta")
        else:
            self._call(
                name,
                "create_collection",
                f"{name}_meta",
                schema=meta,
                index_params=params,
                consistency_level="Strong",
            )

    def insert(self, name: str, rows: Sequence[dict[str, Any]]) -> None:
        """Insert rows (``image_id``, catalogue fields, ``embedding``; extras go dynamic)."""
        if rows:
            self._call(name, "insert", name, [_clean(row) for row in rows])

    def build_index(self, name: str, config: IndexConfig) -> IndexSpec:
        """Index the embedding field with the best type the backend accepts, then load."""
        spec = choose_index(self.embedded, config)
        # Seal what was inserted first. Milvus Lite 3 keeps rows in its in-memory table (up to
        # 128 MiB) and searches them by brute force: without a flush the index would not hold
        # them, and verifying ANN against exact search would compare exact with exact.
        self._call(name, "flush", name)
        self.build_timeout = int(config.build_timeout_s)
        try:
            self._create_index(name, spec, stall_s=config.build_stall_s)
        except StoreUnavailable:
            raise
        except StoreError as err:
            if spec.index_type == "HNSW":
                raise
            fallback = index_spec(
                "HNSW", config, f"the server refused {spec.index_type} ({err}); HNSW instead"
            )
            log.warning("%s", fallback.reason)
            self._call(name, "drop_index", name, "embedding")
            self._create_index(name, fallback)  # the fallback gets the full build timeout
            spec = fallback
        if not self.embedded:
            self._merge_segments(name)
            spec = self._unindexed_noted(name, spec)
        self._call(name, "load_collection", name)
        log.info("collection %s: %s index (%s)", name, spec.index_type, spec.reason)
        return spec

    def _unindexed_noted(self, name: str, spec: IndexSpec) -> IndexSpec:
        """``spec``, its reason saying so when no segment is large enough for the server to
        index: such a collection is searched exactly, and a build that would fail (DiskANN on
        a server without it) cannot fail yet."""
        rows = [s.num_rows for s in self._call(name, "list_persistent_segments", name)]
        largest = max(rows, default=0)
        if not 0 < largest < SERVER_MIN_INDEXED_ROWS:
            return spec
        note = (
            f"no segment reaches the server's minimum for an index ({SERVER_MIN_INDEXED_ROWS} "
            f"rows by default; the largest holds {largest}): searched exactly until one does, "
            f"and {spec.index_type} not built yet"
        )
        log.warning("collection %s: %s", name, note)
        return replace(spec, reason=f"{spec.reason}; {note}" if spec.reason else note)

    def _merge_segments(self, name: str) -> None:
        """Merge a server's small indexed segments (a manual compaction), then wait for the
        merged segment's index.

        A server seals a growing segment on size and on time, so a bulk insert ends in
        several segments, and every search runs once per segment. 100K rows went from 2
        segments to 1: at equal recall@10 (~0.97: one segment needs ef 32 where two needed
        16) 3,658 -> 4,704 queries/s (+20% to +29% over two runs of
        ``bench/bench_index.py --server``). Milvus compacts indexed segments only, so this
        runs after the build. Compaction never merges past the server's segment size limit,
        so large collections keep their parallelism. A compaction that fails, ends in a
        state other than completed, or outlasts the build timeout leaves the segments as
        they are (searches stay correct, only slower), and the log says so. The merged
        segment's index build is waited for (up to the build timeout again) and its failure
        raises, as the first build's does.
        """
        started = time.monotonic()
        try:
            before = self._segment_count(name)
            job = self._call(name, "compact", name)
            state = self._call(name, "get_compaction_state", job)
            while state == "Executing":
                if time.monotonic() - started > self.build_timeout:
                    log.warning("collection %s: compaction still running; serving as is", name)
                    return
                time.sleep(0.5)
                state = self._call(name, "get_compaction_state", job)
            if state != "Completed":
                log.warning("collection %s: compaction ended %s; segments as they are", name, state)
                return
        except StoreUnavailable:
            raise
        except StoreError as err:
            log.warning("collection %s: segments not merged (%s)", name, err)
            return
        # The merged segment has no index yet: the server counts its rows as pending
        # (segments under its minimum for an index, 1,024 rows, count as indexed).
        self._wait_for_index(name, None)
        log.info(
            "collection %s: %d sealed segment(s) merged into %d in %.1f s",
            name,
            before,
            self._segment_count(name),
            time.monotonic() - started,
        )

    def _segment_count(self, name: str) -> int:
        """Sealed segments of a server's collection that hold rows."""
        segments = self._call(name, "list_persistent_segments", name)
        return sum(1 for segment in segments if segment.num_rows)

    def _create_index(self, name: str, spec: IndexSpec, stall_s: float | None = None) -> None:
        params = self._client(name).prepare_index_params()
        # pymilvus 3 sends each build parameter as its own key, which a server reads; Milvus
        # Lite 3 reads them only from one JSON "params" entry and silently uses its defaults
        # otherwise (HNSW M/efConstruction, IVF nlist would all be ignored).
        build = {"params": spec.build_params} if self.embedded else spec.build_params
        params.add_index(
            field_name="embedding",
            index_type=spec.index_type,
            metric_type=spec.metric_type,
            params=build,
        )
        self._call(name, "create_index", name, params, **_NO_WAIT)
        if not self.embedded:  # Lite builds when the collection is loaded
            self._wait_for_index(name, stall_s)

    def _wait_for_index(self, name: str, stall_s: float | None) -> None:
        """Poll a server's build until every row is indexed; raise StoreError when it fails,
        makes no progress for ``stall_s`` (None: no such limit), or outlasts the build timeout.
        """
        started = time.monotonic()
        while True:
            info = self._call(name, "describe_index", name, "embedding") or {}
            state = str(info.get("state", ""))
            reason = str(info.get("index_state_fail_reason") or "")
            total, indexed = int(info.get("total_rows", 0)), int(info.get("indexed_rows", 0))
            pending = int(info.get("pending_index_rows", 0))
            if reason or state.lower() == "failed":
                raise StoreError(f"the index build failed: {reason or state}")
            if state.lower() == "finished" and pending == 0:
                return
            waited = time.monotonic() - started
            if stall_s is not None and indexed == 0 and total > 0 and waited > stall_s:
                raise StoreError(
                    f"the build indexed none of {total} rows in {waited:.0f} s (state {state})"
                )
            if waited > self.build_timeout:
                raise StoreError(
                    f"the build had indexed {indexed} of {total} rows after {waited:.0f} s"
                )
            time.sleep(1.0)

    def set_metadata(self, name: str, metadata: dict[str, Any], key: str = "build") -> None:
        """Record a JSON document about the collection in its companion collection. ``build``
        (what built it) is written last by a build and marks it complete; other keys hold
        the service's yardsticks (``canary``, ``drift``), at most 65,535 characters each."""
        value = metadata_value(metadata)
        if len(value) > META_VALUE_CHARS:
            raise StoreError(f"metadata {key!r} of {name} is {len(value)} characters, over 65535")
        row = {"key": key, "value": value, "vector": [0.0, 0.0]}
        self._call(name, "upsert", f"{name}_meta", [row])

    def recorded(self, name: str, key: str = "build") -> dict[str, Any]:
        """What :meth:`set_metadata` recorded under ``key``, or ``{}`` (for ``build``: a build
        that never finished).

        Unlike :meth:`metadata` this reads only the companion collection, so it works on a
        collection that is not loaded.
        """
        values = self._meta_values(name, f"key == {quote(key)}")
        return values[0] if values else {}

    def _meta_values(self, name: str, where: str) -> list[dict[str, Any]]:
        """The documents of ``name``'s metadata companion whose keys match ``where``."""
        meta_name = f"{name}_meta"
        self._call(name, "load_collection", meta_name)
        rows = self._call(name, "query", meta_name, filter=where, output_fields=["value"])
        return [json.loads(row["value"]) for row in rows]

    def hold(self, name: str, holder: str) -> None:
        """Server: lease collection ``name`` for ``holder`` (a service replica) now; renew it
        every :data:`LEASE_EVERY_S`. Milvus Lite: nothing (its file lock does this)."""
        if not self.embedded:
            self.set_metadata(name, {"at": time.time()}, key=f"{LEASE_PREFIX}{holder}")

    def release_hold(self, name: str, holder: str) -> None:
        """Server: end ``holder``'s lease on ``name`` (it no longer answers from it)."""
        if not self.embedded:
            where = f"key == {quote(LEASE_PREFIX + holder)}"
            self._call(name, "delete", f"{name}_meta", filter=where)

    def _leased(self, name: str) -> bool | None:
        """Whether a lease on ``name`` is fresh (None: the server cannot be asked)."""
        try:
            leases = self._meta_values(name, f"key like {quote(LEASE_PREFIX + '%')}")
        except StoreUnavailable:
            return None
        except StoreError:  # no metadata companion: nothing ever held it
            return False
        now = time.time()
        return any(now - lease["at"] < LEASE_TTL_S for lease in leases)

    def set_card(self, name: str, card: dict[str, Any]) -> None:
        """Record a few facts about a collection (what built it, what it replaced as the
        alias's target) where they can be read without opening it: on Milvus Lite a file
        beside the collection's (a running service holds the collection's own file), on a
        server its metadata under ``card``."""
        if not self.embedded:
            self.set_metadata(name, card, key=CARD_KEY)
            return
        path = self.folder / f"{name}{CARD_SUFFIX}"
        staging = path.with_name(path.name + ".tmp")
        staging.write_text(json.dumps(card, default=str))
        os.replace(staging, path)

    def card(self, name: str) -> dict[str, Any]:
        """What :meth:`set_card` recorded for ``name``, or ``{}`` (none, or unreadable)."""
        try:
            if not self.embedded:
                return self.recorded(name, key=CARD_KEY)
            return json.loads((self.folder / f"{name}{CARD_SUFFIX}").read_text())
        except (StoreError, OSError, ValueError):  # StoreUnavailable is a StoreError
            return {}

    def metadata(self, name: str) -> dict[str, Any]:
        """What :meth:`set_metadata` recorded, with the current row count."""
        found = self.recorded(name)
        found["collection"] = name
        found["rows"] = self.count(name)
        return found

    def count(self, name: str) -> int:
        rows = self._call(name, "query", name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def load(self, name: str) -> None:
        """Load a collection for search (after a restart Milvus needs this)."""
        self._call(name, "load_collection", name)

    def drop(self, name: str) -> None:
        """Delete a collection (Lite: its files) and its metadata, so that a drop killed
        half-way never leaves a half-deleted collection that a rollback would take for whole.
        Lite: its card goes first, then its files move into a trash folder in one rename
        each (the collection is gone at once) and the trash is emptied, with whatever a
        killed drop left there. A server: its metadata goes first (an unfinished collection
        is left, which the next clean-up removes)."""
        if self.embedded:
            self.forget(name)
            # Stop the file's server even if another store of this process still has it open:
            # its files are about to go, and nothing may keep serving (or locking) them.
            _release_lite(os.path.abspath(self.folder / f"{name}.db"), force=True)
            if not self.folder.is_dir():
                return
            (self.folder / f"{name}{CARD_SUFFIX}").unlink(missing_ok=True)
            trash = self.folder / TRASH_FOLDER
            for path in self.folder.glob(f"{name}.db*"):
                _move_into(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            return
        for target in (f"{name}_meta", name):
            if self._call(None, "has_collection", target):
                self._call(None, "drop_collection", target)

    # --- alias ------------------------------------------------------------------------

    def alias_target(self) -> str | None:
        """The collection the alias points at, or None before the first build."""
        if self.embedded:
            pointer = self.folder / f"{self.alias}.alias"
            return pointer.read_text().strip() if pointer.is_file() else None
        # Asked first: pymilvus logs a traceback for describing an alias that does not exist.
        if self.alias not in self._call(None, "list_aliases").get("aliases", []):
            return None
        try:
            found = self._call(None, "describe_alias", self.alias)
        except StoreUnavailable:
            raise
        except StoreError:
            return None
        return found.get("collection_name") if found else None

    def point_alias(self, name: str) -> str | None:
        """Move the alias to ``name`` atomically; return the collection it pointed at."""
        previous = self.alias_target()
        if self.embedded:
            self.folder.mkdir(parents=True, exist_ok=True)
            pointer = self.folder / f"{self.alias}.alias"
            # A staging file of its own: two moves at once must not swap each other's.
            staging = pointer.with_name(f"{pointer.name}.{os.getpid()}.{threading.get_ident()}")
            staging.write_text(name + "\n")
            os.replace(staging, pointer)  # atomic on POSIX: readers see old or new, never half
        elif previous is None:
            self._call(None, "create_alias", name, self.alias)
        else:
            self._call(None, "alter_alias", name, self.alias)
        return previous

    # --- rows ----------------------------------------------------------------------------

    def search(
        self,
        name: str,
        vectors: np.ndarray,
        top_k: int,
        spec: IndexSpec | None = None,
        filter: str = "",
    ) -> list[list[dict[str, Any]]]:
        """Top-k hits per query vector: ``{"image_id", "score", catalogue fields...}``."""
        params: dict[str, Any] = {"metric_type": spec.metric_type if spec else "IP"}
        if spec is not None:
            params["params"] = widened(spec.search_params, top_k)
        found = self._call(
            name,
            "search",
            name,
            data=np.asarray(vectors, dtype=np.float32).tolist(),
            limit=top_k,
            filter=filter,
            output_fields=OUTPUT_FIELDS,
            search_params=params,
        )
        return [[_hit(hit) for hit in hits] for hits in found]

    def rows_of_product(
        self, name: str, product_id: str, with_embedding: bool = False
    ) -> list[dict]:
        """Every image row of one product."""
        fields = ["image_id", *OUTPUT_FIELDS] + (["embedding"] if with_embedding else [])
        return self._call(
            name,
            "query",
            name,
            filter=f"product_id == {quote(product_id)}",
            output_fields=fields,
        )

    def images_of_products(self, name: str, product_ids: Sequence[str]) -> dict[str, set[str]]:
        """The image ids of each of these products that has rows (one has none: left out)."""
        found: dict[str, set[str]] = {}
        wanted = sorted(set(product_ids))
        for start in range(0, len(wanted), 100):
            chunk = ", ".join(quote(product_id) for product_id in wanted[start : start + 100])
            rows = self._call(
                name,
                "query",
                name,
                filter=f"product_id in [{chunk}]",
                output_fields=["image_id", "product_id"],
            )
            for row in rows:
                found.setdefault(row["product_id"], set()).add(row["image_id"])
        return found

    def row_by_image(self, name: str, image_id: str) -> dict[str, Any] | None:
        """One image's row, or None."""
        rows = self._call(
            name,
            "query",
            name,
            filter=f"image_id == {quote(image_id)}",
            output_fields=["image_id", *OUTPUT_FIELDS],
        )
        return rows[0] if rows else None

    def has_rows(self, name: str, filter_expr: str) -> bool:
        """Whether any row matches the Milvus boolean expression ``filter_expr``."""
        return bool(
            self._call(name, "query", name, filter=filter_expr, output_fields=["image_id"], limit=1)
        )

    def upsert(self, name: str, rows: Sequence[dict[str, Any]]) -> None:
        """Insert or replace rows by ``image_id``."""
        if rows:
            self._call(name, "upsert", name, [_clean(row) for row in rows])

    def update_product(
        self, name: str, product_id: str, fields: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], int]:
        """Set catalogue ``fields`` (category, title, price...) on every image row of a
        product, embeddings untouched. Returns the product's rows as they were (empty: no
        such product) and how many changed; only those are written. Not atomic: callers
        that may race with a delete of the product serialise (the service's admin lock)."""
        rows = self.rows_of_product(name, product_id, with_embedding=True)
        rows = [{**{k: v for k, v in row.items() if k != "$meta"}, **(row.get("$meta") or {})}
                for row in rows]  # fmt: skip
        changed = [{**row, **fields} for row in rows if any(row.get(k) != v for k, v in
                   fields.items())]  # fmt: skip
        self.upsert(name, changed)
        return rows, len(changed)

    def delete_product(self, name: str, product_id: str) -> list[dict[str, Any]]:
        """Remove every image of a product; return the rows removed (without embeddings)."""
        present = self.rows_of_product(name, product_id)
        where = f"product_id == {quote(product_id)}"
        self._call(name, "delete", name, filter=where)
        if not self.embedded:
            self._await_deleted(name, where)
        return present

    def _await_deleted(self, name: str, where: str, attempts: int = 20) -> None:
        """Wait until a delete by filter shows in reads (a server's).

        Milvus 2.3 answers a delete by filter with a timestamp that its Session reads may
        precede: the next query still returned the deleted rows (and an update right after a
        delete wrote them back). One Strong read (~0.2 s) sees the delete, and Session reads
        after it do too.
        """
        for _ in range(attempts):
            left = self._call(
                name, "query", name, filter=where, output_fields=["image_id"], limit=1,
                consistency_level="Strong",
            )  # fmt: skip
            if not left:
                return
            time.sleep(0.1)
        raise StoreError(f"rows matching {where} were deleted from {name} but still read back")


def metadata_value(document: dict[str, Any]) -> str:
    """A metadata document as :meth:`VectorStore.set_metadata` stores it (at most
    :data:`META_VALUE_CHARS` characters)."""
    return json.dumps(document, default=str)


def _move_into(path: Path, trash: Path) -> None:
    """Rename ``path`` into ``trash`` (made if missing) under a name of its own. Another drop
    may empty and remove ``trash`` meanwhile: the rename then fails, having moved nothing, and
    is made again."""
    for _ in range(5):
        trash.mkdir(exist_ok=True)
        try:
            os.replace(path, trash / f"{path.name}.{uuid.uuid4().hex}")
            return
        except FileNotFoundError:
            if not path.exists():  # moved by another drop of the same collection
                return
    raise StoreError(f"{path} could not be moved into {trash}: other drops kept removing it")


def _take_file_lock(path: Path, wait_s: float) -> Any:
    """An open file holding an exclusive ``flock`` on ``path`` (closing it releases the lock;
    so does the process ending), waiting up to ``wait_s`` for another holder."""
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a")
    except OSError as err:
        raise StoreError(
            f"cannot make the lock file {path} ({err}): is {path.parent} a Milvus Lite folder?"
        ) from err
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise AliasBusy(
                    f"{path} stayed locked for {wait_s:.0f} s: another `vitrine index` (a build "
                    "or a rollback) is moving the alias or cleaning up; try again when it ends"
                ) from None
            time.sleep(0.1)


def _release_lite(
    path: str, force: bool = False, broken: bool = False, used: str | None = None
) -> None:
    """One client of this process closed ``path``; stop its Lite server after the last
    (``force``: now). ``broken``: its child stopped answering; the one started next must
    load the collection again (a child that merely hangs is alive, so asking it says
    nothing), and this one is not given time to shut down cleanly. ``used``: what the
    client connected to; a client of a child already replaced releases nothing (the forced
    stop of its child let go of every client it had)."""
    with _LITE_LOCK:
        child = _LITE_CHILDREN.get(path)
        if used is not None and used != (child.uri if child is not None else path):
            return
        left = _LITE_OPEN.get(path, 0) - 1
        if left > 0 and not force:
            _LITE_OPEN[path] = left
            return
        _LITE_OPEN.pop(path, None)
        child = _LITE_CHILDREN.pop(path, None)
        if child is not None:
            if broken or not child.alive():
                _LITE_DIED.add(path)
            child.stop(timeout=1.0 if broken else 10.0)
            return
        try:
            from milvus_lite.server_manager import server_manager_instance
        except ImportError:  # no Lite installed: nothing of ours to stop
            return
        server_manager_instance.release_server(path)


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quote(value: str) -> str:
    """A Milvus string literal for ``value``.

    Not JSON: the expression parser (Milvus Lite's at least) refuses ``\\uXXXX`` escapes, so
    ``json.dumps("crème")`` is a syntax error there. Text stays as it is (UTF-8); only
    backslash, double quote and line breaks, which cannot appear raw in a literal, are escaped.
    """
    return '"' + "".join(_ESCAPES.get(char, char) for char in value) + '"'


def widened(search_params: dict[str, Any], top_k: int) -> dict[str, Any]:
    """Search parameters whose candidate lists hold at least ``top_k`` hits: Milvus refuses an
    HNSW ``ef`` or a DiskANN ``search_list`` smaller than the number of results asked for."""
    out = dict(search_params)
    for key in ("ef", "search_list"):
        if key in out:
            out[key] = max(int(out[key]), top_k)
    return out


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    """A row Milvus accepts: vectors as lists, missing catalogue fields as empty values."""
    out = dict(row)
    out["embedding"] = np.asarray(out["embedding"], dtype=np.float32).tolist()
    for name in ("product_id", "category", "title", "image_uri"):
        out[name] = str(out.get(name) or "")
    out["price"] = float(out.get("price") or 0.0)
    return out


def _hit(hit: dict[str, Any]) -> dict[str, Any]:
    entity = dict(hit.get("entity") or {})
    extras = entity.pop("$meta", None) or {}
    return {
        "image_id": hit.get("image_id", hit.get("id")),
        "score": float(hit["distance"]),
        **entity,
        **extras,
    }


def spec_from_dict(raw: dict[str, Any]) -> IndexSpec:
    """An IndexSpec back from collection metadata."""
    return IndexSpec(**{k: raw[k] for k in asdict(IndexSpec("", "")) if k in raw})


def rows_in_batches(rows: Iterable[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    """Group rows for bulk inserts."""
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
