"""``vitrine demo``: the whole nightly flow on embedded defaults, ending with a live search page.

1. start the search service (a ``vitrine serve`` child process on 127.0.0.1) with nothing to
   serve yet;
2. run one night (:func:`components.nightly.run_night`) on a generated demo catalogue (or the
   one given): validate → fine-tune on the CPU → evaluate → gate → index into Milvus Lite →
   roll the service onto the new model and collection → smoke query;
3. print what each step did and how long it took, then keep serving until Ctrl-C.

Nothing here is demo-only logic: the night is the same step functions the Airflow DAG runs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Small enough for a 2-core CPU in minutes, big enough to beat the pretrained backbone.
DEMO_TRAIN = {
    "train.train_image_size": 160,
    "train.classes_per_batch": 8,
    "train.images_per_class": 4,
}


class DemoError(RuntimeError):
    """The demo could not start its service or finish its night."""


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the service gets SIGTERM if the demo dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def search_service(
    uri: str, host: str, port: int, log_path: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen]:
    """A ``vitrine serve`` child process, up (``/healthz``) when the block starts, stopped
    when it ends."""
    import httpx

    if not _port_free(host, port):
        raise DemoError(f"port {port} on {host} is in use: pass --port with a free one")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "components.cli", "serve", "--uri", uri]
    command += ["--host", host, "--port", str(port)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-1500:]
                raise DemoError(f"the search service exited at start ({log_path}):\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://{host}:{port}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise DemoError(f"the search service did not start in 120 s: see {log_path}")
            time.sleep(0.5)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def demo_overrides(args: Any, service_url: str) -> dict[str, Any]:
    """The night's parameters: params.yaml, then these (everything under ``--out``)."""
    out = Path(args.out)
    overrides: dict[str, Any] = {
        "nightly.work_dir": str(out / "nights"),
        "nightly.registry": str(out / "registry"),
        "nightly.service_url": service_url,
        "nightly.skip_unchanged": False,  # a demo always shows the whole night
        "nightly.demo_products": args.products,
        "index.uri": args.milvus_uri,
        "train.loss": args.loss,
        "train.epochs": args.epochs,
        "train.device": args.device,
        "evaluate.device": args.device,
        "index.device": args.device,
        **DEMO_TRAIN,
    }
    if args.catalog:
        overrides["nightly.catalogue"] = str(args.catalog)
    return overrides


def run_demo(args: Any, print_step) -> dict[str, Any]:
    """Start the service, run one night against it, then serve until interrupted (or return
    at once with ``--no-serve``). Returns the night's results."""
    from components.nightly import load_plan, run_night
    from model.jsonfile import write_json

    params = args.params if args.params and Path(args.params).is_file() else None
    service_url = f"http://{args.host}:{args.port}"
    given = os.environ.get("VITRINE_ADMIN_TOKEN")
    token = given or secrets.token_urlsafe(24)
    os.environ["VITRINE_ADMIN_TOKEN"] = token  # the service and the rollout step read it
    out = Path(args.out)
    env = os.environ | {"VITRINE_UPLOAD_DIR": str(out / "uploads")}
    plan = load_plan(params, demo_overrides(args, service_url))
    started = time.perf_counter()
    with search_service(args.milvus_uri, args.host, args.port, out / "service.log", env) as proc:
        print(f"[ service] {service_url} up (log: {out / 'service.log'})", flush=True)
        results = run_night(plan, progress=not args.quiet, on_step=print_step)
        results["total_seconds"] = time.perf_counter() - started
        finish = results["finish"]
        print(
            f"night {finish['outcome']} in {results['total_seconds']:.0f} s; "
            f"run folder {results['run_dir']}",
            flush=True,
        )
        write_json(out / "metrics.json", results)
        print(f"every step's result: {out / 'metrics.json'}")
        if finish["outcome"] == "rejected":
            print("the gate refused the model: " + "; ".join(finish["reasons"]))
        if args.no_serve:
            print(f"the service is stopped (--no-serve); `vitrine serve --uri {args.milvus_uri}` "
                  "serves the collection again", flush=True)  # fmt: skip
            return results
        print(f"search page: {service_url}/  (API docs: {service_url}/docs)", flush=True)
        if not given:  # made up here: the admin calls of the README need it
            print(f"admin token (for `vitrine rollout`, /v1/admin/...): export "
                  f"VITRINE_ADMIN_TOKEN={token}", flush=True)  # fmt: skip
        print("serving until Ctrl-C", flush=True)
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
        if proc.returncode not in (None, 0, -signal.SIGTERM):
            raise DemoError(f"the search service stopped ({proc.returncode}): see service.log")
    return results
