"""The rollout step and the smoke query, over the running search service's HTTP API.

:func:`rollout_service` asks the service to load the model that built the aliased collection,
warm it and switch model and collection together (``POST /v1/admin/rollout``).
:func:`smoke_query` then searches with one catalogue photo and checks the answer came from
the expected model and found the photo's product.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ADMIN_TOKEN_ENV = "VITRINE_ADMIN_TOKEN"


class ServiceError(RuntimeError):
    """The search service is unreachable or refused the request."""


def _error_message(response: Any) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def rollout_service(
    url: str,
    *,
    token: str | None = None,
    collection: str | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Roll the service at ``url`` onto the aliased collection (or ``collection``) and its
    model. Returns ``{"serving": {...}, "previous": {...} | None}``.

    Raises:
        ServiceError: The service cannot be reached, or it refused (the old pair serves on).
    """
    import httpx

    token = (token if token is not None else os.environ.get(ADMIN_TOKEN_ENV, "")).strip()
    if not token:
        raise ServiceError(
            f"no admin token: set {ADMIN_TOKEN_ENV} (or pass --token) to the token the "
            "service was started with"
        )
    body = {"collection": collection} if collection else {}
    try:
        response = httpx.post(
            f"{url.rstrip('/')}/v1/admin/rollout",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
    except httpx.HTTPError as err:
        raise ServiceError(f"cannot reach the search service at {url}: {err}") from err
    if response.status_code != 200:
        raise ServiceError(f"rollout refused ({response.status_code}): {_error_message(response)}")
    return response.json()


def smoke_query(
    url: str,
    image: str | Path,
    product_id: str,
    *,
    expected_model: str | None = None,
    top_k: int = 10,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Search the service with one catalogue photo.

    Passes when the answer comes from ``expected_model`` (if given) and the photo's product
    is among the ``top_k`` results: a catalogue photo is in the collection, so a healthy index
    finds it first.

    Raises:
        ServiceError: Unreachable, an error status, another model answered, or the product
            was not found.
    """
    import httpx

    path = Path(image)
    try:
        response = httpx.post(
            f"{url.rstrip('/')}/v1/search/image",
            files={"image": (path.name, path.read_bytes())},
            data={"top_k": str(top_k)},
            timeout=timeout,
        )
    except httpx.HTTPError as err:
        raise ServiceError(f"cannot reach the search service at {url}: {err}") from err
    if response.status_code != 200:
        raise ServiceError(
            f"smoke query failed ({response.status_code}): {_error_message(response)}"
        )
    answer = response.json()
    if expected_model is not None and answer["model_version"] != expected_model:
        raise ServiceError(
            f"smoke query answered by model {answer['model_version']}, expected {expected_model}"
        )
    found = [hit["product_id"] for hit in answer["results"]]
    if product_id not in found:
        raise ServiceError(
            f"smoke query: product {product_id} not in the top {top_k} for its own photo "
            f"(got {found[:5]})"
        )
    return {
        "product_id": product_id,
        "rank": found.index(product_id) + 1,
        "model_version": answer["model_version"],
        "collection": answer["collection"],
        "took_ms": answer["took_ms"],
    }
