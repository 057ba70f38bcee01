"""Search logic between the routes and the store: filters, grouping by product, results."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from typing import Any

import numpy as np

from serving.batching import notify
from serving.pair import ServingPair
from serving.store import VectorStore, quote

# Hits fetched per product asked for, at first: a product has several photos and results are
# per product. A page that fills up without giving enough products is fetched again, deeper.
# A Milvus Lite search costs about 15 us per hit returned besides its fixed cost (480 rows:
# 1.7 ms for 12 hits, 2.3 for 48, 3.0 for 96; 2.8, 3.3 and 4.8 ms with Lite's own executor,
# see serving/lite_search.py).
HITS_PER_RESULT = 4
MAX_FETCH = 16384


def milvus_filter(
    category: str | None = None,
    price_min: float | None = None,
    price_max: float | None = None,
    exclude_product: str | None = None,
) -> str:
    """A Milvus boolean expression for the catalogue filters."""
    parts = []
    if category:
        parts.append(f"category == {quote(category)}")
    if price_min is not None:
        parts.append(f"price >= {float(price_min)!r}")
    if price_max is not None:
        parts.append(f"price <= {float(price_max)!r}")
    if exclude_product:
        parts.append(f"product_id != {quote(exclude_product)}")
    return " and ".join(parts)


def best_per_product(hits: list[dict[str, Any]], top_k: int) -> list[dict[str, Any]]:
    """The best-scoring image of each product, in score order, at most ``top_k``."""
    seen: set[str] = set()
    results = []
    for hit in hits:
        if hit["product_id"] in seen:
            continue
        seen.add(hit["product_id"])
        results.append(hit)
        if len(results) == top_k:
            break
    return results


def image_url(hit: dict[str, Any]) -> str:
    """Where a browser can fetch the result's image."""
    uri = str(hit.get("image_uri", ""))
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return f"/v1/images/{urllib.parse.quote(str(hit['image_id']), safe='')}"


def shape_result(hit: dict[str, Any]) -> dict[str, Any]:
    core = {"product_id", "image_id", "score", "title", "category", "price", "image_uri"}
    return {
        "product_id": hit["product_id"],
        "image_id": hit["image_id"],
        "score": round(float(hit["score"]), 6),
        "title": hit.get("title", ""),
        "category": hit.get("category", ""),
        "price": float(hit.get("price", 0.0)),
        "image_url": image_url(hit),
        "extra": {k: v for k, v in hit.items() if k not in core and k != "image_path"},
    }


def first_depth(top_k: int) -> int:
    """Hits :func:`products_near` fetches first for ``top_k`` products."""
    return min(MAX_FETCH, top_k * HITS_PER_RESULT)


def page_is_final(results: list, hits: list, depth: int, top_k: int) -> bool:
    """Whether ``hits`` fetched ``depth`` deep answer ``top_k`` products: they hold enough,
    or there are no more to fetch."""
    return len(results) == top_k or len(hits) < depth or depth == MAX_FETCH


def products_near(
    store: VectorStore,
    collection: str,
    vector: np.ndarray,
    top_k: int,
    spec: Any,
    filter_expr: str = "",
    depth: int | None = None,
) -> list[dict[str, Any]]:
    """The best hit of each of the ``top_k`` products nearest to ``vector``, best first.

    Fetches ``top_k * HITS_PER_RESULT`` hits (or ``depth``); while they fill the page but
    hold fewer than ``top_k`` products (one product's photos crowding the top), fetches again
    twice as deep, up to ``MAX_FETCH``. Fewer than ``top_k`` results means the collection (or
    the filter) has no more products.
    """
    depth = depth or first_depth(top_k)
    while True:
        hits = store.search(collection, vector[None, :], depth, spec, filter_expr)[0]
        results = best_per_product(hits, top_k)
        if page_is_final(results, hits, depth, top_k):
            return results
        depth = min(MAX_FETCH, 2 * depth)


async def search_vector(
    store: VectorStore,
    pair: ServingPair,
    vector: np.ndarray,
    top_k: int,
    filter_expr: str,
    timings: dict[str, float],
) -> list[dict[str, Any]]:
    """Search the pair's collection and return ``top_k`` products, best first.

    As :func:`products_near` does, but the first search goes through the pair's
    :class:`~serving.search_batching.SearchBatcher`, with the concurrent searches like it.
    """
    started = time.perf_counter()
    depth = first_depth(top_k)
    hits = await pair.searcher.search(pair.collection, vector, depth, pair.spec, filter_expr)
    found = best_per_product(hits, top_k)
    if not page_is_final(found, hits, depth, top_k):
        found = await asyncio.to_thread(
            products_near, store, pair.collection, vector, top_k, pair.spec, filter_expr,
            min(MAX_FETCH, 2 * depth),
        )  # fmt: skip
    timings["search"] = time.perf_counter() - started
    return _shaped(found, timings)


def search_here(
    pair: ServingPair, store: VectorStore, vector: np.ndarray, top_k: int, *,
    filter_expr: str, timings: dict[str, float],
) -> list[dict[str, Any]]:  # fmt: skip
    """As :func:`search_vector`, on the calling thread and without the search batcher: the
    search of a lone request, done in its one job (see ``MicroBatcher.run_alone``)."""
    started = time.perf_counter()
    notify(pair.searcher.on_call, 1)
    found = products_near(store, pair.collection, vector, top_k, pair.spec, filter_expr)
    timings["search"] = time.perf_counter() - started
    return _shaped(found, timings)


def _shaped(found: list[dict[str, Any]], timings: dict[str, float]) -> list[dict[str, Any]]:
    """The results as the API answers them; ``timings["fetch"]``: the seconds it took."""
    started = time.perf_counter()
    results = [shape_result(hit) for hit in found]
    timings["fetch"] = time.perf_counter() - started
    return results
