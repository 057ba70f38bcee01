"""``create_app()``: the FastAPI search service.

The model and the store are opened in ``lifespan`` and kept on ``app.state``; nothing heavy
happens at import time. If nothing can be loaded at start-up (no collection yet, Milvus
down), the service still starts, answers ``/healthz``, reports ``/readyz`` false with the
reason, and keeps retrying in the background.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import error_body, install_error_handlers
from serving.metrics import ServiceMetrics
from serving.pair import PairHolder
from serving.routes import check_readiness, router
from serving.settings import Settings, get_settings
from serving.store import LEASE_EVERY_S, VectorStore
from serving.uploads import photo_size_limit

log = logging.getLogger(__name__)
# Room for the multipart envelope and form fields around the image itself.
ENVELOPE_BYTES = 64 * 1024
# Threads for the blocking work requests hand off (decoding, Milvus calls). asyncio's default
# (cores + 4) lets six searches waiting on Milvus hold up every decode behind them: at 16
# clients on 2 cores, decodes waited 8 ms on average, 2.8 ms with this many.
IO_THREADS = 32


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, declared or not.

    A declared ``Content-Length`` over the limit is answered before a byte is read. A body
    without one (chunked) is counted as it arrives and refused once it passes the limit:
    otherwise the multipart parser would spool a file part of any size to disk before the
    route could look at it.
    """

    def __init__(self, app: ASGIApp, limit: int, on_refuse, photo_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.on_refuse = on_refuse
        self.message = f"the request body is over {limit} bytes: {photo_size_limit(photo_limit)}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length and length.isdigit() and int(length) > self.limit:
            self.on_refuse()
            response = JSONResponse(error_body("upload_too_large", self.message), status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.limit:
                    # Raised inside the route's body parsing; the error handlers answer it.
                    raise HTTPException(413, self.message)
            return event

        await self.app(scope, counted, send)


# HTTP methods that get a label of their own; any other (a server parser less strict than
# httptools lets any token through) counts as "other", so labels stay few.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Measure:
    """Count every HTTP request and time it, by route template, method and status.

    A plain ASGI middleware: Starlette's ``@app.middleware("http")`` runs each request through
    an extra task and memory streams, about 0.3 ms that a 20 ms search would notice.
    """

    def __init__(self, app: ASGIApp, metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless the app starts a response

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            # The router records the matched route in the scope it was given; its template
            # without converters (``{product_id}``, not ``{product_id:path}``).
            path = getattr(scope.get("route"), "path_format", "unmatched")
            metrics = self.metrics()
            method = scope["method"] if scope["method"] in _METHODS else "other"
            labels = (path, method, str(status))
            metrics.requests.labels(*labels).inc()
            metrics.latency.labels(*labels).observe(time.perf_counter() - started)


async def _load_until_ready(app: FastAPI) -> None:
    """Keep trying to load the served pair while there is none."""
    holder: PairHolder = app.state.holder
    metrics: ServiceMetrics = app.state.metrics
    while holder.current is None:
        try:
            pair, _ = await holder.rollout()
            metrics.set_serving(
                pair.model_version,
                pair.collection,
                pair.spec.index_type,
                pair.metadata.get("rows", 0),
            )
        except Exception as err:
            holder.last_error = f"nothing served yet: {err}"
            log.warning(
                "%s (retrying in %.0f s)", holder.last_error, app.state.settings.reload_interval_s
            )
            await asyncio.sleep(app.state.settings.reload_interval_s)


async def _run_canary_periodically(app: FastAPI) -> None:
    """Every ``canary_interval_s``, run the recall canary on whatever is served."""
    from serving.routes import run_canary_once

    interval = app.state.settings.canary_interval_s
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        if app.state.holder.current is None:
            continue
        try:
            result = await run_canary_once(app.state.holder, app.state.store, app.state.metrics)
            log.info("canary: recall %s (expected %s)", result["recall"], result["expected"])
        except Exception as err:  # the canary must never take the service down
            log.warning("canary failed: %s", err)


async def _watch_readiness(app: FastAPI) -> None:
    """Every ``readiness_interval_s``, the readiness check of /readyz, for the
    ``vitrine_ready`` gauge (the ServiceNotReady alert), whether or not anything calls it."""
    while True:
        await asyncio.sleep(app.state.settings.readiness_interval_s)
        with contextlib.suppress(Exception):  # a check that fails says so next time
            await check_readiness(app.state.holder, app.state.store, app.state.metrics)


async def _renew_leases_periodically(app: FastAPI) -> None:
    """On a Milvus server, keep this replica's leases on the collections it answers from
    fresh, so that an index build's clean-up leaves them alone (see VectorStore.hold)."""
    if app.state.store.embedded:
        return  # Milvus Lite: the open file's lock does this
    while True:
        await asyncio.sleep(LEASE_EVERY_S)
        await app.state.holder.renew_leases()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Assemble the service. ``settings`` default to the ``VITRINE_*`` environment."""
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(IO_THREADS, thread_name_prefix="io")
        )
        store = VectorStore(
            settings.milvus_uri,
            settings.milvus_token,
            settings.alias,
            lite_process=settings.lite_process,
        )
        metrics: ServiceMetrics = app.state.metrics
        app.state.store = store
        app.state.holder = PairHolder(
            store, settings, on_batch=metrics.observe_batch, on_search=metrics.observe_search_batch
        )
        loader = asyncio.create_task(_load_until_ready(app))
        watcher = asyncio.create_task(_run_canary_periodically(app))
        leases = asyncio.create_task(_renew_leases_periodically(app))
        readiness = asyncio.create_task(_watch_readiness(app))
        try:
            yield
        finally:
            for task in (loader, watcher, leases, readiness):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await app.state.holder.close()

    app = FastAPI(
        title="Vitrine search",
        version="1",
        description="Visual product search: find catalogue products that look like a photo.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    install_error_handlers(app, lambda kind: app.state.metrics.errors.labels(kind).inc())

    # Added first, so it runs inside the measuring middleware: refusals are counted too.
    app.add_middleware(
        BodyLimit,
        limit=settings.max_upload_bytes + ENVELOPE_BYTES,
        photo_limit=settings.max_upload_bytes,
        on_refuse=lambda: app.state.metrics.errors.labels("upload_too_large").inc(),
    )

    app.add_middleware(Measure, metrics=lambda: app.state.metrics)
    app.include_router(router)
    return app
