"""FastAPI dependencies as ``Annotated`` aliases: the routes stay short.

They are ``async def`` although none of them awaits: FastAPI runs a plain ``def`` dependency
on a worker thread, one hand-off per dependency per request (about 0.1 ms each under load).
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Request

from serving.errors import ApiError
from serving.metrics import ServiceMetrics
from serving.pair import PairHolder
from serving.settings import Settings
from serving.store import VectorStore


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _holder(request: Request) -> PairHolder:
    return request.app.state.holder


async def _store(request: Request) -> VectorStore:
    return request.app.state.store


async def _metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def _admin(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_admin_token: Annotated[str | None, Header()] = None,
) -> None:
    """403 when this service has admin disabled (no token would do), else 401 without a
    token and 403 with a wrong one."""
    expected = request.app.state.settings.admin_token
    if not expected:
        raise ApiError(
            403,
            "admin_disabled",
            "this service was started without an admin token, so its admin endpoints are "
            "off: start it with VITRINE_ADMIN_TOKEN set, and send the same token",
        )
    given = x_admin_token
    if authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    if not given:
        raise ApiError(401, "unauthorized", "admin endpoints need a token (Authorization: Bearer)")
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise ApiError(403, "forbidden", "wrong admin token")


SettingsDep = Annotated[Settings, Depends(_settings)]
HolderDep = Annotated[PairHolder, Depends(_holder)]
StoreDep = Annotated[VectorStore, Depends(_store)]
MetricsDep = Annotated[ServiceMetrics, Depends(_metrics)]
AdminDep = Annotated[None, Depends(_admin)]
