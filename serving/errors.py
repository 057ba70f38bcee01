"""Typed service errors and the one place they become HTTP answers.

Every error is JSON ``{"error": {"code": ..., "message": ...}}`` with a 4xx or 503 status;
never a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.store import StoreError, StoreUnavailable
from serving.uploads import UploadError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status and machine-readable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class NotReady(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(503, "not_ready", message)


def error_body(code: str, message: str, **extra: object) -> dict[str, object]:
    return {"error": {"code": code, "message": message, **extra}}


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable, e.g. unsupported_media_type")
    message: str = Field(description="what went wrong and what to do, for a person")
    details: list[dict[str, Any]] | None = Field(
        default=None, description="for invalid_request: each invalid field's loc and msg"
    )


class ErrorBody(BaseModel):
    """Every error the service answers, whatever its status."""

    error: ErrorDetail


_WHEN = {
    400: "the upload is empty, not an image, corrupt or too small",
    401: "no admin token",
    403: "a wrong admin token, or admin endpoints are disabled",
    404: "no such product, image or collection",
    409: "refused: the collection cannot be rolled out, or has no canary",
    413: "the upload is over the byte or pixel limit",
    415: "the upload's content type or image format is not accepted",
    422: "a parameter is missing or invalid",
    503: "nothing is loaded yet, or Milvus is unreachable (retry)",
}


def documented_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route's OpenAPI operation: its error statuses and their body
    (in place of FastAPI's default 422 schema, which this service never sends)."""
    return {status: {"model": ErrorBody, "description": _WHEN[status]} for status in statuses}


def install_error_handlers(app: FastAPI, count_error) -> None:
    """Map every library error to its status; ``count_error(kind)`` feeds the metrics."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, err: ApiError) -> JSONResponse:
        count_error(err.code)
        return JSONResponse(error_body(err.code, err.message), status_code=err.status)

    @app.exception_handler(UploadError)
    async def _upload(request: Request, err: UploadError) -> JSONResponse:
        count_error(err.code)
        return JSONResponse(error_body(err.code, str(err)), status_code=err.status)

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(request: Request, err: StoreUnavailable) -> JSONResponse:
        count_error("milvus_unavailable")
        log.warning("search store unavailable: %s", err)
        return JSONResponse(
            error_body("milvus_unavailable", "the vector store is unavailable; retry shortly"),
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(StoreError)
    async def _store(request: Request, err: StoreError) -> JSONResponse:
        count_error("store_error")
        log.error("search store error: %s", err)
        return JSONResponse(
            error_body("store_error", "the vector store could not answer this request"),
            status_code=503,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        count_error("invalid_request")
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in err.errors()]
        message = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in details)
        return JSONResponse(
            error_body("invalid_request", message, details=details), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "upload_too_large"}.get(
            err.status_code, "http_error"
        )
        count_error(code)
        return JSONResponse(
            error_body(code, str(err.detail)), status_code=err.status_code, headers=err.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        count_error("internal")
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal", "unexpected server error"), status_code=500)
