"""Milvus Lite in a child process of its own, for the search service.

``MilvusClient("x.db")`` runs Milvus Lite 3 inside the calling process: a gRPC server on
Python threads, whose searches (a few milliseconds of Python per query) hold the same
interpreter lock as the service's event loop and its forward passes. Under concurrent load the
service then uses one core whatever the machine has. :class:`LiteProcess` runs the same
server on the same database in a child process instead (Milvus Lite's own
``start_server_in_thread``, on a free loopback port) and hands back its ``http://`` URI, so
searches run beside the service, not inside it. Same data, same file lock, same results.

The child lives as long as its stdin: it stops (and releases the file lock) when the parent
closes the pipe or dies, so a killed service never leaves a database locked behind it.

    python -m serving.lite_process PATH.db    # what LiteProcess starts
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

START_TIMEOUT_S = 60.0


class LiteProcessError(RuntimeError):
    """The child could not open the database (locked by another process, unreadable...)."""


class LiteProcess:
    """One database served by Milvus Lite in a child process.

    Args:
        path: The database (``<folder>/<collection>.db``), created if missing.
        timeout: Seconds the child may take to start listening.

    Raises:
        LiteProcessError: The child exited or stayed silent instead of listening; the
            message carries what it printed (for a locked file: the lock error).

    Attributes:
        uri: ``http://127.0.0.1:<port>`` for ``MilvusClient``.
        pid: The child's process id.
    """

    def __init__(self, path: str | Path, timeout: float = START_TIMEOUT_S) -> None:
        self.path = os.path.abspath(path)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "serving.lite_process", self.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,  # the child flushes its one line, the port
            stderr=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[1],  # so that ``serving`` is importable
        )
        self.pid = self._process.pid
        port = self._read_port(timeout)
        self.uri = f"http://127.0.0.1:{port}"
        # Keep draining stderr so that a chatty child never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True, name="lite-stderr").start()

    def _read_port(self, timeout: float) -> int:
        line: list[bytes] = []
        reader = threading.Thread(
            target=lambda: line.append(self._process.stdout.readline()), daemon=True
        )
        reader.start()
        reader.join(timeout)
        if line and line[0].strip():
            try:
                return int(json.loads(line[0])["port"])
            except (ValueError, KeyError) as err:
                self.stop()
                raise LiteProcessError(f"Milvus Lite child said {line[0]!r}") from err
        self.stop()
        detail = self._stderr_tail()
        raise LiteProcessError(
            f"Milvus Lite could not open {self.path}"
            + (f": {detail}" if detail else f" within {timeout:.0f} s")
        )

    def _stderr_tail(self) -> str:
        try:
            text = self._process.stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        lines = [line for line in text.strip().splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def _drain(self) -> None:
        try:
            for _ in self._process.stderr:
                pass
        except (OSError, ValueError):
            pass

    def alive(self) -> bool:
        """Whether the child is still running."""
        return self._process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child (it closes the database and releases the lock). Idempotent."""
        if self._process.stdin and not self._process.stdin.closed:
            with contextlib.suppress(OSError):
                self._process.stdin.close()  # EOF: the child stops its server and exits
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def main(argv: list[str] | None = None) -> int:
    """The child: serve one database on a free loopback port until stdin closes."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m serving.lite_process PATH.db", file=sys.stderr)
        return 2
    from milvus_lite.adapter.grpc.server import start_server_in_thread

    from serving import lite_search

    lite_search.install()
    try:
        server, db, port = start_server_in_thread(data_dir=args[0], host="127.0.0.1", port=0)
    except Exception as err:  # the parent reports the last line of stderr
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"port": port}), flush=True)
    try:
        sys.stdin.buffer.read()  # blocks until the parent closes the pipe or dies
    finally:
        server.stop(grace=2).wait(5)  # in-flight calls finish, then the data is closed
        db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
