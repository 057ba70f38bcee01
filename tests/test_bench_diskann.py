"""DiskANN in the index benchmark (``bench/bench_index.py``): the worker in its own venv on a
tiny dataset, and the skip, with its reason, when that venv cannot be made."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import bench_index
from bench.bench_index import (
    DISKANN_KINDS,
    DISKANN_VENV,
    DiskANNContender,
    K,
    clustered,
    diskann_python,
    exact_top_k,
    open_diskann,
    recall_at_k,
)


@pytest.fixture(scope="module")
def diskann_worker():
    """The bench's own worker, in the venv the bench makes (with uv, ~30 s the first time)."""
    with open_diskann(DISKANN_VENV) as (worker, how):
        if worker is None:
            pytest.skip(f"no DiskANN worker: {how}")
        yield worker


@pytest.mark.slow
def test_worker_builds_and_searches_disk_and_memory_index(diskann_worker) -> None:
    rows, dim = 2_000, 32
    base, queries, _ = clustered(rows, 100, dim=dim)
    truth = exact_top_k(base, queries)
    assert diskann_worker.hello["diskannpy"] == bench_index.DISKANNPY.split("==")[1]
    contender = DiskANNContender(diskann_worker, base, queries, DISKANN_KINDS)
    try:
        # The PQ budget is 0.125 of the raw vectors: 0.125 x 32 x 4 bytes = 16 per vector.
        assert contender.info["disk"]["pq_bytes_per_vector"] == 16
        assert 0 < contender.info["disk"]["cached_nodes"] < rows // 3
        for kind in DISKANN_KINDS:
            for threads, one_by_one, count in ((2, False, 100), (1, False, 100), (1, True, 40)):
                ids, seconds = contender.search(kind, 32, threads, one_by_one, count)
                assert ids.shape == (count, K)
                assert ids.min() >= 0 and ids.max() < rows
                assert all(len(set(row)) == K for row in ids.tolist())
                assert recall_at_k(ids, truth[:count]) >= 0.95, (kind, threads, one_by_one)
                assert seconds > 0
            # Timing repeats bring no ids back, only the worker's seconds for all of them.
            ids, seconds = contender.search(kind, 16, 2, False, 100, repeats=3)
            assert ids is None and seconds > 0
    finally:
        contender.close()


def test_no_uv_means_no_diskann_rows_with_the_reason(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(bench_index, "uv_command", lambda: None)
    with open_diskann(tmp_path / "venv") as (worker, how):
        assert worker is None
        assert how.startswith("no uv") and str(tmp_path / "venv") in how


def test_a_failing_uv_step_is_the_reason(tmp_path, monkeypatch) -> None:
    """A uv that makes the venv but cannot install, as without a network."""
    uv = tmp_path / "uv"
    uv.write_text(
        '#!/bin/sh\nif [ "$1" = venv ]; then mkdir -p "$4/bin"; exit 0; fi\n'
        "echo 'error: Failed to fetch: https://pypi.org/simple/diskannpy/' >&2\nexit 2\n"
    )
    uv.chmod(0o755)
    monkeypatch.setattr(bench_index, "uv_command", lambda: [str(uv)])
    python, how = diskann_python(tmp_path / "venv")
    assert python is None
    assert (
        how
        == "`uv pip install` failed (2): error: Failed to fetch: https://pypi.org/simple/diskannpy/"
    )


def test_bench_runs_without_diskann_and_says_why(tmp_path, monkeypatch, capsys) -> None:
    """The whole bench, tiny, with no venv to be had: FAISS and Milvus rows, no DiskANN rows,
    and the reason in the output and in the JSON."""
    monkeypatch.setattr(bench_index, "uv_command", lambda: None)
    monkeypatch.setattr(bench_index, "MIN_BLOCK_SECONDS", 0.01)
    out = tmp_path / "index.json"
    argv = ["bench_index.py", "--rows", "2000", "--queries", "20", "--milvus-queries", "5"]
    argv += ["--rounds", "1", "--ef", "32", "--no-grocery", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, "--diskann-venv", str(tmp_path / "venv")])
    bench_index.main()
    printed = capsys.readouterr().out
    assert "DiskANN rows skipped: no uv" in printed
    result = json.loads(Path(out).read_text())["clustered"]
    assert result["diskann"]["skipped"].startswith("no uv")
    contenders = {row["contender"] for row in result["table"]}
    assert {"FAISS HNSW", "Milvus Lite HNSW"} <= contenders
    assert not any(name.startswith("DiskANN") for name in contenders)
    assert not any(key.startswith("comparison_diskann") for key in result)
    assert np.isfinite([row["qps"] for row in result["table"]]).all()
