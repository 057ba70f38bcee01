"""Vector index: recall@10 and QPS of Milvus (via `serving.store`) and DiskANN vs FAISS HNSW, exact.

Two datasets. A: 100K x 512 clustered unit vectors (seeded; 100 categories of 20 clusters each,
cluster sizes log-normal, points = centre + noise so about 8% of a query's true top 10 lie in
other clusters; uniform random vectors are a degenerate case for every graph index), with 1,000
held-out queries from the same distribution. B: the real Grocery photos embedded by the
pretrained default model (cached as .npy under ~/.cache/vitrine-bench), 500 of them as queries
against all the others. Ground truth: exact top 10 by a chunked NumPy matrix product, which is
also timed as the "exact NumPy" contender.

Contenders, all inner product: FAISS `IndexHNSWFlat` (M 16, efConstruction 200) swept over
efSearch, on 1 thread and on all threads; Milvus through `serving.store.VectorStore` exactly as
the service uses it (insert in the index step's batches, `build_index` with HNSW and the same
M / efConstruction, `ef` in the search params), with batched queries (all in one call) and one
query per call (the first --milvus-queries of them, for FAISS too); and once more asking for
ids only ("ids only" rows: the index alone, as FAISS answers, without the catalogue fields the
service fetches with every hit). Milvus Lite 3 runs in this
process ("in-process": a gRPC server thread, its FAISS on all threads), searching with
`serving/lite_search.py` as Vitrine always has it; at ef 32 the same collection is also timed
with Lite's own executor ("Lite's own" rows), and the ratio of the two is printed. After
`build_index` the bench records where the rows are (flushed segments, HNSW files; Lite searches
unflushed rows by brute force) and the recall the index step's verification would see; then it
closes the store and reopens it, as the service opens a collection the index step built, and
reads the HNSW file back to check its M and efConstruction. QPS blocks alternate
(`bench.common.interleaved`). Goal: Milvus reaches recall@10 >= 0.95 at >= 0.8x the QPS of
FAISS HNSW at recall@10 >= 0.95 (the smallest ef of each that gets there).

``--server`` replaces Milvus Lite with a real Milvus standalone server (the `milvus` PyPI
package's 2.3.5, started by `tests/milvus_server.py` on loopback with a temp data folder, in a
private network namespace where the process may create one), reached as
``VectorStore("http://127.0.0.1:PORT")``: same HNSW M / efConstruction, same ef sweep, batched
and one query per call. `build_index` flushes (the server indexes sealed segments of >= 1024
rows only), waits for the build, merges the sealed segments (a compaction; each search runs
once per segment) and waits for the merged segment's index; the bench reports the segments
and the index `describe_index` shows.

DiskANN itself: on a Milvus server Vitrine's index is DISKANN (``serving.store``), which the
only server that starts here (PyPI ``milvus`` 2.3.5) cannot build, so the bench runs Microsoft's
``diskannpy`` 0.7.0. It pins numpy 1.25, so it lives in a venv of its own, made with uv on first
use (``diskann-venv`` in the bench cache; ``--diskann-venv`` or ``VITRINE_DISKANN_VENV`` for
another); when that cannot be made, the DiskANN rows are skipped with the reason and the rest
runs. ``bench/diskann_worker.py`` runs in that venv as a child process for the whole run, driven
through a pipe, so its timing blocks alternate with FAISS's in ``interleaved``; its QPS is timed
inside the worker around the search calls, as FAISS's is around its own (the pipe's round trip,
once per block, is in the JSON as ``qps_with_pipe``), and its Intel OpenMP threads sleep between
blocks (``KMP_BLOCKTIME=0``) rather than spin 200 ms into the next. Built as knowhere builds it
for Milvus, with milvus.yaml's ``common.DiskIndex`` defaults: max_degree 56, build
search_list_size 100, PQ codes budgeted at 0.125 of the raw vectors' size (256 bytes per 512-d
vector), a node cache of 0.1 of it (knowhere's sizing: ((degree + 1) x 4 + 4 x dim) x 1.2 bytes
per node) picked from the build's sample vectors, search beam width 8 (knowhere's default, and
Milvus's min(4 x CPUs, 16) on 2 cores). Metric "mips", which DiskANN's disk index serves as L2
on the vectors with one dimension appended (zero for unit vectors), as Milvus serves IP. Swept
over the search list size L (Milvus's ``search_list``: at least k, at most 200 at k 10 in
knowhere; the service sends ``IndexConfig.search_list``, 100), batched (one ``batch_search``, on
1 thread and on all) and one query per call (``search``), as FAISS. Two contenders: "DiskANN
disk" (``build_disk_index`` + ``StaticDiskIndex``, what Milvus runs: PQ codes in memory, graph
and full vectors on disk, read with direct I/O past the page cache) and "DiskANN memory"
(``build_memory_index`` + ``StaticMemoryIndex``: the graph alone, without PQ and disk reads;
same degree and build L, metric "l2", which ranks unit vectors as inner product does and builds
the graph as the disk index does). The goal above applies to each.

    python bench/bench_index.py [--rows 100000] [--queries 1000] [--milvus-queries 200]
                                [--rounds 2] [--ef 16,32,64,128,256] [--no-grocery] [--json PATH]
                                [--server] [--no-diskann] [--diskann-venv PATH]
                                [--diskann-l 10,16,32,64,100,128] [--diskann-index disk,memory]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import GROCERY_ROOT, interleaved
from serving import lite_search

K = 10
DIM = 512
HNSW_M = 16
EF_CONSTRUCTION = 200
GOAL_RECALL = 0.95
GOAL_RATIO = 0.8
GROCERY_QUERIES = 500
MIN_BLOCK_SECONDS = 0.5
CACHE = Path(os.environ.get("VITRINE_BENCH_CACHE", Path.home() / ".cache" / "vitrine-bench"))
COLLECTION = "vitrine_bench_index"
BOUNDED = "srv Bounded"  # the threads column of server searches at consistency Bounded
LITE_OWN = "in-process Lite's own"  # Lite searched with its own executor, for the ratio
IDS_ONLY = "ids only"  # appended to the threads column of searches returning no fields
# The primary key alone: an empty list makes Milvus Lite return every field, vectors included.
ID_FIELD = ["image_id"]
# DiskANN itself: diskannpy in a venv of its own (it pins numpy 1.25), built and searched as
# knowhere does for Milvus with milvus.yaml's common.DiskIndex defaults.
DISKANNPY = "diskannpy==0.7.0"
DISKANN_PYTHON = "3.11"  # the version the venv is made with (diskannpy 0.7.0 has its wheels)
DISKANN_VENV = Path(os.environ.get("VITRINE_DISKANN_VENV", CACHE / "diskann-venv"))
DISKANN_WORKER = Path(__file__).resolve().with_name("diskann_worker.py")
DISKANN_KINDS = ("disk", "memory")
DISKANN_NAMES = {"disk": "DiskANN disk", "memory": "DiskANN memory"}
# "mips" on disk is L2 on the vectors plus one dimension; "l2" in memory builds the same graph.
DISKANN_METRIC = {"disk": "mips", "memory": "l2"}
DISKANN_MAX_DEGREE = 56  # MaxDegree
DISKANN_BUILD_L = 100  # SearchListSize (the build's)
DISKANN_PQ_RATIO = 0.125  # PQCodeBudgetGBRatio
DISKANN_CACHE_RATIO = 0.1  # SearchCacheBudgetGBRatio
DISKANN_BEAM_WIDTH = 8  # knowhere's default; Milvus: min(BeamWidthRatio 4 x CPUs, 16)
DISKANN_MAX_L = 200  # knowhere refuses a search_list above max(200, 10 k)


# --- data -------------------------------------------------------------------------------


def clustered(rows: int, queries: int, dim: int = DIM, seed: int = 0):
    """Unit vectors in two-level clusters: ``rows`` to index and ``queries`` held out.

    One cluster per 50 rows on average (2,000 at 100K), grouped 20 to a category whose centre
    they scatter around; cluster sizes are log-normal. Noise norms: 1.0 for a cluster centre
    around its category, 2.0 for a point around its cluster centre (relative to unit centres).
    """
    rng = np.random.default_rng(seed)
    n_clusters = max(rows // 50, 20)
    categories = rng.normal(size=(max(n_clusters // 20, 1), dim)).astype(np.float32)
    categories /= np.linalg.norm(categories, axis=1, keepdims=True)
    noise = rng.normal(size=(n_clusters, dim)).astype(np.float32) / np.sqrt(dim)
    centres = categories[rng.integers(0, len(categories), size=n_clusters)] + 1.0 * noise
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 0.5, size=n_clusters)
    labels = rng.choice(n_clusters, size=rows + queries, p=weights / weights.sum())
    x = np.empty((rows + queries, dim), dtype=np.float32)
    for start in range(0, len(x), 10_000):  # in blocks: no float64 temporaries of it all
        stop = min(start + 10_000, len(x))
        block = rng.normal(size=(stop - start, dim)).astype(np.float32) * (2.0 / np.sqrt(dim))
        x[start:stop] = centres[labels[start:stop]] + block
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:rows], x[rows:], (labels[:rows], labels[rows:])


def grocery_embeddings() -> tuple[np.ndarray, str]:
    """Every readable Grocery photo (train + test) embedded by the pretrained default model.

    Cached under ``CACHE`` by model config and photo list, so reruns skip the embedding.
    """
    from model.datasets import load_dataset
    from model.package import ModelConfig

    dataset = load_dataset("sop", GROCERY_ROOT)
    records = [*dataset.train, *dataset.splits["test"]]
    config = ModelConfig(embed_dim=None)
    key = hashlib.sha256(
        json.dumps(
            {"model": dataclasses.asdict(config), "paths": [str(r.path) for r in records]},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    path = CACHE / f"grocery-{config.backbone}-{key}.npy"
    if path.is_file():
        return np.load(path), f"cached {path}"

    import torch

    from model.embed import embed_records
    from model.package import build_model

    started = time.perf_counter()
    model = build_model(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    found = embed_records(model, records, config.data, device=device, description="grocery")
    vectors = np.ascontiguousarray(found.vectors, dtype=np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp.npy")
    np.save(staging, vectors)
    os.replace(staging, path)
    seconds = time.perf_counter() - started
    return vectors, f"embedded in {seconds:.0f} s on {device}, cached as {path}"


# --- contenders ---------------------------------------------------------------------------


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int = K, chunk: int = 256):
    """Exact top-k by inner product: chunked matrix product, argpartition, sort."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        sims = queries[start : start + chunk] @ base.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out[start : start + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top k that the contender returned."""
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2).sum(axis=1)
    return float(hits.mean() / truth.shape[1])


def faiss_hnsw(base: np.ndarray, threads: int):
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.IndexHNSWFlat(base.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    started = time.perf_counter()
    index.add(np.ascontiguousarray(base))
    return index, time.perf_counter() - started


def faiss_search(index, queries: np.ndarray, ef: int, threads: int, one_by_one: bool):
    import faiss

    faiss.omp_set_num_threads(threads)
    index.hnsw.efSearch = ef
    if not one_by_one:
        return index.search(queries, K)[1]
    return np.concatenate([index.search(q[None], K)[1] for q in queries])


def all_threads() -> None:
    """FAISS on every core: Milvus Lite's FAISS is this process's, and the bench changes it."""
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)


class MilvusContender:
    """A collection built and searched through `serving.store.VectorStore`: Milvus Lite in this
    process (``uri`` None: a folder under ``folder``) or a Milvus server (``uri`` http://...)."""

    def __init__(self, base: np.ndarray, folder: Path, uri: str | None = None):
        from components.index import IndexBuildConfig
        from serving.store import IndexConfig, rows_in_batches

        self.server = uri is not None
        self.uri = uri if self.server else str(folder / "milvus")
        self.name = "Milvus server HNSW" if self.server else "Milvus Lite HNSW"
        self.threads = "srv Session" if self.server else "in-process"
        self.seconds: dict[str, float] = {}
        config = IndexConfig(index_type="HNSW", hnsw_m=HNSW_M, hnsw_ef_construction=EF_CONSTRUCTION)
        all_threads()
        store = self._open()
        if self.server:  # a previous dataset's (or run's) collection
            store.drop(COLLECTION)
        tick = time.perf_counter()
        store.create_collection(COLLECTION, base.shape[1])
        rows = ({"image_id": str(i), "embedding": v} for i, v in enumerate(base))
        for batch in rows_in_batches(rows, IndexBuildConfig().insert_batch):
            store.insert(COLLECTION, batch)
        self.seconds["insert"] = time.perf_counter() - tick
        tick = time.perf_counter()
        self.spec = store.build_index(COLLECTION, config)
        self.seconds["build_index"] = time.perf_counter() - tick
        self.store = store

    def reopen(self) -> None:
        """Close (Lite flushes the in-memory rows, builds their HNSW) and open as serving does."""

        tick = time.perf_counter()
        self.store.close()
        self.seconds["close"] = time.perf_counter() - tick
        tick = time.perf_counter()
        self.store = self._open()
        self.store.load(COLLECTION)
        self.seconds["reopen_load"] = time.perf_counter() - tick

    def _open(self):
        from serving.store import VectorStore

        # A server search of all the queries in one call may take longer than the service's
        # 10 s request deadline at large ef on a busy machine.
        return VectorStore(self.uri, timeout=600.0) if self.server else VectorStore(self.uri)

    def files(self) -> dict[str, Any]:
        """Flushed segments and HNSW files on disk; M and efConstruction of the first file.
        On a server: its sealed segments holding rows, and the index as ``describe_index``
        reports it (rows indexed, M, efC)."""
        import faiss

        if self.server:
            info = self.store._call(None, "describe_index", COLLECTION, "embedding") or {}
            segments = self.store._call(None, "list_persistent_segments", COLLECTION)
            return {
                "server": True,
                "segments": sum(1 for segment in segments if segment.num_rows),
                "index_type": info.get("index_type"),
                "state": str(info.get("state", "")),
                "total_rows": int(info.get("total_rows", 0)),
                "indexed_rows": int(info.get("indexed_rows", 0)),
                "pending_index_rows": int(info.get("pending_index_rows", 0)),
                "hnsw_M": info.get("M"),
                "hnsw_efConstruction": info.get("efConstruction"),
            }
        folder = Path(self.uri)
        hnsw = sorted(folder.rglob("*.hnsw.idx"))
        found: dict[str, Any] = {
            "segments": len(list(folder.rglob("data_*.parquet"))),
            "hnsw_files": len(hnsw),
        }
        if hnsw:
            index = faiss.read_index(str(hnsw[0]))
            found["hnsw_M"] = int(index.hnsw.nb_neighbors(1))
            found["hnsw_efConstruction"] = int(index.hnsw.efConstruction)
        return found

    def search(
        self,
        queries: np.ndarray,
        ef: int | None,
        one_by_one: bool,
        consistency: str = "",
        ids_only: bool = False,
    ) -> np.ndarray:
        """Top K ids per query. ``consistency`` (server only): a search-time consistency level
        other than the collection's (Session, as the service creates it), passed to the same
        client call VectorStore.search makes, which has no such argument. ``ids_only``: ask
        for no fields (the index alone, as FAISS answers), not the catalogue fields the
        service asks for."""
        from serving.store import OUTPUT_FIELDS, _hit, widened

        spec = self.spec if ef is None else dataclasses.replace(self.spec, search_params={"ef": ef})
        all_threads()
        groups = [q[None] for q in queries] if one_by_one else [queries]
        found = []

        def search(group: np.ndarray) -> list[list[dict[str, Any]]]:
            if not consistency and not ids_only:
                return self.store.search(COLLECTION, group, K, spec)
            params = {"metric_type": spec.metric_type, "params": widened(spec.search_params, K)}
            options = {"consistency_level": consistency} if consistency else {}
            hits = self.store._call(
                COLLECTION, "search", COLLECTION,
                data=np.asarray(group, dtype=np.float32).tolist(), limit=K, filter="",
                output_fields=ID_FIELD if ids_only else OUTPUT_FIELDS, search_params=params,
                **options,
            )  # fmt: skip
            return [[_hit(hit) for hit in each] for each in hits]

        for group in groups:
            for hits in search(group):
                ids = [int(hit["image_id"]) for hit in hits] + [-1] * (K - len(hits))
                found.append(ids)
        return np.asarray(found, dtype=np.int64)

    def close(self) -> None:
        if self.server:  # the server outlives this dataset: free its memory for the next
            with contextlib.suppress(Exception):
                self.store.drop(COLLECTION)
        self.store.close()


class DiskANNError(RuntimeError):
    """The DiskANN worker failed or went away."""


def uv_command() -> list[str] | None:
    """How to run uv here: on PATH, else as a module of this Python or of the system's."""
    found = shutil.which("uv")
    candidates = [[found]] if found else []
    candidates += [[sys.executable, "-m", "uv"], ["python3", "-m", "uv"]]
    for command in candidates:
        try:
            done = subprocess.run([*command, "--version"], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return command
    return None


def _imports_diskann(python: Path) -> bool:
    if not python.is_file():
        return False
    done = subprocess.run(
        [str(python), "-I", "-c", "import diskannpy, numpy"], capture_output=True, timeout=120
    )
    return done.returncode == 0


def diskann_python(venv: Path) -> tuple[Path | None, str]:
    """The Python of the diskann venv, made with uv when it is missing or broken.

    Returns (python, how it was found) or (None, why there is none): no uv, or a uv step that
    failed (no network, no Python 3.11 to be had). Made under a lock, so two runs do not
    make it at once.
    """
    import fcntl

    python = venv / "bin" / "python"
    if _imports_diskann(python):
        return python, f"venv {venv}"
    uv = uv_command()
    if uv is None:
        return None, (
            f"no uv to make the diskannpy venv at {venv} (pip install uv, or point "
            "--diskann-venv / VITRINE_DISKANN_VENV at a venv that has diskannpy)"
        )
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _imports_diskann(python):  # made meanwhile by another run
            return python, f"venv {venv}"
        print(f"DiskANN: making a venv for {DISKANNPY} at {venv} (once)", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        steps = (
            ["venv", "--python", DISKANN_PYTHON, str(venv)],
            ["pip", "install", "--python", str(python), DISKANNPY],
        )
        for step in steps:
            print(f"  $ {' '.join([*uv, *step])}", flush=True)
            try:
                done = subprocess.run([*uv, *step], capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.SubprocessError) as error:
                return None, f"`uv {step[0]}` for the diskannpy venv failed: {error}"
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
                return None, f"`uv {' '.join(step[:2])}` failed ({done.returncode}): {lines[-1]}"
        if not _imports_diskann(python):
            return None, f"{DISKANNPY} installed at {venv} but does not import"
    return python, f"venv {venv}, made now"


class DiskANNWorker:
    """`bench/diskann_worker.py` as a child process of the diskann venv's Python, driven by
    one JSON line per command on its stdin; its stderr (DiskANN's logging) goes to a file."""

    def __init__(self, python: Path, folder: Path):
        self.folder = folder
        self.log_path = folder / "diskann-worker.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 -- open while the worker lives
        # -I: the project's paths and PYTHON* variables stay out of the worker. diskannpy's
        # OpenMP is Intel's, whose threads spin 200 ms after each parallel region (a core
        # taken from the block timed next, FAISS's or Milvus's); KMP_BLOCKTIME 0 puts them to
        # sleep at once, as FAISS's libgomp nearly does.
        self.process = subprocess.Popen(
            [str(python), "-I", str(DISKANN_WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={"KMP_BLOCKTIME": "0", **os.environ},
        )
        self.hello = self._reply()

    def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """Send one command; its reply, or DiskANNError with the worker's words."""
        try:
            self.process.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
            self.process.stdin.flush()
        except OSError as error:
            raise DiskANNError(f"DiskANN worker gone ({error}); {self._log_tail()}") from None
        return self._reply()

    def _reply(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise DiskANNError(f"DiskANN worker exited ({code}); {self._log_tail()}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise DiskANNError(f"DiskANN worker: {reply.get('error')}")
        return reply

    def _log_tail(self) -> str:
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return "its log ends: " + " | ".join(lines[-3:]) if lines else "its log is empty"

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError, DiskANNError):
                self.call("quit")
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@contextlib.contextmanager
def open_diskann(venv: Path) -> Iterator[tuple[DiskANNWorker | None, str]]:
    """The DiskANN worker for the whole run, and how its venv was found; (None, the reason)
    when the venv cannot be made or the worker does not start."""
    python, how = diskann_python(venv)
    worker = None
    folder = Path(tempfile.mkdtemp(prefix="vitrine-bench-diskann-"))
    try:
        if python is not None:
            try:
                worker = DiskANNWorker(python, folder)
            except (OSError, DiskANNError) as error:
                how = f"the DiskANN worker did not start: {error}"
        yield worker, how
    finally:
        if worker is not None:
            worker.close()
        shutil.rmtree(folder, ignore_errors=True)


class DiskANNContender:
    """DiskANN's own indexes over one dataset, built and searched in the worker."""

    def __init__(self, worker: DiskANNWorker, base: np.ndarray, queries: np.ndarray, kinds):
        self.worker = worker
        self.kinds = list(kinds)
        self.folder = Path(tempfile.mkdtemp(prefix="data-", dir=worker.folder))
        self.queries = str(self.folder / "queries.npy")
        np.save(self.folder / "base.npy", base)
        np.save(self.queries, queries)
        self.seconds: dict[str, float] = {}
        self.info: dict[str, dict[str, Any]] = {}
        threads = os.cpu_count() or 1
        for kind in self.kinds:
            reply = worker.call(
                "build",
                kind=kind,
                base=str(self.folder / "base.npy"),
                folder=str(self.folder / kind),
                metric=DISKANN_METRIC[kind],
                max_degree=DISKANN_MAX_DEGREE,
                build_complexity=DISKANN_BUILD_L,
                pq_code_budget_ratio=DISKANN_PQ_RATIO,
                cache_budget_ratio=DISKANN_CACHE_RATIO,
                threads=threads,
            )
            self.seconds[f"diskann_{kind}_build"] = reply["seconds"]
            self.seconds[f"diskann_{kind}_load"] = reply["load_seconds"]
            self.info[kind] = reply["info"]
            stage(f"{DISKANN_NAMES[kind]} built in {reply['seconds']:.1f} s: {self.describe(kind)}")

    def describe(self, kind: str) -> str:
        info = self.info[kind]
        text = (
            f"metric {info['metric']}, max_degree {DISKANN_MAX_DEGREE}, build L {DISKANN_BUILD_L}"
        )
        if kind == "disk":
            text += (
                f", PQ {info['pq_bytes_per_vector']} bytes/vector ({DISKANN_PQ_RATIO} of "
                f"{4 * info['dim']}), {info['cached_nodes']} nodes cached, "
                f"{info['disk_index_bytes'] / 2**20:.0f} MiB on disk, beam width "
                f"{DISKANN_BEAM_WIDTH}"
            )
        return text

    def search(
        self, kind: str, L: int, threads: int, one_by_one: bool, count: int, repeats: int = 1
    ) -> tuple[np.ndarray | None, float]:
        """(ids of the first repeat, when repeats is 1; seconds of all, timed in the worker)."""
        ids = str(self.folder / "ids.npy") if repeats == 1 else None
        reply = self.worker.call(
            "search",
            index=kind,
            queries=self.queries,
            count=count,
            k=K,
            complexity=L,
            threads=threads,
            beam_width=DISKANN_BEAM_WIDTH,
            one_by_one=one_by_one,
            repeats=repeats,
            ids=ids,
        )
        return (np.load(ids) if ids else None), reply["seconds"]

    def close(self) -> None:
        with contextlib.suppress(DiskANNError):
            self.worker.call("drop")
        shutil.rmtree(self.folder, ignore_errors=True)


# --- one dataset --------------------------------------------------------------------------


def run_dataset(
    title: str,
    base: np.ndarray,
    queries: np.ndarray,
    args: argparse.Namespace,
    server_uri: str | None = None,
    diskann: tuple[DiskANNWorker | None, str] = (None, "not asked for"),
) -> dict[str, Any]:
    threads = os.cpu_count() or 1
    efs = args.ef
    m = min(args.milvus_queries, len(queries))
    print(
        f"\n== {title}: {len(base)} x {base.shape[1]} indexed, {len(queries)} queries "
        f"(one per call: the first {m}), top {K}, {threads} CPU threads, {args.rounds} rounds"
    )
    sys.stdout.flush()

    tick = time.perf_counter()
    truth = exact_top_k(base, queries)
    exact_first = time.perf_counter() - tick
    stage(f"exact top {K}: {exact_first:.1f} s; building FAISS HNSW")
    hnsw, faiss_build = faiss_hnsw(base, threads)
    stage(f"FAISS HNSW built in {faiss_build:.1f} s")

    worker, diskann_skipped = diskann
    dk: DiskANNContender | None = None
    if worker is not None:
        stage(f"building DiskANN ({', '.join(args.diskann_index)}) in its worker")
        try:
            dk = DiskANNContender(worker, base, queries, args.diskann_index)
        except DiskANNError as error:
            diskann_skipped = f"the DiskANN build failed: {error}"
            with contextlib.suppress(DiskANNError):
                worker.call("drop")  # what it did build
    if dk is None:
        stage(f"DiskANN rows skipped: {diskann_skipped}")

    stage("inserting into Milvus")
    folder = Path(tempfile.mkdtemp(prefix="vitrine-bench-index-"))
    try:
        milvus = MilvusContender(base, folder, server_uri)
        built_files = milvus.files()
        stage(
            f"Milvus insert {milvus.seconds['insert']:.1f} s, build_index "
            f"{milvus.seconds['build_index']:.1f} s: {describe(built_files)}"
        )
        if not milvus.server and not built_files["hnsw_files"]:
            stage(
                "WARNING: no HNSW file after build_index: Lite holds the rows unflushed and "
                "searches them by brute force (slow: about a second per call at 20K rows)"
            )
        tick = time.perf_counter()
        built_recall = recall_at_k(milvus.search(queries, None, one_by_one=False), truth)
        built_qps = len(queries) / (time.perf_counter() - tick)
        milvus.reopen()
        files = milvus.files()
        stage(f"Milvus reopened: {describe(files)}; timing searches")

        rows: list[dict[str, Any]] = []
        blocks: dict[str, Callable[[], int]] = {}

        def add(contender, params, thread_note, mode, block, n, first=None):
            """A timed block; ``first`` (its output, seconds) when it already ran once.

            Each block repeats its search until it lasts MIN_BLOCK_SECONDS, so the fast ones are
            not timed on a few milliseconds of a busy machine. Returns the first run's output.
            """
            if first is None:
                tick = time.perf_counter()
                out = block()
                first = (out, time.perf_counter() - tick)
            reps = max(1, min(1000, math.ceil(MIN_BLOCK_SECONDS / max(first[1], 1e-6))))
            key = f"{contender} {params} {thread_note} {mode}"
            row = {"contender": contender, "params": params, "threads": thread_note}
            rows.append(row | {"mode": mode, "queries": n, "repeats": reps, "key": key})

            def timed() -> int:
                for _ in range(reps):
                    block()
                return n * reps

            blocks[key] = timed
            return first[0]

        def once(block):
            tick = time.perf_counter()
            out = block()
            return out, time.perf_counter() - tick

        add(
            "exact NumPy", "chunk 256", f"BLAS ({threads})", "batched",
            lambda: exact_top_k(base, queries), len(queries), (truth, exact_first),
        )  # fmt: skip
        rows[-1]["recall"] = 1.0
        for ef in efs:
            for n_threads in (1, threads):
                found = add(
                    "FAISS HNSW", f"ef={ef}", str(n_threads), "batched",
                    lambda ef=ef, t=n_threads: faiss_search(hnsw, queries, ef, t, False),
                    len(queries),
                )  # fmt: skip
                rows[-1]["recall"] = recall_at_k(found, truth)
            found = add(
                "FAISS HNSW", f"ef={ef}", "1", "one per call",
                lambda ef=ef: faiss_search(hnsw, queries[:m], ef, 1, True), m,
            )  # fmt: skip
            rows[-1]["recall"] = recall_at_k(found, truth[:m])
        for ef in efs:
            found = add(
                milvus.name, f"ef={ef}", milvus.threads, "batched",
                lambda ef=ef: milvus.search(queries, ef, False), len(queries),
                once(lambda ef=ef: milvus.search(queries, ef, False)),
            )  # fmt: skip
            rows[-1]["recall"] = recall_at_k(found, truth)
            found = add(
                milvus.name, f"ef={ef}", milvus.threads, "one per call",
                lambda ef=ef: milvus.search(queries[:m], ef, True), m,
                once(lambda ef=ef: milvus.search(queries[:m], ef, True)),
            )  # fmt: skip
            rows[-1]["recall"] = recall_at_k(found, truth[:m])
        for ef in efs:  # the index alone: ids, no catalogue fields (as FAISS answers)
            for mode, n, sub in (
                ("batched", len(queries), queries),
                ("one per call", m, queries[:m]),
            ):
                one = mode != "batched"
                run = lambda ef=ef, sub=sub, one=one: milvus.search(sub, ef, one, ids_only=True)  # noqa: E731
                found = add(
                    milvus.name, f"ef={ef}", f"{milvus.threads} {IDS_ONLY}", mode, run, n, once(run)
                )
                rows[-1]["recall"] = recall_at_k(found, truth[:n])
        own_ef = 32 if 32 in efs else efs[0]
        if not milvus.server:  # Lite's own executor (serving/lite_search.py replaces it)
            for mode, n, sub in (
                ("batched", len(queries), queries),
                ("one per call", m, queries[:m]),
            ):
                one = mode != "batched"

                def run(sub=sub, one=one):
                    with lite_search.lite_own():
                        return milvus.search(sub, own_ef, one)

                found = add(milvus.name, f"ef={own_ef}", LITE_OWN, mode, run, n, once(run))
                rows[-1]["recall"] = recall_at_k(found, truth[:n])
        if milvus.server:  # the same server at search-time consistency Bounded
            for ef in efs:
                for mode, n, sub in (
                    ("batched", len(queries), queries),
                    ("one per call", m, queries[:m]),
                ):
                    one = mode != "batched"
                    run = lambda ef=ef, sub=sub, one=one: milvus.search(sub, ef, one, "Bounded")  # noqa: E731
                    found = add(milvus.name, f"ef={ef}", BOUNDED, mode, run, n, once(run))
                    rows[-1]["recall"] = recall_at_k(found, truth[:n])

        worker_seconds: dict[str, float] = {}  # DiskANN blocks: the time the worker measured

        def add_diskann(kind: str, L: int, n_threads: int, mode: str, n: int) -> None:
            """A DiskANN block: one command per block, its repeats run in the worker."""
            one = mode != "batched"
            found, first = dk.search(kind, L, n_threads, one, n)
            reps = max(1, min(1000, math.ceil(MIN_BLOCK_SECONDS / max(first, 1e-6))))
            key = f"{DISKANN_NAMES[kind]} L={L} {n_threads} {mode}"
            rows.append(
                {"contender": DISKANN_NAMES[kind], "params": f"L={L}", "threads": str(n_threads)}
                | {"mode": mode, "queries": n, "repeats": reps, "key": key}
                | {"recall": recall_at_k(found, truth[:n])}
            )
            worker_seconds[key] = 0.0

            def timed() -> int:
                worker_seconds[key] += dk.search(kind, L, n_threads, one, n, reps)[1]
                return n * reps

            blocks[key] = timed

        if dk is not None:
            for kind in dk.kinds:
                for L in args.diskann_l:
                    for n_threads in (1, threads):
                        add_diskann(kind, L, n_threads, "batched", len(queries))
                    add_diskann(kind, L, 1, "one per call", m)
        qps = interleaved(blocks, args.rounds)
        milvus.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if dk is not None:
            dk.close()
    for row in rows:
        key = row.pop("key")
        row["qps"] = qps[key]
        if key in worker_seconds:  # timed in the worker; the pipe's round trips left out
            row["qps_with_pipe"] = qps[key]
            row["qps"] = row["queries"] * row["repeats"] * args.rounds / worker_seconds[key]

    print(f"{'contender':18} {'params':11} {'threads':23} {'mode':13} {'recall@10':>9} {'QPS':>10}")
    for row in rows:
        print(
            f"{row['contender']:18.18} {row['params']:11} {row['threads']:23} {row['mode']:13} "
            f"{row['recall']:9.4f} {row['qps']:10.1f}"
        )
    seconds = {"exact_first_pass": exact_first, "faiss_add": faiss_build, **milvus.seconds}
    if dk is not None:
        seconds |= dk.seconds
    print(
        f"build: FAISS HNSW add {faiss_build:.1f} s ({threads} threads); {milvus.name} insert "
        f"{milvus.seconds['insert']:.1f} s, build_index {milvus.seconds['build_index']:.1f} s, "
        f"close {milvus.seconds['close']:.1f} s, reopen + load "
        f"{milvus.seconds['reopen_load']:.1f} s"
    )
    default_ef = milvus.spec.search_params.get("ef")
    print(
        f"Milvus right after build_index: {describe(built_files)}; recall@10 "
        f"{built_recall:.4f}, {built_qps:.1f} QPS batched (the service's ef {default_ef}, one "
        f"pass) -- what the index step's verification sees"
    )
    print(f"Milvus searched above (closed, reopened, loaded): {describe(files)}")
    if dk is not None:
        for kind in dk.kinds:
            print(
                f"{DISKANN_NAMES[kind]}: built in {dk.seconds[f'diskann_{kind}_build']:.1f} s "
                f"(+ {dk.seconds[f'diskann_{kind}_load']:.1f} s to open), {dk.describe(kind)}"
            )
    result = {
        "dataset": title,
        "rows": len(base),
        "dim": int(base.shape[1]),
        "queries": len(queries),
        "milvus_queries": m,
        "milvus": {"contender": milvus.name, "uri": milvus.uri if milvus.server else "lite"},
        "threads": threads,
        "rounds": args.rounds,
        "seconds": seconds,
        "milvus_files_after_build_index": built_files,
        "milvus_after_build_index": {"ef": default_ef, "recall": built_recall, "qps": built_qps},
        "milvus_files": files,
        "diskann": (
            {"skipped": diskann_skipped}
            if dk is None
            else {
                "diskannpy": worker.hello["diskannpy"],
                "beam_width": DISKANN_BEAM_WIDTH,
                "max_degree": DISKANN_MAX_DEGREE,
                "build_search_list_size": DISKANN_BUILD_L,
                "pq_code_budget_gb_ratio": DISKANN_PQ_RATIO,
                "search_cache_budget_gb_ratio": DISKANN_CACHE_RATIO,
                "indexes": dk.info,
            }
        ),
        "table": rows,
        "comparison": compare(rows, threads, milvus.name, milvus.threads),
    }
    print(result["comparison"]["line"])
    result["comparison_ids_only"] = compare(
        rows, threads, milvus.name, f"{milvus.threads} {IDS_ONLY}"
    )
    print(
        "the index alone (ids, no catalogue fields, as FAISS answers): "
        + result["comparison_ids_only"]["line"]
    )
    if not milvus.server:
        result["lite_own"] = executor_speedup(rows, milvus.name, milvus.threads)
        print(result["lite_own"]["line"])
    if milvus.server:
        result["comparison_bounded"] = compare(rows, threads, milvus.name, BOUNDED)
        print(
            "search-time consistency Bounded (not what VectorStore.search sends): "
            + result["comparison_bounded"]["line"]
        )
    if dk is None:
        print(f"DiskANN skipped: {diskann_skipped}")
    else:
        for kind in dk.kinds:
            name = DISKANN_NAMES[kind]
            found = compare(rows, threads, name, str(threads), where_one="1", label=name)
            result[f"comparison_diskann_{kind}"] = found
            print(found["line"])
    return result


def executor_speedup(rows: list[dict], contender: str, where: str) -> dict[str, Any]:
    """Lite with Vitrine's search executor (serving/lite_search.py) against Lite's own, at
    the ef the own rows were timed at, batched and one query per call."""
    out: dict[str, Any] = {}
    parts = []
    for mode in ("batched", "one per call"):
        own = next(r for r in rows if r["threads"] == LITE_OWN and r["mode"] == mode)
        ours = next(
            r
            for r in rows
            if r["contender"] == contender
            and r["threads"] == where
            and r["params"] == own["params"]
            and r["mode"] == mode
        )
        ratio = ours["qps"] / own["qps"]
        out[mode] = {"ratio": ratio, "vitrine_qps": ours["qps"], "lite_own_qps": own["qps"]}
        parts.append(f"{mode} {ours['qps']:.1f} / {own['qps']:.1f} = {ratio:.2f}x")
    out["line"] = (
        f"ratio Lite with serving/lite_search.py / Lite's own executor at {own['params']} "
        f"(same collection, same run): " + "; ".join(parts)
    )
    return out


def stage(text: str) -> None:
    """A progress line (the slow stages take minutes on a busy machine)."""
    print(f"  .. {text}", flush=True)


def describe(files: dict[str, Any]) -> str:
    if files.get("server"):
        return (
            f"server {files['index_type']} index {files['state']} on {files['segments']} "
            f"segment(s), {files['indexed_rows']} of "
            f"{files['total_rows']} rows indexed ({files['pending_index_rows']} pending; M "
            f"{files['hnsw_M']}, efConstruction {files['hnsw_efConstruction']})"
        )
    text = f"{files['segments']} flushed segment(s), {files['hnsw_files']} HNSW file(s)"
    if "hnsw_M" in files:
        text += f" (M {files['hnsw_M']}, efConstruction {files['hnsw_efConstruction']})"
    return text


def first_reaching(rows: list[dict], contender: str, threads: str, mode: str) -> dict | None:
    """The row of the smallest ef (the sweep's order) whose recall reaches the goal."""
    for row in rows:
        same = (row["contender"], row["threads"], row["mode"]) == (contender, threads, mode)
        if same and row["recall"] >= GOAL_RECALL:
            return row
    return None


def _threads(count: str) -> str:
    return f"{count} thread{'s' if count != '1' else ''}"


def compare(
    rows: list[dict],
    threads: int,
    contender: str = "Milvus Lite HNSW",
    where: str = "in-process",
    where_one: str | None = None,
    label: str = "Milvus",
) -> dict[str, Any]:
    """The contender's QPS / FAISS HNSW QPS, each at its smallest ef (L) reaching recall@10
    >= 0.95; ``where`` (``where_one``) picks the contender's batched (one per call) rows by
    their threads column, ``label`` names it in the line (and its key, lower-cased)."""
    pairs = {
        "batched": (
            first_reaching(rows, contender, where, "batched"),
            first_reaching(rows, "FAISS HNSW", str(threads), "batched"),
        ),
        "one per call": (
            first_reaching(rows, contender, where_one or where, "one per call"),
            first_reaching(rows, "FAISS HNSW", "1", "one per call"),
        ),
    }
    out: dict[str, Any] = {"goal_recall": GOAL_RECALL, "goal_ratio": GOAL_RATIO}
    parts = []
    for mode, (mine, theirs) in pairs.items():
        if mine is None or theirs is None:
            who = label if mine is None else "FAISS HNSW"
            out[mode] = {"ratio": None, "passed": False}
            parts.append(f"{mode}: {who} never reaches recall@10 {GOAL_RECALL} -> FAIL")
            continue
        ratio = mine["qps"] / theirs["qps"]
        out[mode] = {
            "ratio": ratio,
            label.split()[0].lower(): mine["params"],  # "milvus", "diskann"
            "faiss": theirs["params"],
            "passed": ratio >= GOAL_RATIO,
        }
        # Thread counts where the threads column has one (Milvus's says where it runs).
        mine_threads = f" ({_threads(mine['threads'])})" if mine["threads"].isdigit() else ""
        parts.append(
            f"{mode}: {label} {mine['params']}{mine_threads} {mine['qps']:.1f} / FAISS "
            f"{theirs['params']} ({_threads(theirs['threads'])}) {theirs['qps']:.1f} = "
            f"{ratio:.3f} -> "
            f"{'PASS' if ratio >= GOAL_RATIO else 'FAIL'}"
        )
    out["passed"] = all(out[mode]["passed"] for mode in pairs)
    out["line"] = (
        f"ratio {label} QPS / FAISS HNSW QPS at recall@10 >= {GOAL_RECALL} (goal >= {GOAL_RATIO}): "
        + "; ".join(parts)
    )
    return out


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="clustered vectors indexed")
    parser.add_argument("--queries", type=int, default=1_000, help="held-out clustered queries")
    parser.add_argument(
        "--milvus-queries",
        type=int,
        default=200,
        help="queries sent one per call (the first N), to Milvus and FAISS alike; batched "
        "searches use all queries (Lite's own executor costs ~47 ms a call at 100K rows)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating timing rounds")
    parser.add_argument(
        "--ef",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[16, 32, 64, 128, 256],
        help="HNSW search-time ef values, comma-separated, ascending",
    )
    parser.add_argument("--no-grocery", action="store_true", help="skip the Grocery dataset")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument(
        "--server",
        action="store_true",
        help="Milvus contender: a real Milvus standalone server (the `milvus` package's, on "
        "loopback, temp data folder; tests/milvus_server.py) instead of Milvus Lite",
    )
    parser.add_argument(
        "--no-diskann", action="store_true", help="skip the DiskANN (diskannpy) contender"
    )
    parser.add_argument(
        "--diskann-venv",
        type=Path,
        default=DISKANN_VENV,
        help=f"the venv holding {DISKANNPY}, made with uv when missing (default: "
        "$VITRINE_DISKANN_VENV, else diskann-venv in the bench cache)",
    )
    parser.add_argument(
        "--diskann-l",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[10, 16, 32, 64, 100, 128],
        help=f"DiskANN search list sizes L (Milvus's search_list; the service's is 100), "
        f"comma-separated, ascending, {K} to {DISKANN_MAX_L}",
    )
    parser.add_argument(
        "--diskann-index",
        type=lambda s: s.split(","),
        default=list(DISKANN_KINDS),
        help="DiskANN indexes to build: disk (what Milvus runs), memory (the graph alone), "
        "comma-separated",
    )
    args = parser.parse_args()
    if any(not K <= L <= DISKANN_MAX_L for L in args.diskann_l):
        parser.error(f"--diskann-l: each L must be in [{K}, {DISKANN_MAX_L}] (k is {K})")
    if not args.diskann_index or set(args.diskann_index) - set(DISKANN_KINDS):
        parser.error(f"--diskann-index: a comma-separated subset of {','.join(DISKANN_KINDS)}")
    with contextlib.ExitStack() as stack:
        server_uri = None
        if args.server:
            server_uri = stack.enter_context(milvus_server())
        diskann: tuple[DiskANNWorker | None, str] = (None, "--no-diskann")
        if not args.no_diskann:
            diskann = stack.enter_context(open_diskann(args.diskann_venv))
        run(args, server_uri, diskann)


@contextlib.contextmanager
def milvus_server():
    """A Milvus standalone server for the whole run; yields its URI."""
    from tests.milvus_server import MilvusTestServer, milvus_missing

    missing = milvus_missing()
    if missing:
        raise SystemExit(f"--server: {missing}")
    folder = Path(tempfile.mkdtemp(prefix="vitrine-bench-milvus-server-"))
    server = MilvusTestServer(folder / "milvus", start_timeout=180.0)
    try:
        seconds = server.start()
        where = "a private network namespace" if server.isolated else "the host's namespace"
        print(f"Milvus server started in {seconds:.1f} s at {server.uri} ({where})", flush=True)
        yield server.uri
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def run(
    args: argparse.Namespace,
    server_uri: str | None,
    diskann: tuple[DiskANNWorker | None, str] = (None, "not asked for"),
) -> None:
    import faiss

    started = time.perf_counter()
    results: dict[str, Any] = {"k": K, "hnsw": {"M": HNSW_M, "efConstruction": EF_CONSTRUCTION}}
    results["milvus_contender"] = "server" if server_uri else "lite"
    base, queries, (base_labels, query_labels) = clustered(args.rows, args.queries)
    sample = exact_top_k(base, queries[:200])
    in_cluster = float((base_labels[sample] == query_labels[:200, None]).mean())
    print(
        f"FAISS {faiss.__version__}; clustered data: {len(base)} rows + {len(queries)} "
        f"queries, {base.shape[1]}-d, {len(np.unique(base_labels))} clusters, generated in "
        f"{time.perf_counter() - started:.1f} s; {in_cluster:.0%} of a query's true top {K} "
        "is in its own cluster"
    )
    worker, how = diskann
    if worker is None:
        print(f"DiskANN rows skipped: {how}")
    else:
        print(
            f"DiskANN: diskannpy {worker.hello['diskannpy']} (numpy {worker.hello['numpy']}) "
            f"in its worker process, {how}"
        )
    results["clustered_top_k_in_own_cluster"] = in_cluster
    results["clustered"] = run_dataset("clustered", base, queries, args, server_uri, diskann)
    del base, queries

    if args.no_grocery:
        print("\nGrocery skipped (--no-grocery)")
    elif not (GROCERY_ROOT / "Ebay_train.txt").is_file():
        print(f"\nGrocery skipped: no Grocery data at {GROCERY_ROOT} (set VITRINE_GROCERY_ROOT)")
    else:
        vectors, how = grocery_embeddings()
        print(f"\nGrocery: {len(vectors)} photos x {vectors.shape[1]}-d, {how}")
        picked = np.random.default_rng(0).choice(len(vectors), GROCERY_QUERIES, replace=False)
        rest = np.setdiff1d(np.arange(len(vectors)), picked)
        results["grocery"] = run_dataset(
            "Grocery", vectors[rest], vectors[picked], args, server_uri, diskann
        )

    total = time.perf_counter() - started
    results["seconds_total"] = total
    verdicts = [
        f"{name} {'PASS' if results[name]['comparison']['passed'] else 'FAIL'}"
        for name in ("clustered", "grocery")
        if name in results
    ]
    print(
        f"\n{total:.0f} s in all. Goal: Milvus recall@10 >= {GOAL_RECALL} at >= {GOAL_RATIO}x "
        f"FAISS HNSW QPS at equal recall, batched and one query per call: " + ", ".join(verdicts)
    )
    diskann_verdicts = [
        f"{name} {DISKANN_NAMES[kind]} {'PASS' if found['passed'] else 'FAIL'}"
        for name in ("clustered", "grocery")
        for kind in DISKANN_KINDS
        if (found := results.get(name, {}).get(f"comparison_diskann_{kind}"))
    ]
    skipped = [
        f"{name}: {results[name]['diskann']['skipped']}"
        for name in ("clustered", "grocery")
        if "skipped" in results.get(name, {}).get("diskann", {})
    ]
    if diskann_verdicts:
        print("The same goal for DiskANN itself (diskannpy): " + ", ".join(diskann_verdicts))
    if skipped:
        print("DiskANN rows skipped: " + "; ".join(skipped))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
