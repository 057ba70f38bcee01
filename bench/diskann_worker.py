"""DiskANN (`diskannpy`) behind a pipe, for `bench/bench_index.py`.

Runs with the diskann venv's Python (diskannpy pins numpy 1.25, which the project's venv cannot
hold), so it imports only the standard library, numpy and diskannpy: nothing of the project.
Long-lived: the bench starts it once and alternates its timing blocks with FAISS's in the same
run. Protocol: one JSON object per line on stdin, one JSON reply per line on stdout (the first
reply, unasked, says the versions); vectors come and go as .npy files. Every reply carries
``"ok"``; a failed command answers ``{"ok": false, "error": ...}`` and the worker carries on.
DiskANN's own C++ logging, which writes to stdout, is sent to stderr so it cannot mix with the
replies.

Commands:

- ``build``: ``kind`` "disk" (``build_disk_index`` + ``StaticDiskIndex``: PQ codes in memory,
  graph and full vectors on disk, read with direct I/O) or "memory" (``build_memory_index`` +
  ``StaticMemoryIndex``: graph and vectors in memory), over ``base`` (.npy, float32) into
  ``folder``, with ``metric``, ``max_degree``, ``build_complexity``, ``threads``; disk only:
  ``pq_code_budget_ratio`` (the PQ codes' budget over the raw vectors' size) and
  ``cache_budget_ratio`` (nodes cached in memory, same measure). The index stays open under its
  kind, replacing the previous one. Replies ``seconds`` (build), ``load_seconds`` and ``info``.
- ``search``: ``index`` (a built kind), the first ``count`` rows of ``queries`` (.npy), ``k``,
  ``complexity`` (L), ``threads``, ``beam_width`` (disk only), ``one_by_one`` (one ``search``
  call per query instead of one ``batch_search``), ``repeats``. Replies ``seconds``: the time of
  all repeats, measured here; with ``ids`` (a path) the first repeat's ids are saved there.
- ``drop``: close the indexes and forget the vectors (the dataset is done).
- ``quit``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

# As knowhere sizes its node cache (diskann.cc: GetCachedNodeNum, kCacheExpansionRate).
CACHE_EXPANSION = 1.2


def _free_memory_gb() -> float:
    """What Milvus gives an index build (build_dram_budget_gb): the free memory."""
    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(pages / 2**30, 1.0)


def _pq_budget_gb(budget_gb: float) -> float:
    """The PQ budget rounded up to the 6 decimals DiskANN keeps of it (diskannpy passes it as
    text, ``std::to_string``); rounding down could cost the codes a byte per vector."""
    return math.ceil(budget_gb * 1e6) / 1e6


def _bin_header(path: Path) -> tuple[int, int]:
    """Rows and columns of a DiskANN .bin file (two int32 before the data)."""
    rows, cols = np.fromfile(path, dtype=np.int32, count=2)
    return int(rows), int(cols)


class Worker:
    """The open indexes and loaded query sets of one worker process."""

    def __init__(self) -> None:
        self.indexes: dict[str, object] = {}
        self.queries: dict[str, np.ndarray] = {}
        self.bases: dict[str, tuple[Path, int, int]] = {}

    def _base(self, base: str, folder: Path) -> tuple[Path, int, int]:
        """The base vectors as a DiskANN .bin file (written once per .npy file)."""
        import diskannpy

        if base not in self.bases:
            vectors = np.ascontiguousarray(np.load(base), dtype=np.float32)
            path = folder / "base.bin"
            diskannpy.vectors_to_file(str(path), vectors)
            self.bases[base] = (path, *vectors.shape)
        return self.bases[base]

    def build(self, command: dict) -> dict:
        import diskannpy

        kind = command["kind"]
        folder = Path(command["folder"])
        folder.mkdir(parents=True, exist_ok=True)
        self.indexes.pop(kind, None)  # the previous dataset's, if any
        bin_path, rows, dim = self._base(command["base"], folder.parent)
        raw_gb = rows * dim * 4 / 2**30
        threads = command["threads"]
        metric = command["metric"]
        info: dict[str, object] = {"rows": rows, "dim": dim, "metric": metric}
        # What both builds take: the vectors, the metric, the graph's degree and build L.
        graph = {
            "data": str(bin_path),
            "vector_dtype": np.float32,
            "distance_metric": metric,
            "index_directory": str(folder),
            "complexity": command["build_complexity"],
            "graph_degree": command["max_degree"],
            "num_threads": threads,
        }
        started = time.perf_counter()
        if kind == "disk":
            diskannpy.build_disk_index(
                **graph,
                search_memory_maximum=_pq_budget_gb(command["pq_code_budget_ratio"] * raw_gb),
                build_memory_maximum=_free_memory_gb(),
            )
            seconds = time.perf_counter() - started
            # The PQ codes DiskANN made (bytes per vector) and the dimension it indexed (one
            # more than the data's under "mips": DiskANN turns inner product into L2).
            info["pq_bytes_per_vector"] = _bin_header(folder / "ann_pq_compressed.bin")[1]
            data_dim = dim + 1 if metric == "mips" else dim
            node_bytes = (command["max_degree"] + 1) * 4 + 4 * data_dim
            budget = command["cache_budget_ratio"] * rows * dim * 4
            cached = int(budget // (node_bytes * CACHE_EXPANSION))
            info["cached_nodes"] = cached
            info["disk_index_bytes"] = (folder / "ann_disk.index").stat().st_size
            tick = time.perf_counter()
            index = diskannpy.StaticDiskIndex(
                index_directory=str(folder),
                num_threads=threads,
                num_nodes_to_cache=cached,
                cache_mechanism=1,  # from the build's sample vectors, as knowhere by default
            )
        elif kind == "memory":
            diskannpy.build_memory_index(**graph)
            seconds = time.perf_counter() - started
            tick = time.perf_counter()
            index = diskannpy.StaticMemoryIndex(
                index_directory=str(folder),
                num_threads=threads,
                initial_search_complexity=command["build_complexity"],
            )
        else:
            raise ValueError(f"unknown index kind {kind!r}")
        self.indexes[kind] = index
        return {"seconds": seconds, "load_seconds": time.perf_counter() - tick, "info": info}

    def drop(self, command: dict) -> dict:
        self.indexes.clear()
        self.queries.clear()
        self.bases.clear()
        return {}

    def search(self, command: dict) -> dict:
        index = self.indexes[command["index"]]
        path = command["queries"]
        if path not in self.queries:
            self.queries[path] = np.ascontiguousarray(np.load(path), dtype=np.float32)
        queries = self.queries[path][: command["count"]]
        k, complexity, threads = command["k"], command["complexity"], command["threads"]
        disk = command["index"] == "disk"
        beam = {"beam_width": command["beam_width"]} if disk else {}

        def once() -> np.ndarray:
            if command["one_by_one"]:
                found = [index.search(q, k, complexity, **beam).identifiers for q in queries]
                return np.stack(found)
            return index.batch_search(queries, k, complexity, threads, **beam).identifiers

        started = time.perf_counter()
        ids = once()
        for _ in range(command["repeats"] - 1):
            once()
        seconds = time.perf_counter() - started
        if command.get("ids"):
            np.save(command["ids"], ids.astype(np.int64))
        return {"seconds": seconds}


def main() -> None:
    # Replies go to the real stdout; DiskANN's C++ code prints to fd 1, so fd 1 becomes stderr.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    import diskannpy

    version = getattr(diskannpy, "__version__", None)
    if version is None:
        from importlib.metadata import version as package_version

        version = package_version("diskannpy")
    reply({"ok": True, "diskannpy": version, "numpy": np.__version__, "python": sys.version})
    worker = Worker()
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        if command["cmd"] == "quit":
            reply({"ok": True})
            break
        try:
            handlers = {"build": worker.build, "search": worker.search, "drop": worker.drop}
            handler = handlers[command["cmd"]]
            reply({"ok": True, **handler(command)})
        except Exception as error:  # reported to the bench, which decides
            reply({"ok": False, "error": f"{type(error).__name__}: {error}"})


if __name__ == "__main__":
    main()
