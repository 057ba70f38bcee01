"""Milvus Lite in a child process (serving/lite_process.py), as the search service runs it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from serving.lite_process import LiteProcess, LiteProcessError
from serving.store import (
    COLLECTION_PREFIX,
    IndexConfig,
    StoreUnavailable,
    VectorStore,
    choose_index,
)
from tests.test_store import DIM, _clustered, _locked, _rows

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock, signals")
NAME = f"{COLLECTION_PREFIX}20240601T000000000000_child"
REPO = Path(__file__).resolve().parents[1]


def _build(folder: Path, lite_process: bool, vectors: np.ndarray) -> VectorStore:
    store = VectorStore(str(folder), lite_process=lite_process)
    store.create_collection(NAME, DIM)
    store.insert(NAME, _rows(vectors))
    store.build_index(NAME, IndexConfig())
    return store


def _spec():
    return choose_index(True, IndexConfig())


def lite_pids(folder: Path | None = None) -> set[int]:
    """Running ``python -m serving.lite_process`` processes (serving a database under
    ``folder``, if given)."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes()
        except OSError:  # it exited meanwhile
            continue
        if b"serving.lite_process" in command.split(b"\0") and (
            folder is None or str(folder).encode() in command
        ):
            found.add(int(cmdline.parent.name))
    return found


def _wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid not in lite_pids():
            return True
        time.sleep(0.1)
    return False


def test_a_child_process_serves_what_threads_would(tmp_path: Path) -> None:
    """Same data, same searches, same answers; the child holds the lock and lets it go."""
    vectors = _clustered(300, seed=5)
    threads = _build(tmp_path / "threads", False, vectors)
    before = lite_pids()
    child = _build(tmp_path / "child", True, vectors)
    try:
        started = lite_pids() - before
        assert len(started) == 1, "one child process per open database"
        spec = _spec()
        expected = threads.search(NAME, vectors[:20], 10, spec, 'category == "mugs"')
        got = child.search(NAME, vectors[:20], 10, spec, 'category == "mugs"')
        assert [[h["image_id"] for h in hits] for hits in got] == [
            [h["image_id"] for h in hits] for hits in expected
        ]
        assert got[0][0]["colour"] in ("red", "green", "blue")  # dynamic fields come back
        assert child.count(NAME) == 300 and child.ping(NAME)
        assert _locked(tmp_path / "child" / f"{NAME}.db")
    finally:
        child.close()
        threads.close()
    assert _wait_gone(started.pop())
    assert not _locked(tmp_path / "child" / f"{NAME}.db")
    reopened = VectorStore(str(tmp_path / "child"))  # on threads, after the child let go
    reopened.load(NAME)
    assert reopened.count(NAME) == 300
    reopened.close()


def test_a_killed_child_is_unavailable_once_then_replaced(tmp_path: Path) -> None:
    """The service answers 503 for the call that finds the child dead, then serves again."""
    store = _build(tmp_path / "milvus", True, _clustered(100, seed=6))
    try:
        (pid,) = lite_pids(tmp_path)
        os.kill(pid, signal.SIGKILL)
        assert _wait_gone(pid)
        with pytest.raises(StoreUnavailable):
            store.count(NAME)
        # A new child, and the collection loaded in it again (Lite leaves that to the client).
        assert store.count(NAME) == 100
        assert store.search(NAME, _clustered(100, seed=6)[:1], 1, _spec())[0][0]["image_id"] == (
            "img00000"
        )
        assert lite_pids(tmp_path)
    finally:
        store.close()


@contextlib.contextmanager
def _hung_child(tmp_path: Path, seed: int) -> Iterator[tuple[VectorStore, np.ndarray, int]]:
    """A loaded collection whose Lite child is stopped (SIGSTOP: alive, not answering), with a
    2 s timeout: the store, its vectors and the hung child's pid. Resumed and closed after."""
    vectors = _clustered(100, seed=seed)
    store = _build(tmp_path / "milvus", True, vectors)
    store.load(NAME)
    store.timeout = 2.0
    (pid,) = lite_pids(tmp_path)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield store, vectors, pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        store.close()


def test_a_hung_child_is_unavailable_once_then_replaced_with_the_collection_loaded(
    tmp_path: Path,
) -> None:
    """A child that stops answering (stopped, not dead) is given up after the timeout; the
    next one must load the collection again, or every search after it fails (the collection
    is "released") while a ping says all is well."""
    with _hung_child(tmp_path, seed=7) as (store, vectors, pid):
        with pytest.raises(StoreUnavailable):
            store.search(NAME, vectors[:1], 1, _spec())
        assert _wait_gone(pid)  # killed, not left frozen beside its successor
        assert store.search(NAME, vectors[:1], 1, _spec())[0][0]["image_id"] == "img00000"
        assert store.ping(NAME)
        store.forget(NAME)  # a child that starts without the collection loaded: not ready
        store._call(NAME, "release_collection", NAME)
        assert not store.ping(NAME)


def test_concurrent_searches_on_a_hung_child_fail_once_each_and_start_one_child(
    tmp_path: Path,
) -> None:
    """Several searches wait on a hung child together: each fails once at most, and none of
    their failures stops the child that replaced it (they did: a burst of 503s, three
    children for one hang)."""
    with _hung_child(tmp_path, seed=8) as (store, vectors, pid):
        failures = [0] * 4
        seen: set[int] = set()

        def client(n: int) -> None:
            for _ in range(15):
                try:
                    store.search(NAME, vectors[n : n + 1], 1, _spec())
                except StoreUnavailable:
                    failures[n] += 1
                seen.update(lite_pids(tmp_path))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert max(failures) <= 1, failures
        seen.discard(pid)  # the hung one, until it is killed
        assert len(seen) == 1, f"children started for one hang: {sorted(seen)}"
        assert store.search(NAME, vectors[:1], 1, _spec())[0][0]["image_id"] == "img00000"


def test_the_child_dies_with_its_parent_and_unlocks_the_file(tmp_path: Path) -> None:
    """A SIGKILLed service must not leave its database locked behind it."""
    _build(tmp_path / "milvus", False, _clustered(50, seed=7)).close()
    database = tmp_path / "milvus" / f"{NAME}.db"
    script = textwrap.dedent(
        f"""
        import os, sys
        from serving.lite_process import LiteProcess
        child = LiteProcess({str(database)!r})
        print(child.pid, flush=True)
        os.kill(os.getpid(), 9)
        """
    )
    parent = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    pid = int(parent.stdout.split()[0])
    assert _wait_gone(pid), "the child outlived its parent"
    assert not _locked(database)


def test_a_database_held_elsewhere_is_unavailable_with_the_reason(tmp_path: Path) -> None:
    _build(tmp_path / "milvus", False, _clustered(50, seed=8)).close()
    database = tmp_path / "milvus" / f"{NAME}.db"
    with (database / "LOCK").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another process's Lite would
        with pytest.raises(LiteProcessError, match=r"could not open .*: \w+"):
            LiteProcess(database)
        store = VectorStore(str(tmp_path / "milvus"), lite_process=True)
        with pytest.raises(StoreUnavailable, match=r"open in another process.*vitrine rollout"):
            store.count(NAME)  # said before Lite is tried: no traceback, and what to do
        store.close()
