"""HTTP routes (versioned under /v1), each a few lines over serving/search.py and the store."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from serving.batching import digest, notify
from serving.catalogue_rules import CatalogueRules, RuleBroken, stripped
from serving.deps import AdminDep, HolderDep, MetricsDep, SettingsDep, StoreDep
from serving.errors import ApiError, documented_errors
from serving.pair import LIVE_METADATA, ServingPair
from serving.search import image_url, milvus_filter, search_here, search_vector
from serving.store import META_VALUE_CHARS, OUTPUT_FIELDS, StoreError, metadata_value
from serving.uploads import (
    UploadLimits,
    check_content_type,
    decode_upload,
    photo_size_limit,
    sniffed_mime_type,
)

router = APIRouter()
PAGE = Path(__file__).with_name("static") / "index.html"


class SearchHit(BaseModel):
    product_id: str
    image_id: str
    score: float = Field(description="cosine similarity to the query, higher is closer")
    title: str
    category: str
    price: float
    image_url: str
    extra: dict[str, Any] = Field(default_factory=dict, description="extra catalogue fields")


class SearchResponse(BaseModel):
    results: list[SearchHit]
    model_version: str
    collection: str
    index_type: str
    took_ms: float
    stages_ms: dict[str, float]


class ProductUpdate(BaseModel):
    """Catalogue fields to set on every photo of a product; those left out stay as they are."""

    # The collection's own limits; the catalogue's rules may be narrower.
    category: str | None = Field(default=None, min_length=1, max_length=512)
    title: str | None = Field(default=None, min_length=1, max_length=4096)
    # Strict: a JSON number (true, "5" are mistakes, not prices).
    price: float | None = Field(default=None, ge=0, allow_inf_nan=False, strict=True)


class RolloutRequest(BaseModel):
    collection: str | None = Field(
        default=None, description="collection to serve; default: where the alias points"
    )


def _check_top_k(top_k: int, settings: Any) -> None:
    if not 1 <= top_k <= settings.max_top_k:
        raise ApiError(422, "invalid_top_k", f"top_k must be between 1 and {settings.max_top_k}")


def _check_price_range(price_min: float | None, price_max: float | None) -> None:
    """A range with its minimum above its maximum is a mistake (no product could match), not
    a search that finds nothing."""
    if price_min is not None and price_max is not None and price_min > price_max:
        raise ApiError(
            422,
            "invalid_price_range",
            f"price_min ({price_min:g}) is above price_max ({price_max:g}): swap them",
        )


def _response(pair: ServingPair, results: list, started: float, timings: dict) -> JSONResponse:
    """A search answer, serialised here: the shape is :class:`SearchResponse` (the route's
    ``response_model``, for the OpenAPI schema), but FastAPI's validation of every hit against
    it cost about 0.2 ms a request; tests validate the answers against the model instead."""
    return JSONResponse(
        {
            "results": results,
            "model_version": pair.model_version,
            "collection": pair.collection,
            "index_type": pair.spec.index_type,
            "took_ms": round(1000 * (time.perf_counter() - started), 2),
            "stages_ms": {k: round(1000 * v, 2) for k, v in timings.items()},
        }
    )


def _observe(metrics: Any, timings: dict[str, float]) -> None:
    for stage, seconds in timings.items():
        metrics.stage.labels(stage).observe(seconds)


def _upload_limits(settings: Any, rules: CatalogueRules | None = None) -> UploadLimits:
    limits = UploadLimits(
        max_bytes=settings.max_upload_bytes, max_pixels=settings.max_upload_pixels
    )
    return limits if rules is None else rules.upload_limits(limits)


async def _search_upload(
    pair: ServingPair,
    store: Any,
    data: bytes,
    content_type: str | None,
    settings: Any,
    metrics: Any,
    top_k: int,
    filter_expr: str,
    timings: dict[str, float],
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """An upload's embedding and its ``top_k`` products. A recent identical upload's
    embedding comes from the cache; a lone request (the only one the service is answering,
    the model idle) is decoded, embedded and searched as one job on a model thread; others are
    micro-batched. The model idle is not enough: under load the batcher empties for moments,
    and a job holds its model thread through decoding and search, which batched requests do
    on other threads."""
    limits = _upload_limits(settings)
    check_content_type(content_type, limits)  # a cached upload is refused all the same
    key = digest(data)
    vector = pair.cache.get(key)
    metrics.cache.labels("hit" if vector is not None else "miss").inc()
    if vector is not None:
        return vector, await search_vector(store, pair, vector, top_k, filter_expr, timings)
    if pair.in_flight == 1:  # the only request the service is answering: see run_alone
        alone, found = await pair.batcher.run_alone(
            _search_alone, pair, store, data, content_type, limits, top_k, filter_expr
        )
        if alone:
            vector, results, lone_timings = found
            timings.update(lone_timings)
            pair.cache.put(key, vector)
            return vector, results
    vector = await _embed_decoded(pair, data, content_type, limits, timings)
    pair.cache.put(key, vector)
    return vector, await search_vector(store, pair, vector, top_k, filter_expr, timings)


def _search_alone(
    pair: ServingPair,
    store: Any,
    data: bytes,
    content_type: str | None,
    limits: UploadLimits,
    top_k: int,
    filter_expr: str,
) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, float]]:
    """A lone request's whole work, on a model thread (see MicroBatcher.run_alone)."""
    timings: dict[str, float] = {}
    model_input, timings["decode"], timings["prepare"] = _decode_and_prepare(
        pair, data, content_type, limits
    )
    started = time.perf_counter()
    vector = pair.embedder.embed_prepared([model_input])[0]
    timings["embed"] = time.perf_counter() - started
    notify(pair.batcher.on_batch, 1, timings["embed"])
    results = search_here(pair, store, vector, top_k, filter_expr=filter_expr, timings=timings)
    return vector, results, timings


async def _embed_decoded(
    pair: ServingPair,
    data: bytes,
    content_type: str | None,
    limits: UploadLimits,
    timings: dict[str, float],
) -> np.ndarray:
    """Decode (with limits) on a decoding thread, then embed in whatever batch it joins."""
    # Off the model's threads (see Embedder.prepare), in one hop.
    prepared = await asyncio.to_thread(_decode_and_prepare, pair, data, content_type, limits)
    model_input, timings["decode"], timings["prepare"] = prepared
    started = time.perf_counter()
    vector = await pair.batcher.embed(model_input)
    timings["embed"] = time.perf_counter() - started
    return vector


async def _embed_upload(
    pair: ServingPair,
    data: bytes,
    content_type: str | None,
    settings: Any,
    timings: dict[str, float],
    rules: CatalogueRules,
) -> tuple[np.ndarray, str]:
    """An added photo's embedding and its key (the digest of its bytes). It is decoded
    whatever the cache holds, so that the catalogue's ``rules`` (a catalogue photo's limits,
    narrower than a query's) are checked."""
    limits = _upload_limits(settings, rules)
    check_content_type(content_type, limits)
    vector = await _embed_decoded(pair, data, content_type, limits, timings)
    key = digest(data)
    pair.cache.put(key, vector)
    return vector, key


def _decode_and_prepare(
    pair: ServingPair, data: bytes, content_type: str | None, limits: UploadLimits
) -> tuple[Any, float, float]:
    """The upload decoded (with limits) into the model's input; seconds decoding, preparing."""
    started = time.perf_counter()
    image = decode_upload(data, content_type, limits, pair.embedder.decode_side)
    decoded = time.perf_counter()
    model_input = pair.embedder.prepare(image)
    return model_input, decoded - started, time.perf_counter() - decoded


async def _read_upload(image: UploadFile, settings: Any) -> bytes:
    data = await image.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ApiError(
            413,
            "upload_too_large",
            f"the image is too large: {photo_size_limit(settings.max_upload_bytes)}",
        )
    return data


@router.post(
    "/v1/search/image",
    response_model=SearchResponse,
    responses=documented_errors(400, 413, 415, 422, 503),
    tags=["search"],
)
async def search_by_image(
    request: Request,
    holder: HolderDep,
    store: StoreDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    image: Annotated[UploadFile, File(description="the query photo (JPEG, PNG or WEBP)")],
    top_k: Annotated[int | None, Form()] = None,
    category: Annotated[str | None, Form()] = None,
    price_min: Annotated[float | None, Form(allow_inf_nan=False)] = None,
    price_max: Annotated[float | None, Form(allow_inf_nan=False)] = None,
) -> JSONResponse:
    """Products that look like the uploaded photo."""
    started = time.perf_counter()
    await _refuse_repeated_parts(request, ("image",))
    top_k = settings.default_top_k if top_k is None else top_k
    _check_top_k(top_k, settings)
    _check_price_range(price_min, price_max)
    data = await _read_upload(image, settings)
    timings: dict[str, float] = {}
    async with holder.use() as pair:
        expr = milvus_filter(category or None, price_min, price_max)
        vector, results = await _search_upload(
            pair, store, data, image.content_type, settings, metrics, top_k, expr, timings
        )
        pair.drift.observe(vector)
        _observe(metrics, timings)
        return _response(pair, results, started, timings)


@router.get(
    "/v1/search/product/{product_id:path}",
    response_model=SearchResponse,
    responses=documented_errors(404, 422, 503),
    tags=["search"],
)
async def search_by_product(
    product_id: str,
    holder: HolderDep,
    store: StoreDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    top_k: Annotated[int | None, Query()] = None,
    category: Annotated[str | None, Query()] = None,
    price_min: Annotated[float | None, Query(allow_inf_nan=False)] = None,
    price_max: Annotated[float | None, Query(allow_inf_nan=False)] = None,
) -> JSONResponse:
    """Other products that look like this one (its first photo is the query)."""
    started = time.perf_counter()
    top_k = settings.default_top_k if top_k is None else top_k
    _check_top_k(top_k, settings)
    _check_price_range(price_min, price_max)
    timings: dict[str, float] = {}
    async with holder.use() as pair:
        tick = time.perf_counter()
        rows = await asyncio.to_thread(store.rows_of_product, pair.collection, product_id, True)
        timings["fetch_query"] = time.perf_counter() - tick
        if not rows:
            raise ApiError(
                404, "unknown_product", f"no product {product_id!r} in {pair.collection}"
            )
        vector = np.asarray(sorted(rows, key=lambda r: r["image_id"])[0]["embedding"], np.float32)
        expr = milvus_filter(category or None, price_min, price_max, exclude_product=product_id)
        results = await search_vector(store, pair, vector, top_k, expr, timings)
        _observe(metrics, timings)
        return _response(pair, results, started, timings)


@router.get(
    "/v1/products/{product_id:path}", tags=["catalogue"], responses=documented_errors(404, 422, 503)
)
async def product(product_id: str, holder: HolderDep, store: StoreDep) -> dict:
    """A product's catalogue fields (its extra ones as search results carry them) and
    images."""
    async with holder.use() as pair:
        rows = await asyncio.to_thread(store.rows_of_product, pair.collection, product_id)
    if not rows:
        raise ApiError(404, "unknown_product", f"no product {product_id!r}")
    first = rows[0]
    return {
        "product_id": product_id,
        "title": first.get("title", ""),
        "category": first.get("category", ""),
        "price": first.get("price", 0.0),
        "extra": _extras_of(rows),
        "images": [{"image_id": r["image_id"], "image_url": image_url(r)} for r in rows],
    }


@router.get(
    "/v1/images/{image_id:path}", tags=["catalogue"], responses=documented_errors(404, 422, 503)
)
async def catalogue_image(image_id: str, holder: HolderDep, store: StoreDep) -> Response:
    """A catalogue photo by image id (only files the served collection lists)."""
    async with holder.use() as pair:
        row = await asyncio.to_thread(store.row_by_image, pair.collection, image_id)
    if row is None:
        raise ApiError(404, "unknown_image", f"no image {image_id!r}")
    path = Path(str(row.get("image_uri", "")).removeprefix("file://"))
    if not path.is_file():
        raise ApiError(404, "image_gone", f"image {image_id!r} is no longer on disk")
    # The bytes decide the type: photos added through the admin API are stored as ``.img``.
    media_type = await asyncio.to_thread(_sniff_image_type, path)
    return FileResponse(
        path, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"}
    )


def _sniff_image_type(path: Path) -> str | None:
    """The MIME type of an image file from its first bytes (None: let the suffix decide)."""
    with path.open("rb") as handle:
        return sniffed_mime_type(handle.read(16))


@router.get("/v1/info", tags=["service"], responses=documented_errors(503))
async def info(holder: HolderDep, settings: SettingsDep) -> dict:
    """The model and collection being served, the catalogue's categories, and how large an
    uploaded photo may be (the page scales a larger one down before sending it)."""
    async with holder.use() as pair:
        return {
            **pair.describe(),
            "categories": pair.metadata.get("categories", []),
            "canary": pair.canary,
            "drift": pair.drift.describe(),
            "upload_limits": {
                "max_bytes": settings.max_upload_bytes,
                "max_pixels": settings.max_upload_pixels,
            },
        }


@router.post(
    "/v1/admin/products",
    tags=["admin"],
    status_code=201,
    responses=documented_errors(400, 401, 403, 409, 413, 415, 422, 503),
)
async def add_product(
    request: Request,
    _: AdminDep,
    holder: HolderDep,
    store: StoreDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    image: Annotated[UploadFile, File()],
    # The collection's own limits (its schema); the catalogue's rules, checked below, may be
    # narrower.
    product_id: Annotated[str, Form(min_length=1, max_length=512)],
    category: Annotated[str, Form(min_length=1, max_length=512)],
    title: Annotated[str, Form(min_length=1, max_length=4096)],
    price: Annotated[float, Form(ge=0, allow_inf_nan=False)],
) -> dict:
    """Add (or replace) one photo of a product in the live collection; searchable at once.

    The fields are held to the catalogue's rules (what the nightly validation accepts); the
    product's other photos take the fields sent, and the new photo takes their extra
    catalogue fields. A photo that is already another product's is refused (409), as the
    validation step refuses a duplicate image."""
    await _refuse_repeated_parts(request, ("image", "product_id", "category", "title", "price"))
    data = await _read_upload(image, settings)
    timings: dict[str, float] = {}
    product_id, category, title = stripped(product_id), stripped(category), stripped(title)
    async with holder.use() as pair:
        rules = CatalogueRules.of_metadata(pair.metadata)
        _apply_rules(rules.check_product_id, product_id)
        _apply_rules(rules.check_fields, category, title, price)
        vector, key = await _embed_upload(pair, data, image.content_type, settings, timings, rules)
        async with holder.admin_lock:  # see PairHolder.admin_lock
            owner = await asyncio.to_thread(store.row_by_image, pair.collection, key)
            if owner is not None and owner["product_id"] != product_id:
                raise ApiError(
                    409,
                    "image_of_another_product",
                    f"this photo is already image {key} of product {owner['product_id']!r}: "
                    "remove it there first, or send another photo",
                )
            _check_live_fits(pair, category)
            folder = Path(settings.upload_dir)
            await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
            path = (folder / f"{key}.img").resolve()
            await asyncio.to_thread(path.write_bytes, data)
            # The product's other photos take the fields just sent (one product, one price),
            # and the new photo their extra fields.
            fields = {"category": category, "title": title, "price": price}
            before, _changed = await asyncio.to_thread(
                store.update_product, pair.collection, product_id, fields
            )
            row = {
                **_extras_of(before),
                "image_id": key,
                "product_id": product_id,
                **fields,
                "image_uri": str(path),
                "embedding": vector,
            }
            await asyncio.to_thread(store.upsert, pair.collection, [row])
            await _catalogue_changed(holder, pair, store, metrics, before, gained=category)
        return {"product_id": product_id, "image_id": key, "collection": pair.collection}


def _apply_rules(check: Any, *args: Any) -> None:
    try:
        check(*args)
    except RuleBroken as err:
        raise ApiError(422, err.code, err.message) from err


async def _refuse_repeated_parts(request: Request, names: tuple[str, ...]) -> None:
    """One value per field: a second photo or product id in one request would otherwise be
    dropped without a word (the form is parsed once; this reads FastAPI's parse)."""
    form = await request.form()
    for name in names:
        if len(form.getlist(name)) > 1:
            raise ApiError(422, "repeated_field", f"send one {name!r} per request (got several)")


def _extras_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The extra catalogue fields (brand...) of a product's photos, for a new photo of it."""
    own = {"image_id", "embedding", "image_path", *OUTPUT_FIELDS}
    extras: dict[str, Any] = {}
    for row in rows:  # dynamic fields come flat or under $meta, by Milvus version
        fields = {**row, **(row.get("$meta") or {})}
        extras.update({k: v for k, v in fields.items() if k not in own})
    return extras


def _live_record(categories: set[str]) -> dict[str, Any]:
    """What the service records of a collection's catalogue after admin changes."""
    return {"categories": sorted(categories), "changed_at": datetime.now(UTC).isoformat()}


def _check_live_fits(pair: ServingPair, gained: str) -> None:
    """Refuse, before anything is written, a new category the collection's record of its
    categories has no room for (one metadata document; see _catalogue_changed)."""
    categories = set(pair.metadata.get("categories", []))
    if not gained or gained in categories:
        return
    if len(metadata_value(_live_record(categories | {gained}))) > META_VALUE_CHARS:
        raise ApiError(
            422,
            "too_many_categories",
            f"no room to record another category ({len(categories)} are recorded): use an "
            "existing category, or add it to the catalogue for the next night's build",
        )


@router.patch(
    "/v1/admin/products/{product_id:path}",
    tags=["admin"],
    responses=documented_errors(401, 403, 404, 422, 503),
)
async def update_product(
    product_id: str,
    update: ProductUpdate,
    _: AdminDep,
    holder: HolderDep,
    store: StoreDep,
    metrics: MetricsDep,
) -> dict:
    """Change a product's catalogue fields (category, title, price) on all its photos in the
    live collection, without re-embedding: the next search filters and shows the new ones."""
    fields = {
        name: stripped(value) if isinstance(value, str) else value
        for name, value in update.model_dump(exclude_none=True).items()
    }
    if not fields:
        raise ApiError(422, "nothing_to_update", "send at least one of category, title, price")
    async with holder.use() as pair, holder.admin_lock:
        rules = CatalogueRules.of_metadata(pair.metadata)
        _apply_rules(rules.check_fields, *(fields.get(k) for k in ("category", "title", "price")))
        _check_live_fits(pair, fields.get("category", ""))
        before, changed = await asyncio.to_thread(
            store.update_product, pair.collection, product_id, fields
        )
        if not before:
            raise ApiError(404, "unknown_product", f"no product {product_id!r}")
        await _catalogue_changed(
            holder, pair, store, metrics, before, gained=fields.get("category", "")
        )
    return {"product_id": product_id, "updated_images": changed, **fields}


@router.delete(
    "/v1/admin/products/{product_id:path}",
    tags=["admin"],
    responses=documented_errors(401, 403, 404, 422, 503),
)
async def remove_product(
    product_id: str, _: AdminDep, holder: HolderDep, store: StoreDep, metrics: MetricsDep
) -> dict:
    """Remove every photo of a product from the live collection."""
    async with holder.use() as pair, holder.admin_lock:
        removed = await asyncio.to_thread(store.delete_product, pair.collection, product_id)
        if not removed:
            raise ApiError(404, "unknown_product", f"no product {product_id!r}")
        await _catalogue_changed(holder, pair, store, metrics, removed)
    return {"product_id": product_id, "removed_images": len(removed)}


async def _catalogue_changed(
    holder: Any,
    pair: ServingPair,
    store: Any,
    metrics: Any,
    before: list[dict[str, Any]],
    gained: str = "",
) -> None:
    """Keep what the service reports of its collection true after an admin change (call under
    ``holder.admin_lock``): the row count (``/readyz``, ``/v1/info``,
    ``vitrine_collection_rows``) and the categories the page offers as a filter (a category
    goes once no row has it). ``before``: the changed product's rows as they were;
    ``gained``: a category it has now. The categories are also recorded with the collection
    (``live``), so a restart, a rollout or another replica loading it sees them."""
    rows = await asyncio.to_thread(store.count, pair.collection)
    categories = set(pair.metadata.get("categories", []))
    if gained:
        categories.add(gained)
    for category in {str(row.get("category", "")) for row in before} - {gained, ""}:
        expr = milvus_filter(category)
        if not await asyncio.to_thread(store.has_rows, pair.collection, expr):
            categories.discard(category)
    live = _live_record(categories)
    await asyncio.to_thread(store.set_metadata, pair.collection, live, LIVE_METADATA)
    # The request's pair, and the current one if a rollout onto the same collection swapped
    # it in meanwhile (this change then reached the collection after the new pair read it).
    current = holder.current
    for served in (pair, current):
        if served is not None and served.collection == pair.collection:
            served.metadata = {**served.metadata, "rows": rows, "categories": live["categories"]}
    if current is not None and current.collection == pair.collection:
        metrics.collection_rows.set(rows)


@router.post(
    "/v1/admin/rollout",
    tags=["admin"],
    responses=documented_errors(401, 403, 404, 409, 422, 503),
)
async def rollout(
    _: AdminDep,
    holder: HolderDep,
    store: StoreDep,
    metrics: MetricsDep,
    body: RolloutRequest | None = None,
) -> dict:
    """Serve the collection the alias points at (or the one named) with the model that built
    it: load and warm the model, then switch model and collection together."""
    from model.package import ModelPackageError

    previous = holder.current.describe() if holder.current else None
    wanted = body.collection if body else None
    # Only a collection the store lists: any other name would make Milvus Lite create an
    # empty database for it (and a name is a path there).
    if wanted is not None and wanted not in await asyncio.to_thread(store.collections):
        metrics.rollouts.labels("refused").inc()
        raise ApiError(404, "unknown_collection", f"no collection {wanted!r} to roll out")
    try:
        new, _old = await holder.rollout(wanted)
    except (LookupError, ModelPackageError, ValueError) as err:
        metrics.rollouts.labels("refused").inc()
        raise ApiError(409, "rollout_refused", f"{err}; still serving the previous pair") from err
    except StoreError:  # Milvus unreachable (503): the previous pair goes on all the same
        metrics.rollouts.labels("refused").inc()
        raise
    metrics.rollouts.labels("done").inc()
    metrics.set_serving(
        new.model_version, new.collection, new.spec.index_type, new.metadata.get("rows", 0)
    )
    return {"serving": new.describe(), "previous": previous}


@router.post(
    "/v1/admin/canary", tags=["admin"], responses=documented_errors(401, 403, 409, 422, 503)
)
async def canary(_: AdminDep, holder: HolderDep, store: StoreDep, metrics: MetricsDep) -> dict:
    """Run the recall canary now (it also runs every ``VITRINE_CANARY_INTERVAL_S``)."""
    return await run_canary_once(holder, store, metrics)


async def run_canary_once(holder: Any, store: Any, metrics: Any) -> dict:
    """Run the canary on the current pair, keep and export its result."""
    from serving.canary import run_canary

    async with holder.use() as pair:
        if not (pair.metadata.get("canary") or {}).get("probes"):
            raise ApiError(409, "no_canary", f"collection {pair.collection} has no probe set")
        result = await run_canary(pair, store)
        pair.canary = result
        metrics.set_canary(result, holder.settings.canary_tolerance)
        return result


@router.get("/healthz", tags=["service"])
async def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", tags=["service"])
async def readyz(holder: HolderDep, store: StoreDep, metrics: MetricsDep) -> JSONResponse:
    """Ready when a model and collection are loaded and Milvus answers."""
    ready, reason = await check_readiness(holder, store, metrics)
    body: dict[str, Any] = {"ready": ready}
    if holder.current is not None:
        body.update(holder.current.describe())
    if not ready:
        body["reason"] = reason
    return JSONResponse(body, status_code=200 if ready else 503)


async def check_readiness(holder: Any, store: Any, metrics: Any) -> tuple[bool, str]:
    """Whether the service can answer searches now, and why not; sets ``vitrine_ready`` (the
    service also calls this every few seconds, so the gauge moves without /readyz calls)."""
    if holder.current is None:
        reason = holder.last_error or "nothing loaded yet"
    else:
        # Held like a request's: a rollout does not retire the pair (and close its
        # collection) while it is being checked, which would open it again.
        async with holder.use() as pair:
            reason = await asyncio.to_thread(store.why_not_ready, pair.collection)
    metrics.ready.set(0 if reason else 1)
    return not reason, reason


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    pair = request.app.state.holder.current
    if pair is not None:
        request.app.state.metrics.set_drift(pair.drift.describe())
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    """The merchandiser page."""
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))
