"""The search service under 1, 4 and 16 concurrent clients against the bare forward + search.

Setup, in a temporary folder: a demo catalogue (rendered products, validated), a model package
of the default pretrained backbone with no training, and a Milvus Lite collection built from
them by `build_index`. The query photos are fresh shots of the catalogue's products (not in the
index), one JPEG per request, cycled in order.

The bare path runs in this process: `Embedder.embed_images([image])` on the already decoded
photo, then the service's own search function (`serving.search.products_near`: Milvus hits,
the best per product, fetched deeper only if too few products came back), one query at a
time; and once more with the forward batched (as many images as the largest client count) to
show the ceiling that micro-batching can approach. (The service sends its first search
through `serving.search_batching.SearchBatcher`, which at one client is the same single-query
call, and under load groups the searches that arrive together.)

The service is `create_app(Settings(...))` under a real uvicorn server on 127.0.0.1, in a child
process so that its event loop and the load generator here do not share a GIL (the load
generator still shares the CPU cores, as any client on the same host would). Milvus Lite lets
one process open a database, so the service gets its own copy of the built collection. Both
sides run Lite as the service does by default (`Settings.lite_process`): in a child process
serving the database on a loopback port, so its searches do not compete for the GIL of the
process that asks; the service's CPU figure includes that child. The load generator
(bench/http_client.py) is a lean keep-alive HTTP/1.1 client on asyncio streams, each request's
multipart bytes built before timing, as wrk-style load generators do (httpx spent about 1.4 ms
of its own per request, which this bench would have charged to the service): N clients, each
sending POST /v1/search/image back to back for a fixed time (or a fixed number of requests).
The service's query-embedding cache is disabled (`cache_size=0`) and every request sends a
different photo anyway, so every request is decoded and embedded.
Batch sizes come from the service's /metrics. Where the time goes is also read from Linux's
per-thread schedstat, steadier than latencies on a noisy machine: CPU ms per request that the
service's event loop, its other threads (model, decoding, search) and its Milvus Lite process
ran, and ms they waited runnable for a core (a wake-up's delay included); for the bare path,
its one thread's.

Bare and service phases alternate, in reverse order every other round (ABBA), so a drift in
the machine's load weighs on every contender alike, and the per-round numbers show the noise.
Default: 5 s per phase x 3 rounds, 15 s per contender. The setup runs in a child process of
its own, so nothing it leaves behind (threads, clients) runs beside the timed code.

Torch threads: 1 by default, on both sides (`Settings.threads` for the service, whose default
on the CPU is 1 too). On the 2-core target the second core is then free for what runs beside
the forward (the event loop, decoding, the Milvus Lite process, the load generator), and two
OpenMP threads on a shared 2-core machine stall on each other whenever one is descheduled;
the service then runs two model threads (`Settings.embed_workers`: cores / torch threads).
`--threads 2` measures the other choice (one thread per core, one model thread): its OpenMP
threads spin between parallel regions and leave less CPU to the rest under load. Both
sides embed with the same runtime (TorchScript unless `--eager`) and search the same kind of
Lite (a child process unless `--lite-threads`). Like the `vitrine` script, it runs with the
tuned allocator settings (components/runtime.py). Goals: service p50 at 1 client <= 1.10x the
bare p50; at 16 clients >= 2x the one-client throughput.

    python bench/bench_service.py [--seconds 5] [--rounds 3] [--clients 1,4,16] [--json PATH]
                                  [--threads 1] [--embed-workers N] [--eager] [--lite-threads]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LATENCY_GOAL = 1.10
# How the service's CPU time is grouped (Service.thread_clocks).
THREAD_GROUPS = ("event loop", "service threads", "Milvus Lite")
THROUGHPUT_GOAL = 2.0
SEARCH_PATH = "/v1/search/image"


# --- setup ---------------------------------------------------------------------------------


def query_photos(products: int, per_product: int, seed: int) -> list[tuple[str, bytes]]:
    """Fresh JPEG shots of the demo catalogue's products, none of them in the index."""
    from components.catalog.demo import make_products, photograph, render_product

    photos = []
    for product in make_products(products, seed):
        art = render_product(product)
        rng = np.random.default_rng([seed, 1_000_000 + int(product.product_id[1:])])
        for _ in range(per_product):
            buffer = io.BytesIO()
            photograph(art, rng).save(buffer, format="JPEG", quality=90)
            photos.append((product.product_id, buffer.getvalue()))
    # Interleave products so that consecutive requests ask for different products.
    return [photos[i] for i in np.random.default_rng(seed).permutation(len(photos))]


def prepare(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Catalogue -> validation -> untrained model package -> Milvus Lite collection (twice).

    Runs in a child process (``--setup-into``), so that none of it (Great Expectations, the
    indexer's model and Milvus client, their threads) stays in the process that times the
    bare path and generates the load.
    """
    from components.catalog.demo import generate_demo_catalog
    from components.index import IndexBuildConfig, build_index
    from components.validate import validate_catalog
    from model.package import ModelConfig, build_model, save_package

    seconds: dict[str, float] = {}
    tick = time.perf_counter()
    manifest = generate_demo_catalog(
        tmp / "catalogue", args.products, args.photos, progress=False, bad_rows=False
    )
    summary = validate_catalog(manifest, tmp / "validated", progress=False)
    seconds["catalogue"] = time.perf_counter() - tick

    tick = time.perf_counter()
    config = ModelConfig(embed_dim=None)  # pretrained backbone + pooling, no training
    package = save_package(build_model(config), config, tmp / "package")
    seconds["package"] = time.perf_counter() - tick

    tick = time.perf_counter()
    bare_uri = tmp / "milvus-bare"
    built = build_index(
        summary["outputs"]["validated"],
        package,
        IndexBuildConfig(uri=str(bare_uri), device="cpu"),
        progress=False,
    )
    # Milvus Lite: one process per database, so the service gets a copy of its own.
    service_uri = tmp / "milvus-service"
    shutil.copytree(bare_uri, service_uri)
    seconds["index"] = time.perf_counter() - tick

    tick = time.perf_counter()
    (tmp / "queries").mkdir()
    queries = []
    for number, (product, data) in enumerate(
        query_photos(args.products, args.queries_per_product, 0)
    ):
        path = tmp / "queries" / f"{number:05d}_{product}.jpg"
        path.write_bytes(data)
        queries.append(str(path))
    seconds["queries"] = time.perf_counter() - tick
    return {
        "package": str(package),
        "bare_uri": str(bare_uri),
        "service_uri": str(service_uri),
        "collection": built["collection"],
        "rows": built["rows"],
        "products": summary["valid_products"],
        "backbone": config.backbone,
        "embed_dim": built["dim"],
        "index_type": built["index"]["index_type"],
        "queries": queries,
        "seconds": seconds,
    }


# --- the bare path --------------------------------------------------------------------------


class BarePath:
    """The service's work without the service: forward + search, called directly."""

    def __init__(self, setup: dict[str, Any], args: argparse.Namespace, top_k: int) -> None:
        from serving.embedder import Embedder
        from serving.store import VectorStore, spec_from_dict
        from serving.uploads import UploadLimits, decode_upload

        self.embedder = Embedder(setup["package"], "cpu", args.threads, not args.eager)
        self.embedder.warm_up((1, 4, 16))
        # Milvus Lite where the service runs it (Settings.lite_process): a child process.
        self.store = VectorStore(setup["bare_uri"], lite_process=not args.lite_threads)
        self.collection = setup["collection"]
        self.store.load(self.collection)
        metadata = self.store.metadata(self.collection)
        self.spec = spec_from_dict(metadata["index"])
        self.top_k = top_k
        # Decoded exactly as the service decodes uploads, before any timing.
        self.images = [
            decode_upload(
                Path(path).read_bytes(), "image/jpeg", UploadLimits(), self.embedder.decode_side
            )
            for path in setup["queries"]
        ]
        self._next = itertools.count()

    def _search(self, vector: np.ndarray) -> list[dict[str, Any]]:
        from serving.search import products_near

        return products_near(self.store, self.collection, vector, self.top_k, self.spec)

    def one(self) -> tuple[float, float]:
        """One query: seconds in the forward and in the search (with grouping)."""
        image = self.images[next(self._next) % len(self.images)]
        tick = time.perf_counter()
        vector = self.embedder.embed_images([image])[0]
        middle = time.perf_counter()
        assert self._search(vector), "the bare search found nothing"
        return middle - tick, time.perf_counter() - middle

    def serial(self, seconds: float, requests: int | None) -> dict[str, Any]:
        """One query at a time, for ``seconds`` (or ``requests`` queries): latencies."""
        latencies, forward, search = [], 0.0, 0.0
        me = (os.getpid(), threading.get_native_id())
        clock = thread_clock(*me)
        started = time.perf_counter()
        while len(latencies) < requests if requests else time.perf_counter() - started < seconds:
            tick = time.perf_counter()
            f, s = self.one()
            latencies.append(time.perf_counter() - tick)
            forward, search = forward + f, search + s
        return {
            "latencies": latencies,
            "elapsed": time.perf_counter() - started,
            "errors": 0,
            "forward": forward,
            "search": search,
            "threads": {
                "this thread": [b - a for a, b in zip(clock, thread_clock(*me), strict=True)]
            },
        }

    def batched(self, batch: int, seconds: float, requests: int | None) -> dict[str, Any]:
        """Forward ``batch`` images at once, then one search each (as the service searches)."""
        done = 0
        started = time.perf_counter()
        while done < requests if requests else time.perf_counter() - started < seconds:
            images = [self.images[next(self._next) % len(self.images)] for _ in range(batch)]
            for vector in self.embedder.embed_images(images):
                self._search(vector)
            done += batch
        return {"latencies": [], "done": done, "elapsed": time.perf_counter() - started}

    def close(self) -> None:
        self.store.close()


# --- the service ----------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> None:
    """Child process: the service on 127.0.0.1:PORT until killed."""
    import uvicorn

    from serving.app import create_app
    from serving.settings import Settings

    options: dict[str, Any] = {
        "milvus_uri": args.uri,
        "device": "cpu",
        "threads": args.threads,
        "cache_size": args.cache_size,
        "torchscript": not args.eager,
        "lite_process": not args.lite_threads,
        "embed_workers": args.embed_workers,
        "max_batch": args.max_batch,
    }
    if args.max_wait_ms is not None:
        options["max_wait_ms"] = args.max_wait_ms
    app = create_app(Settings(**options))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """The service in a child process, started from this file with ``--serve``."""

    def __init__(self, uri: str, args: argparse.Namespace, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "service.log"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve",
            "--uri",
            uri,
            "--port",
            str(self.port),
            "--threads",
            str(args.threads),
            "--cache-size",
            str(args.cache_size),
            "--max-batch",
            str(args.max_batch),
        ]
        if args.max_wait_ms is not None:
            command += ["--max-wait-ms", str(args.max_wait_ms)]
        if args.embed_workers is not None:
            command += ["--embed-workers", str(args.embed_workers)]
        command += ["--eager"] * args.eager + ["--lite-threads"] * args.lite_threads
        with self.log.open("wb") as log:  # cwd: away from any .env in the repository
            self.process = subprocess.Popen(command, stdout=log, stderr=log, cwd=folder)

    def wait_ready(self, timeout: float = 300.0) -> dict[str, Any]:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the service exited ({self.process.returncode}):\n{self.tail()}"
                )
            try:
                answer = httpx.get(f"{self.url}/readyz", timeout=5)
                if answer.status_code == 200:
                    return answer.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the service was not ready after {timeout:.0f} s:\n{self.tail()}")

    def metrics(self) -> dict[tuple[str, tuple], float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server process and its children (the process
        serving Milvus Lite); a child that exited is no longer counted."""
        pids = [self.process.pid]
        for children in Path(f"/proc/{self.process.pid}/task").glob("*/children"):
            pids += [int(pid) for pid in children.read_text().split()]
        total = 0.0
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def thread_clocks(self) -> dict[str, list[float]]:
        """Run and wait seconds (see :func:`thread_clock`) of the event loop (the server
        process's main thread), its other threads (model, decoding, search), and the Milvus
        Lite process."""
        pid = self.process.pid
        clocks = {group: [0.0, 0.0] for group in THREAD_GROUPS}
        for tid in _tids(pid):
            _add(
                clocks[THREAD_GROUPS[0] if tid == pid else THREAD_GROUPS[1]], thread_clock(pid, tid)
            )
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            for child in children.read_text().split():
                for tid in _tids(int(child)):
                    _add(clocks[THREAD_GROUPS[2]], thread_clock(int(child), tid))
        return clocks

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def _load(
    url: str,
    requests_bytes: list[bytes],
    clients: int,
    seconds: float,
    requests: int | None,
    counter: itertools.count,
) -> dict[str, Any]:
    """``clients`` closed-loop clients posting photos until the time (or the count) is up."""
    from bench.http_client import Connection

    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    handler: list[float] = []  # client latency minus the route's own took_ms
    failures: list[str] = []
    started = time.perf_counter()
    issued = 0

    def more() -> bool:
        nonlocal issued
        if requests:
            issued += 1
            return issued <= requests
        return time.perf_counter() - started < seconds

    async def client() -> None:
        connection = Connection(host, int(port))
        try:
            while more():
                request = requests_bytes[next(counter) % len(requests_bytes)]
                tick = time.perf_counter()
                try:
                    answer = await connection.send(request)
                    latency = time.perf_counter() - tick
                    body = json.loads(answer.body) if answer.status == 200 else {}
                    ok = bool(body.get("results"))
                    reason = f"HTTP {answer.status}: {answer.body[:200]!r}"
                except (ConnectionError, ValueError) as err:
                    ok, reason = False, f"{type(err).__name__}: {err}"
                if ok:
                    latencies.append(latency)
                    handler.append(latency - body["took_ms"] / 1000)
                else:
                    failures.append(reason)
        finally:
            await connection.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return {
        "latencies": latencies,
        "outside_handler": float(np.sum(handler)),
        "elapsed": time.perf_counter() - started,
        "errors": len(failures),
        "first_error": failures[0] if failures else None,
    }


def load(service: Service, prepared: list[bytes], clients: int, seconds: float, requests, counter):
    """One load phase, with the service's metrics and both processes' CPU around it."""
    before, cpu_server = service.metrics(), service.cpu_seconds()
    cpu_client, clocks = _own_cpu(), service.thread_clocks()
    result = asyncio.run(_load(service.url, prepared, clients, seconds, requests, counter))
    result["cpu_client"] = _own_cpu() - cpu_client
    result["cpu_server"] = service.cpu_seconds() - cpu_server
    result["threads"] = {
        group: [after - start for after, start in zip(run_wait, clocks[group], strict=True)]
        for group, run_wait in service.thread_clocks().items()
    }
    result["metrics"] = _diff(service.metrics(), before)
    return result


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def thread_clock(pid: int, tid: int) -> tuple[float, float]:
    """Seconds a thread has run, and has waited runnable for a core (Linux schedstat: the
    wait counts a wake-up's delay too); zeros for a thread that is gone or a kernel without
    schedstat."""
    try:
        run, wait, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(run) / 1e9, int(wait) / 1e9


def _tids(pid: int) -> list[int]:
    try:
        return [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return []


def _add(total: list[float], clock: tuple[float, float]) -> None:
    total[0] += clock[0]
    total[1] += clock[1]


def _diff(after: dict, before: dict) -> dict:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


# --- summaries ------------------------------------------------------------------------------


def percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    ms = 1000 * np.asarray(latencies)
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)}


def batch_sizes(metrics: dict, name: str = "vitrine_embed_batch_size") -> dict[str, Any]:
    """Forward passes and images per pass, from the vitrine_embed_batch_size histogram (or
    Milvus calls and query vectors per call, from vitrine_search_batch_size)."""
    count = metrics.get((f"{name}_count", ()), 0.0)
    total = metrics.get((f"{name}_sum", ()), 0.0)
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (sample, labels), value in metrics.items()
        if sample == f"{name}_bucket"
    )
    histogram, below, previous = {}, 0.0, 0.0
    for le, cumulative in buckets:  # integer sizes: bucket (previous, le] holds previous+1..le
        if cumulative > below:
            low = int(previous) + 1
            if le == float("inf"):
                label = f">{int(previous)}"
            else:
                label = str(int(le)) if low == int(le) else f"{low}-{int(le)}"
            histogram[label] = int(cumulative - below)
        below, previous = cumulative, le
    return {
        "forwards": int(count),
        "images": int(total),
        "mean": total / count if count else float("nan"),
        "histogram": histogram,
    }


def stage_means(metrics: dict) -> dict[str, float]:
    """Mean milliseconds per request of each stage the service times."""
    out = {}
    for (sample, labels), value in metrics.items():
        if sample == "vitrine_stage_seconds_sum":
            stage = dict(labels)["stage"]
            count = metrics.get(("vitrine_stage_seconds_count", labels), 0.0)
            if count:
                out[stage] = 1000 * value / count
    forwards = metrics.get(("vitrine_embed_forward_seconds_count", ()), 0.0)
    if forwards:  # the model call alone, per pass (a pass may embed several requests)
        out["forward pass"] = 1000 * metrics[("vitrine_embed_forward_seconds_sum", ())] / forwards
    return out


def cache_hits(metrics: dict) -> int:
    return int(metrics.get(("vitrine_embedding_cache_total", (("result", "hit"),)), 0.0))


def summarise(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool a contender's phases: latency percentiles, requests per second, errors."""
    latencies = [x for phase in phases for x in phase["latencies"]]
    done = sum(phase.get("done", len(phase["latencies"])) for phase in phases)
    elapsed = sum(phase["elapsed"] for phase in phases)
    row: dict[str, Any] = {
        "requests": done,
        **percentiles(latencies),
        "rps": done / elapsed,
        "errors": sum(phase.get("errors", 0) for phase in phases),
        "p50_by_round": [percentiles(phase["latencies"])["p50"] for phase in phases],
        "rps_by_round": [
            phase.get("done", len(phase["latencies"])) / phase["elapsed"] for phase in phases
        ],
    }
    if phases and "threads" in phases[0]:
        row["threads_ms"] = {  # run and wait milliseconds per request
            group: [1000 * sum(p["threads"][group][i] for p in phases) / done for i in (0, 1)]
            for group in phases[0]["threads"]
        }
    if phases and "forward" in phases[0]:
        row["stages_ms"] = {
            stage: 1000 * sum(phase[stage] for phase in phases) / done
            for stage in ("forward", "search")
        }
    if phases and "metrics" in phases[0]:
        row["outside_handler_ms"] = 1000 * sum(p["outside_handler"] for p in phases) / done
        merged: dict = {}
        for phase in phases:
            for key, value in phase["metrics"].items():
                merged[key] = merged.get(key, 0.0) + value
        row["batches"] = batch_sizes(merged)
        row["search_batches"] = batch_sizes(merged, "vitrine_search_batch_size")
        row["stages_ms"] = stage_means(merged)
        row["cache_hits"] = cache_hits(merged)
        row["cpu_server"] = sum(phase["cpu_server"] for phase in phases) / elapsed
        row["cpu_client"] = sum(phase["cpu_client"] for phase in phases) / elapsed
        row["first_error"] = next((p["first_error"] for p in phases if p["first_error"]), None)
    return row


def ratios_by_round(service: dict[str, Any], bare: dict[str, Any]) -> list[float]:
    """Each round's service p50 over the same round's bare p50.

    The two phases of a round run back to back, so these ratios show how much the pooled
    ratio moves with the machine's load (six runs of the same code on a 2-core VM gave pooled
    ratios from 1.13 to 1.22); a round with no latencies on either side is left out.
    """
    return [
        mine / theirs
        for mine, theirs in zip(service["p50_by_round"], bare["p50_by_round"], strict=True)
        if not (math.isnan(mine) or math.isnan(theirs)) and theirs > 0
    ]


def _finite(value: Any) -> Any:
    """NaN (no latency for this contender) as null, so the JSON file is standard JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and value != value else value


def clock_text(row: dict[str, Any]) -> str:
    """CPU ms per request by thread group, and ms waited runnable (a wake-up's delay
    included): where the service's time goes, steadier than the latencies."""
    parts = [
        f"{group} {run:.2f} ran / {wait:.2f} waited"
        for group, (run, wait) in row.get("threads_ms", {}).items()
    ]
    return "CPU ms per request: " + ", ".join(parts) if parts else ""


def fmt(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"  # NaN: no latency for this contender


# --- main -----------------------------------------------------------------------------------


def run(args: argparse.Namespace, clients: list[int]) -> dict[str, Any]:
    from bench.http_client import multipart_post
    from serving.search import first_depth
    from serving.settings import Settings

    top_k = Settings.model_fields["default_top_k"].default
    depth = first_depth(top_k)
    batch = min(max(clients), args.max_batch)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vitrine-bench-service-") as folder:
        tmp = Path(folder)
        command = [sys.executable, str(Path(__file__).resolve()), "--setup-into", str(tmp)]
        for option in ("products", "photos", "queries_per_product"):
            command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
        subprocess.run(command, check=True, cwd=tmp)
        setup = json.loads((tmp / "setup.json").read_text())
        photos = [Path(path).read_bytes() for path in setup["queries"]]
        print(
            f"setup: {setup['products']} products x {args.photos} photos = {setup['rows']} rows "
            f"in Milvus Lite ({setup['index_type']}), {setup['backbone']} pretrained, no "
            f"training, dim {setup['embed_dim']}; {len(photos)} query photos not in the index; "
            + ", ".join(f"{k} {v:.1f} s" for k, v in setup["seconds"].items())
        )
        service = Service(setup["service_uri"], args, tmp)
        host = service.url.removeprefix("http://")
        prepared = [
            multipart_post(host, SEARCH_PATH, "image", "query.jpg", data, "image/jpeg")
            for data in photos
        ]
        try:
            tick = time.perf_counter()
            bare = BarePath(setup, args, top_k)
            setup["runtime"] = f"model {bare.embedder.runtime}"
            ready = service.wait_ready()
            print(
                f"service ready in {time.perf_counter() - tick:.1f} s on {service.url} "
                f"(serving {ready['collection']})"
            )
            bare.one()  # the bare search finds something

            # Warm-up, not timed: every batch size the phases will see, on both sides.
            counter = itertools.count()
            bare.serial(0, 10)
            bare.batched(batch, 0, 2 * batch)
            for n in clients:
                warm = load(service, prepared, n, 0, 3 * n, counter)
                if warm["errors"]:
                    raise RuntimeError(f"warm-up at {n} clients failed: {warm['first_error']}")

            seconds, requests = args.seconds, args.requests
            blocks: dict[str, Callable[[], dict[str, Any]]] = {
                "bare": lambda: bare.serial(seconds, requests),
                **{
                    f"service {n}": lambda n=n: load(
                        service, prepared, n, seconds, requests, counter
                    )
                    for n in clients
                },
                f"bare batched x{batch}": lambda: bare.batched(batch, seconds, requests),
            }
            phases: dict[str, list[dict[str, Any]]] = {name: [] for name in blocks}
            for round_ in range(args.rounds):
                # ABBA: every other round runs the phases backwards, so a drift in the
                # machine's load weighs on all contenders alike.
                order = list(blocks) if round_ % 2 == 0 else list(reversed(blocks))
                for name in order:
                    phases[name].append(blocks[name]())
                print(f"  round {round_ + 1}/{args.rounds}: " + " -> ".join(order))
            bare.close()
        finally:
            service.stop()
    rows = {name: summarise(group) for name, group in phases.items()}
    return {
        "setup": {k: v for k, v in setup.items() if k not in ("queries", "package")}
        | {"query_photos": len(photos), "top_k": top_k, "depth": depth},
        "rows": rows,
        "batch": batch,
        "seconds": time.perf_counter() - started,
    }


def report(args: argparse.Namespace, clients: list[int], result: dict[str, Any]) -> dict:
    rows, batch = result["rows"], result["batch"]
    print(
        f"\n{args.seconds:g} s per phase x {args.rounds} rounds"
        + (f" ({args.requests} requests per phase)" if args.requests else "")
        + f"; torch threads {args.threads} (bare and service), {os.cpu_count()} CPUs; service: "
        f"{result['setup']['runtime']}, Milvus Lite "
        f"{'on threads' if args.lite_threads else 'in a child process'}, "
        f"max_batch {args.max_batch}, embed workers "
        f"{'default' if args.embed_workers is None else args.embed_workers}, max_wait_ms "
        f"{'default' if args.max_wait_ms is None else args.max_wait_ms}, cache_size "
        f"{args.cache_size}; top_k {result['setup']['top_k']} (first search depth "
        f"{result['setup']['depth']}); load average now {os.getloadavg()[0]:.2f}"
    )
    header = (
        f"  {'contender':<18} {'clients':>7} {'requests':>8} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'req/s':>7} {'errors':>6} {'batch':>6}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for name, row in rows.items():
        contender, n = name.rsplit(" ", 1) if name.startswith("service") else (name, "1")
        if "batches" in row:
            mean_batch = row["batches"]["mean"]
        else:
            mean_batch = batch if "batched" in name else 1
        print(
            f"  {contender:<18} {n:>7} {row['requests']:>8} {fmt(row['p50']):>8} "
            f"{fmt(row['p95']):>8} {fmt(row['p99']):>8} {row['rps']:>7.1f} {row['errors']:>6} "
            f"{mean_batch:>6.1f}"
        )
    print("  per round, p50 ms / req/s:")
    for name, row in rows.items():
        p50s = ", ".join(fmt(x) for x in row["p50_by_round"])
        rates = ", ".join(f"{x:.1f}" for x in row["rps_by_round"])
        print(f"    {name:<22} p50 [{p50s}]  req/s [{rates}]")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in rows["bare"]["stages_ms"].items())
    print(f"  bare, mean ms per query: {stages}; {clock_text(rows['bare'])}")
    print(
        "  service, per client count: forward passes, images per pass (histogram), mean ms per "
        "request of each stage the route times (embed includes the wait for a batch) and of "
        "what lies outside the route's took_ms (HTTP, multipart, middleware, JSON, client)"
    )
    for n in clients:
        row = rows[f"service {n}"]
        b = row["batches"]
        hist = ", ".join(f"{k}: {v}" for k, v in b["histogram"].items())
        stages = ", ".join(f"{k} {v:.1f}" for k, v in row["stages_ms"].items())
        searches = row["search_batches"]
        print(
            f"    {n:>2} clients: {b['forwards']} passes, mean {b['mean']:.2f} images [{hist}]; "
            f"{searches['forwards']} Milvus searches, mean {searches['mean']:.2f} queries; "
            f"{stages}, outside {row['outside_handler_ms']:.1f}; CPU cores: service "
            f"{row['cpu_server']:.2f} (with its Milvus Lite process), load generator "
            f"{row['cpu_client']:.2f}; cache hits {row['cache_hits']}"
        )
        print(f"      {clock_text(row)}")
        if row["first_error"]:
            print(f"      first error: {row['first_error']}")

    bare_p50 = rows["bare"]["p50"]
    ratios: dict[str, Any] = {}
    errors = sum(rows[f"service {n}"]["errors"] for n in clients)
    if 1 in clients:
        one = rows["service 1"]
        ratios["latency"] = one["p50"] / bare_p50
        ratios["latency_by_round"] = ratios_by_round(one, rows["bare"])
        verdict = "PASS" if ratios["latency"] <= LATENCY_GOAL else "FAIL"
        spread = ", ".join(f"{ratio:.3f}" for ratio in ratios["latency_by_round"])
        print(
            f"ratio service p50 at 1 client / bare p50 = {one['p50']:.1f} / {bare_p50:.1f} ms = "
            f"{ratios['latency']:.3f}  (goal <= {LATENCY_GOAL:.2f}): {verdict}; round by round "
            f"[{spread}]"
        )
        top = max(clients)
        ratios["throughput"] = rows[f"service {top}"]["rps"] / one["rps"]
        verdict = "PASS" if ratios["throughput"] >= THROUGHPUT_GOAL else "FAIL"
        print(
            f"ratio service req/s at {top} clients / at 1 client = "
            f"{rows[f'service {top}']['rps']:.1f} / {one['rps']:.1f} = "
            f"{ratios['throughput']:.2f}  (goal >= {THROUGHPUT_GOAL:.1f}): {verdict}; "
            f"bare batched x{batch} / bare = "
            f"{rows[f'bare batched x{batch}']['rps'] / rows['bare']['rps']:.2f} (what batching "
            "alone gains)"
        )
    print(
        f"errors: {errors} ({'PASS' if errors == 0 else 'FAIL'}, must be 0); "
        f"runtime {result['seconds']:.0f} s"
    )
    return ratios


def main() -> None:
    from components.runtime import reexec_with_tuned_allocator

    reexec_with_tuned_allocator()  # what `vitrine serve` runs with
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per phase per round")
    parser.add_argument("--requests", type=int, help="requests per phase instead of --seconds")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (bare and service)")
    parser.add_argument("--products", type=int, default=120, help="demo catalogue products")
    parser.add_argument("--photos", type=int, default=4, help="catalogue photos per product")
    parser.add_argument("--queries-per-product", type=int, default=2, help="query photos each")
    parser.add_argument("--max-batch", type=int, default=16, help="service micro-batch limit")
    parser.add_argument("--max-wait-ms", type=float, help="service batch wait (default: its own)")
    parser.add_argument("--cache-size", type=int, default=0, help="service embedding cache")
    parser.add_argument(
        "--embed-workers", type=int, help="service forward passes at once (default: its own)"
    )
    parser.add_argument(
        "--eager", action="store_true", help="eager PyTorch on both sides (not TorchScript)"
    )
    parser.add_argument(
        "--lite-threads",
        action="store_true",
        help="Milvus Lite on threads of the process that searches (not a child process)",
    )
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--setup-into", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    if args.setup_into:
        setup = prepare(args.setup_into, args)
        (args.setup_into / "setup.json").write_text(json.dumps(setup, indent=2) + "\n")
        return
    clients = sorted({int(n) for n in args.clients.split(",")})
    print(f"load average at start {os.getloadavg()[0]:.2f}")
    result = run(args, clients)
    ratios = report(args, clients, result)
    if args.json:
        payload = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "goals": {"latency": LATENCY_GOAL, "throughput": THROUGHPUT_GOAL},
            "ratios": ratios,
            **result,
        }
        args.json.write_text(json.dumps(_finite(payload), indent=2) + "\n")


if __name__ == "__main__":
    main()
