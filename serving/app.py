"""``create_app()``: the FastAPI search service.

The model and the store are opened in ``lifespan`` and kept on ``app.state``; nothing heavy
happens at import time. If nothing can be loaded at start-up (no collection yet, Milvus
down), the service still starts, answers ``/healthz``, reports ``/readyz`` false with the
reason, and keeps retrying in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import error_body, install_error_handlers
from serving.metrics import ServiceMetrics
from serving.pair import PairHolder
from serving.routes import router
from serving.settings import Settings, get_settings
from serving.store import VectorStore

log = logging.getLogger(__name__)
# Room for the multipart envelope and form fields around the image itself.
ENVELOPE_BYTES = 64 * 1024


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, declared or not.

    A declared ``Content-Length`` over the limit is answered before a byte is read. A body
    without one (chunked) is counted as it arrives and refused once it passes the limit:
    otherwise the multipart parser would spool a file part of any size to disk before the
    route could look at it.
    """

    def __init__(self, app: ASGIApp, limit: int, on_refuse) -> None:
        self.app = app
        self.limit = limit
        self.on_refuse = on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is over {self.limit} bytes"
        length = Headers(scope=scope).get("content-length")
        if length and length.isdigit() and int(length) > self.limit:
            self.on_refuse()
            response = JSONResponse(error_body("upload_too_large", message), status_code=413)
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
                    raise HTTPException(413, message)
            return event

        await self.app(scope, counted, send)


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


def create_app(settings: Settings | None = None) -> FastAPI:
    """Assemble the service. ``settings`` default to the ``VITRINE_*`` environment."""
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = VectorStore(settings.milvus_uri, settings.milvus_token, settings.alias)
        metrics: ServiceMetrics = app.state.metrics
        app.state.store = store
        app.state.holder = PairHolder(store, settings, on_batch=metrics.observe_batch)
        loader = asyncio.create_task(_load_until_ready(app))
        watcher = asyncio.create_task(_run_canary_periodically(app))
        try:
            yield
        finally:
            for task in (loader, watcher):
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
        on_refuse=lambda: app.state.metrics.errors.labels("upload_too_large").inc(),
    )

    @app.middleware("http")
    async def measure(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics = app.state.metrics
        metrics.requests.labels(path, request.method, str(response.status_code)).inc()
        metrics.latency.labels(path, request.method).observe(time.perf_counter() - started)
        return response

    app.include_router(router)
    return app
