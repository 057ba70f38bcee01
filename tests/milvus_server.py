"""A real Milvus standalone server for tests: the binary bundled in the ``milvus`` PyPI package
(2.3.5), on free ports, with its own data folder. It can be stopped and started again on the
same folder and port, which is how the tests simulate an outage.

Loopback only. Milvus 2.3.5 has no setting that binds its gRPC and HTTP listeners to one
address: each listens on ``":<port>"`` (every interface); the ``<component>.ip`` keys only
choose the address a component advertises to the others, and ``milvus-server`` offers nothing
more. So where this process may create and join network namespaces (root), the server runs in
a private one, where only its own ``lo`` exists, and the helper forwards ``127.0.0.1:<port>``
on the host to the proxy port in there: no port of it is reachable from another host.
Elsewhere it runs in the host's namespace (``isolated`` is False) and its ports are open on
every interface while it runs. Either way the components advertise 127.0.0.1 to each other,
and the embedded etcd listens on 127.0.0.1 only, on free ports (its defaults, 2379 and 2380,
would collide with any other Milvus or etcd on the machine).

Usage::

    with MilvusTestServer(tmp_path / "milvus") as server:
        client = MilvusClient(server.uri)
        server.stop(kill=True)  # an outage
        server.start()  # same data, same port
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

LOOPBACK = "127.0.0.1"
# The ports the package's config template has, by its names for them.
PORT_KEYS = (
    "proxy_port",
    "proxy_internal_port",
    "root_coord_port",
    "query_coord_port",
    "query_node_port",
    "index_coord_port",
    "index_node_port",
    "data_coord_port",
    "data_node_port",
    "etcd_port",
)
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")
CLONE_NEWNET = 0x40000000
# A fresh network namespace has its loopback down.
_LO_UP = "(ip link set lo up || ifconfig lo up) >/dev/null 2>&1 && "


class MilvusServerError(RuntimeError):
    """The server could not be installed, started or reached."""


def milvus_missing() -> str | None:
    """Why no Milvus server can be started here, or None when one may."""
    try:
        import milvus  # noqa: F401
    except ImportError:
        return "the `milvus` package (Milvus standalone server) is not installed"
    return None


def _binaries() -> Path:
    """The package's server binary and libraries, decompressed once per machine (11 s)."""
    import milvus

    cache = Path(
        os.environ.get("VITRINE_MILVUS_BIN_CACHE")
        or Path(tempfile.gettempdir()) / f"vitrine-milvus-{milvus.__version__}-{os.getuid()}"
    )
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test processes must not write the same files
        milvus._initialize_data_files(str(cache))  # skips files whose checksum matches
    binary = cache / "bin" / "milvus"
    if not os.access(binary, os.X_OK):
        raise MilvusServerError(f"no executable Milvus server at {binary}")
    return binary


def _free_ports(count: int) -> list[int]:
    """Distinct ports free on every interface now (Milvus binds the wildcard address)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def namespaces_work() -> bool:
    """Whether a child may get its own network namespace that this process can then join
    (``setns`` needs CAP_SYS_ADMIN on both sides: root, in practice)."""
    if os.environ.get("VITRINE_MILVUS_NO_NETNS") or os.geteuid() != 0:
        return False
    if not shutil.which("unshare"):
        return False
    try:
        probe = ["unshare", "--net", "sh", "-c", _LO_UP + "true"]
        return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _copy(src: socket.socket, dst: socket.socket) -> None:
    """Bytes from ``src`` to ``dst`` until ``src`` ends; then pass the half-close on."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:  # a reset, or close() cut it: end the other direction too
        _close(src)
        _close(dst)


def _group_stopped(pgid: int) -> bool:
    """Whether every thread of every process in process group ``pgid`` is stopped."""
    found = False
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            # The command name, in brackets, may hold spaces: the fields follow its last ")".
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            found = True
            for task in (proc / "task").iterdir():
                state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state not in ("T", "t", "Z", "X"):
                    return False
        except (OSError, IndexError, ValueError):
            continue  # ended while being read
    return found


class _Forwarder:
    """``127.0.0.1:<port>`` on the host to the same port inside the server's namespace.

    While the server is stopped nothing listens on the host port, so clients get connection
    refused, as from a server that is down; stopping also cuts every forwarded connection, as
    a server that dies does.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._netns: int | None = None
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def attach(self, pid: int) -> None:
        """Target the network namespace of process ``pid``."""
        self._netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)

    def connect_inside(self, port: int, timeout: float | None = None) -> socket.socket:
        """A TCP connection to ``127.0.0.1:port`` in the server's namespace. A socket stays
        in the namespace it was made in, so a short-lived thread joins that namespace
        (``setns`` applies to the calling thread only), makes the socket and ends."""
        made: list[socket.socket | OSError] = []

        def make() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(self._netns, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns: {os.strerror(code)}")
                made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            except OSError as err:
                made.append(err)

        thread = threading.Thread(target=make, name="milvus-netns")
        thread.start()
        thread.join()
        if isinstance(made[0], OSError):
            raise made[0]
        sock = made[0]
        sock.settimeout(timeout)
        try:
            sock.connect((LOOPBACK, port))
        except OSError:
            sock.close()
            raise
        return sock

    def listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port))
        listener.listen(64)
        self._listener = listener
        self._thread = threading.Thread(
            target=self._accept, args=(listener,), name="milvus-forward", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _close(listener)  # shutdown wakes the accept() below
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            _close(conn)
        if self._netns is not None:
            os.close(self._netns)
            self._netns = None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = self.connect_inside(self.port)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(
                target=self._serve, args=(client, upstream), name="milvus-pump", daemon=True
            ).start()

    def _serve(self, client: socket.socket, upstream: socket.socket) -> None:
        back = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
        back.start()
        _copy(client, upstream)
        back.join()
        with self._lock:
            self._conns.discard(client)
            self._conns.discard(upstream)
        _close(client)
        _close(upstream)


class MilvusTestServer:
    """A Milvus standalone server with its configuration, logs and data in ``data_dir``.

    Args:
        data_dir: Created; kept across :meth:`stop` and :meth:`start`.
        isolate: Run in a private network namespace (see the module docstring); None: where
            this process may.
        start_timeout: Seconds to wait for the server to answer.
    """

    def __init__(
        self, data_dir: str | Path, isolate: bool | None = None, start_timeout: float = 90.0
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.start_timeout = start_timeout
        self.isolated = namespaces_work() if isolate is None else isolate
        names = (*PORT_KEYS, "etcd_peer_port", "metrics_port")
        self.ports = dict(zip(names, _free_ports(len(names)), strict=True))
        self.port = self.ports["proxy_port"]
        self.proc: subprocess.Popen | None = None
        self.started_s: float | None = None  # how long the last start took
        self._binary: Path | None = None
        self._forwarder = _Forwarder(self.port) if self.isolated else None

    @property
    def uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> MilvusTestServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- configuration -------------------------------------------------------------------

    def _configure(self) -> None:
        """``configs/milvus.yaml`` from the package's template, and the etcd configuration."""
        from milvus import MilvusServerConfig

        config = MilvusServerConfig(
            data_dir=str(self.data_dir), **{k: self.ports[k] for k in PORT_KEYS}
        )
        for component in COMPONENTS:
            config.set(f"{component}.ip", LOOPBACK)  # the advertised address, not the bound one
        config.resolve()  # checks each port binds, then writes configs/milvus.yaml
        etcd, peer = self.ports["etcd_port"], self.ports["etcd_peer_port"]
        # Milvus configures its embedded etcd from this file (ETCD_CONFIG_PATH); without one
        # etcd takes localhost:2379 and :2380 whatever etcd_port says.
        (self.data_dir / "configs" / "etcd.yaml").write_text(
            "name: default\n"
            f"listen-client-urls: http://{LOOPBACK}:{etcd}\n"
            f"advertise-client-urls: http://{LOOPBACK}:{etcd}\n"
            f"listen-peer-urls: http://{LOOPBACK}:{peer}\n"
            f"initial-advertise-peer-urls: http://{LOOPBACK}:{peer}\n"
            f"initial-cluster: default=http://{LOOPBACK}:{peer}\n"
        )

    def _command(self) -> list[str]:
        command = [str(self._binary), "run", "standalone"]
        if self.isolated:
            # unshare and sh exec in turn: Milvus keeps the pid Popen gives.
            command = ["unshare", "--net", "sh", "-c", _LO_UP + 'exec "$@"', "milvus", *command]
        if shutil.which("setpriv"):
            # Killed with this process (the thread that started it, precisely), so a test run
            # that is killed leaves no server behind.
            command = ["setpriv", "--pdeathsig", "KILL", *command]
        return command

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> float:
        """Start (again) and wait until it answers; return the seconds that took."""
        if self.running:
            return 0.0
        started = time.perf_counter()
        if self._binary is None:
            self._binary = _binaries()
        if not (self.data_dir / "configs" / "milvus.yaml").is_file():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._configure()
        library_path = [str(self._binary.parent), os.environ.get("LD_LIBRARY_PATH", "")]
        env = {
            **os.environ,
            "DEPLOY_MODE": "STANDALONE",
            "METRICS_PORT": str(self.ports["metrics_port"]),
            "MILVUS_RUN_DIR": str(self.data_dir / "run"),
            "MILVUSCONF": str(self.data_dir / "configs"),
            "ETCD_CONFIG_PATH": str(self.data_dir / "configs" / "etcd.yaml"),
            "LD_LIBRARY_PATH": ":".join(p for p in library_path if p),
        }
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (
            (logs / "milvus-stdout.log").open("ab") as out,
            (logs / "milvus-stderr.log").open("ab") as err,
        ):
            self.proc = subprocess.Popen(
                self._command(),
                cwd=self.data_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group: stop() signals only it
            )
        try:
            if self._forwarder is not None:
                self._wait_for_namespace()
                self._forwarder.attach(self.proc.pid)
            self._wait_ready(started + self.start_timeout)
            if self._forwarder is not None:
                self._forwarder.listen()
            if not self._grpc_answers(time.perf_counter() + 30):
                raise MilvusServerError(f"Milvus does not answer gRPC on {self.uri}")
        except BaseException:
            self.stop(kill=True)
            raise
        self.started_s = time.perf_counter() - started
        return self.started_s

    def _wait_for_namespace(self) -> None:
        """Until the child is in its own network namespace (unshare has run)."""
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MilvusServerError(f"Milvus exited at once ({self.proc.returncode})")
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{self.proc.pid}/ns/net") != own:
                    return
            time.sleep(0.01)
        raise MilvusServerError("the server did not enter its network namespace")

    def _healthz(self) -> bool:
        """Milvus' own readiness check: ``GET /healthz`` on the metrics port says OK."""
        port = self.ports["metrics_port"]
        try:
            if self._forwarder is None:
                url = f"http://{LOOPBACK}:{port}/healthz"
                with urllib.request.urlopen(url, timeout=2) as response:
                    return b"OK" in response.read()
            with contextlib.closing(self._forwarder.connect_inside(port, timeout=2)) as sock:
                sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
                return answer.startswith(b"HTTP/1.") and b" 200 " in answer and b"OK" in answer
        except OSError:
            return False

    def _wait_ready(self, deadline: float) -> None:
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise MilvusServerError(
                    f"Milvus exited with {self.proc.returncode} while starting:\n" + self.log_tail()
                )
            if self._healthz():
                return
            time.sleep(0.2)
        raise MilvusServerError(
            f"Milvus did not answer within {self.start_timeout:.0f} s:\n" + self.log_tail()
        )

    def _grpc_answers(self, deadline: float) -> bool:
        """A client lists collections (the proxy is up, not just the health endpoint)."""
        from pymilvus import MilvusClient

        while time.perf_counter() < deadline:
            client = None
            try:
                client = MilvusClient(self.uri, timeout=5)
                client.list_collections(timeout=5)
                return True
            except Exception:
                time.sleep(0.2)
            finally:
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.close()
        return False

    def stop(self, kill: bool = False, grace: float = 5.0) -> float:
        """Stop the server: SIGKILL with ``kill`` (a crash), else SIGTERM and SIGKILL after
        ``grace`` s (Milvus 2.3 sometimes hangs in its own shutdown). The data folder and the
        ports stay for :meth:`start`. Returns the seconds until the port is closed."""
        started = time.perf_counter()
        if self._forwarder is not None:
            self._forwarder.close()
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
            proc.wait(timeout=30)
            # The one file Milvus writes outside its data folder (a fixed path in the binary).
            Path(f"/tmp/milvus/server_id_{proc.pid}").unlink(missing_ok=True)
        self._wait_port_closed()
        return time.perf_counter() - started

    def pause(self, timeout: float = 10.0) -> None:
        """Freeze the server (SIGSTOP): connections are accepted, nothing answers.

        ``kill`` returns before the signal has stopped every thread (a thread running on
        another CPU stops at its next trip through the kernel), and in that moment a request
        can still be answered; so this returns only once every thread of the group is stopped.
        """
        os.killpg(self.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while not _group_stopped(self.proc.pid):
            if time.monotonic() > deadline:
                raise MilvusServerError(f"process group {self.proc.pid} did not stop")
            time.sleep(0.01)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def _wait_port_closed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                if sock.connect_ex((LOOPBACK, self.port)) == errno.ECONNREFUSED:
                    return
            time.sleep(0.05)
        raise MilvusServerError(f"port {self.port} is still open after {timeout:.0f} s")

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's output, for failure messages."""
        found = [f"(logs in {self.data_dir / 'logs'})"]
        for name in ("milvus-stderr.log", "milvus-stdout.log"):
            path = self.data_dir / "logs" / name
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                found.append(f"--- {name}\n" + "\n".join(line[:400] for line in tail))
        return "\n".join(found)
