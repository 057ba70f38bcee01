"""Retrieval metrics: Recall@K and MAP@R under the SOP and In-Shop protocols.

Plain functions over arrays. The nearest-neighbour search is an argument (:data:`SearchFn`), so
the same code scores exact search, FAISS or a Milvus collection. Queries are processed in
chunks and only per-query scalars are kept, so memory stays bounded at 100K x 100K.

Definitions (as in the metric-learning literature and pytorch-metric-learning):

* Recall@K: fraction of queries with at least one item of their class among the K nearest
  gallery items (Recall@1 is pytorch-metric-learning's ``precision_at_1``).
* MAP@R (Musgrave et al., "A Metric Learning Reality Check", 2020): with R the number of gallery
  items of the query's class, AP@R = (1/R) * sum_{i<=R} P(i) * rel(i), averaged over queries.

Protocols: SOP — every test image queries all *other* test images (``same_set=True``);
In-Shop — query images search the gallery only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

# (query embeddings [q, D], k) -> gallery indices [q, k], nearest first.
SearchFn = Callable[[np.ndarray, int], np.ndarray]

SOP_KS: tuple[int, ...] = (1, 10, 100, 1000)
INSHOP_KS: tuple[int, ...] = (1, 10, 20, 30, 40)

# Similarity entries computed at once by exact search (about 256 MB of float32).
_CHUNK_ELEMENTS = 64 * 1024 * 1024


def exact_search(gallery: np.ndarray, chunk_elements: int = _CHUNK_ELEMENTS) -> SearchFn:
    """Exact inner-product search over ``gallery`` (L2-normalised rows => cosine ranking)."""
    gallery_t = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32))

    def search(queries: np.ndarray, k: int) -> np.ndarray:
        k = min(k, len(gallery_t))
        queries_t = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        rows = max(1, chunk_elements // max(1, len(gallery_t)))
        out = np.empty((len(queries_t), k), dtype=np.int64)
        for start in range(0, len(queries_t), rows):
            sims = queries_t[start : start + rows] @ gallery_t.T
            out[start : start + rows] = torch.topk(sims, k, dim=1).indices.numpy()
        return out

    return search


def _drop_self(neighbours: np.ndarray, self_index: np.ndarray) -> np.ndarray:
    """Remove each query's own gallery index from its neighbour list (keeps one column less)."""
    is_self = neighbours == self_index[:, None]
    # Rows where the query is absent lose their last column instead.
    is_self[~is_self.any(axis=1), -1] = True
    return neighbours[~is_self].reshape(len(neighbours), neighbours.shape[1] - 1)


def retrieval_metrics(
    query_embeddings: np.ndarray,
    query_labels: np.ndarray,
    gallery_embeddings: np.ndarray,
    gallery_labels: np.ndarray,
    ks: Sequence[int],
    *,
    same_set: bool = False,
    search: SearchFn | None = None,
    query_chunk: int = 4096,
) -> dict[str, float]:
    """Recall@K for each K in ``ks`` and MAP@R.

    Args:
        query_embeddings: ``[Q, D]`` L2-normalised query embeddings.
        query_labels: ``[Q]`` class of each query.
        gallery_embeddings: ``[G, D]`` L2-normalised gallery embeddings.
        gallery_labels: ``[G]`` class of each gallery item.
        ks: the K values to report; those larger than the gallery are left out.
        same_set: queries are the gallery itself (SOP protocol): query ``i`` is gallery item
            ``i`` and is never its own neighbour.
        search: nearest-neighbour search over the gallery; exact search when None.
        query_chunk: queries searched at once.

    Returns:
        ``{"recall@K": ..., "map@r": ..., "num_queries": ..., "queries_without_match": ...}``;
        queries whose class has no other gallery item are counted, not scored.
    """
    query_labels = np.asarray(query_labels)
    gallery_labels = np.asarray(gallery_labels)
    if same_set and len(query_labels) != len(gallery_labels):
        raise ValueError("same_set needs queries and gallery to be the same items")
    search = search or exact_search(gallery_embeddings)
    usable = len(gallery_labels) - int(same_set)
    ks = sorted({k for k in ks if k <= usable})
    # R per query: gallery items of its class (minus itself under the SOP protocol).
    classes, counts = np.unique(gallery_labels, return_counts=True)
    class_count = dict(zip(classes.tolist(), counts.tolist(), strict=True))
    relevant = np.array([class_count.get(q, 0) for q in query_labels.tolist()]) - int(same_set)
    max_r = int(relevant.max(initial=0))
    depth = min(max(max(ks, default=1), max_r), usable)

    first_hit = np.full(len(query_labels), np.iinfo(np.int64).max, dtype=np.int64)
    average_precision = np.zeros(len(query_labels), dtype=np.float64)
    for start in range(0, len(query_labels), query_chunk):
        stop = min(start + query_chunk, len(query_labels))
        neighbours = search(query_embeddings[start:stop], depth + int(same_set))
        if same_set:
            neighbours = _drop_self(neighbours, np.arange(start, stop))
        hits = gallery_labels[neighbours] == query_labels[start:stop, None]  # [q, depth]
        any_hit = hits.any(axis=1)
        first_hit[start:stop] = np.where(any_hit, hits.argmax(axis=1), first_hit[start:stop])
        average_precision[start:stop] = _ap_at_r(hits, relevant[start:stop])

    scored = relevant > 0
    n = int(scored.sum())
    metrics: dict[str, float] = {
        f"recall@{k}": float((first_hit[scored] < k).mean()) if n else 0.0 for k in ks
    }
    metrics["map@r"] = float(average_precision[scored].mean()) if n else 0.0
    metrics["num_queries"] = n
    metrics["queries_without_match"] = int((~scored).sum())
    return metrics


def _ap_at_r(hits: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """AP@R per row of a hit matrix, each row cut at its own R."""
    ranks = np.arange(1, hits.shape[1] + 1)
    within_r = ranks[None, :] <= relevant[:, None]
    hits = hits & within_r
    precision_at_i = np.cumsum(hits, axis=1) / ranks[None, :]
    total = (precision_at_i * hits).sum(axis=1)
    return np.divide(total, relevant, out=np.zeros(len(relevant)), where=relevant > 0)


def brute_force_recall_at_k(
    query_embeddings: np.ndarray,
    query_labels: np.ndarray,
    gallery_embeddings: np.ndarray,
    gallery_labels: np.ndarray,
    k: int,
    same_set: bool = False,
) -> float:
    """Reference Recall@K with a plain loop over queries (for tests; O(Q*G))."""
    found = total = 0
    for i, (query, label) in enumerate(zip(query_embeddings, query_labels, strict=True)):
        sims = gallery_embeddings @ query
        order = [j for j in np.argsort(-sims, kind="stable") if not (same_set and j == i)]
        if not any(gallery_labels[j] == label for j in order):
            continue
        total += 1
        found += any(gallery_labels[j] == label for j in order[:k])
    return found / total if total else 0.0
