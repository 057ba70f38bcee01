"""What the index step records so the service can watch itself: the recall canary's probe set
and the reference for query-embedding drift.

Both are computed from the catalogue embeddings at index time and stored in the collection's
metadata, so every collection carries its own yardsticks:

* **canary**: one photo per product that has several (up to ``max_queries`` products). The
  service embeds each probe photo with the serving model, searches the live collection, drops
  the probe's own image from the hits and counts a success when another photo of the same
  product is in the top K products. ``expected`` is that same figure computed here by exact
  search over the stored embeddings: a healthy service reproduces it, a broken model, index or
  preprocessing falls below it.
* **drift**: the catalogue embeddings' mean and per-dimension standard deviation, and a
  threshold for the *standardised mean shift* of ``window`` recent queries: the root mean
  square over dimensions of (query mean − catalogue mean) / catalogue std. Raw cosine distances
  between centroids barely move, since every embedding shares a large common direction;
  standardising per dimension is what makes a shift visible. The threshold is what random
  samples of ``window`` catalogue images reach (drawn with replacement; mean + 4 standard
  deviations over 200 draws): queries that look like the catalogue stay under it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

CANARY_KS = (1, 10)
# Image hits fetched per product asked for: a fixed depth deep enough that the products found
# are those the service's adaptive search (serving.search.products_near) would answer.
HITS_PER_PRODUCT = 8


def canary_probes(
    rows: Sequence[dict[str, Any]], vectors: np.ndarray, max_queries: int = 100, seed: int = 0
) -> dict[str, Any]:
    """The probe set and its expected Recall@K (exact search over ``vectors``)."""
    by_product: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_product[row["product_id"]].append(i)
    eligible = sorted(p for p, idx in by_product.items() if len(idx) > 1)
    rng = np.random.default_rng(seed)
    chosen = (
        sorted(rng.choice(eligible, size=max_queries, replace=False).tolist())
        if len(eligible) > max_queries
        else eligible
    )
    queries = [min(by_product[p], key=lambda i: rows[i]["image_id"]) for p in chosen]
    probes = [
        {
            "image_id": rows[i]["image_id"],
            "product_id": rows[i]["product_id"],
            "image_uri": rows[i]["image_uri"],
        }
        for i in queries
    ]
    products = np.array([row["product_id"] for row in rows])
    expected = {f"recall@{k}": 0.0 for k in CANARY_KS}
    if queries:
        scores = vectors[queries] @ vectors.T
        scores[np.arange(len(queries)), queries] = -np.inf  # not the probe itself
        for row, query in enumerate(queries):
            depth = min(len(rows) - 1, max(CANARY_KS) * HITS_PER_PRODUCT)
            top = np.argpartition(-scores[row], depth - 1)[:depth] if depth > 0 else []
            ranked = products[sorted(top, key=lambda j: -scores[row, j])]
            found = rank_of_product(list(ranked), rows[query]["product_id"])
            for k in CANARY_KS:
                expected[f"recall@{k}"] += found is not None and found <= k
        expected = {key: value / len(queries) for key, value in expected.items()}
    return {"probes": probes, "expected": expected}


def rank_of_product(products_by_score: Sequence[str], product_id: str) -> int | None:
    """The 1-based rank of ``product_id`` among distinct products, best first, or None."""
    seen: set[str] = set()
    for product in products_by_score:
        if product == product_id:
            return len(seen) + 1
        seen.add(product)
    return None


def drift_reference(vectors: np.ndarray, window: int = 256, seed: int = 0) -> dict[str, Any]:
    """The catalogue's mean and spread, and the drift threshold for ``window`` queries."""
    mean = vectors.mean(axis=0)
    scale = vectors.std(axis=0)
    scale = scale + 1e-3 * float(scale.mean()) + 1e-12  # no division by a constant dimension
    rng = np.random.default_rng(seed)
    draws = (rng.choice(len(vectors), size=window, replace=True) for _ in range(200))
    shifts = [mean_shift(vectors[draw].mean(0), mean, scale) for draw in draws]
    threshold = float(np.mean(shifts) + 4 * np.std(shifts))
    return {
        "mean": [float(f"{v:.5g}") for v in mean],
        "scale": [float(f"{v:.5g}") for v in scale],
        "threshold": threshold,
        "window": window,
    }


def mean_shift(query_mean: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> float:
    """Root mean square over dimensions of ``(query_mean - mean) / scale``."""
    return float(np.sqrt(np.mean(((np.asarray(query_mean) - mean) / scale) ** 2)))
