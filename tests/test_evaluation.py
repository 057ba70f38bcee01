"""Recall@K and MAP@R against hand-worked cases and a brute-force loop."""

from __future__ import annotations

import numpy as np
import pytest

from model.evaluation import brute_force_recall_at_k, exact_search, retrieval_metrics


def _clustered(n: int, dim: int, classes: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, size=n)
    x = centres[labels] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_hand_worked_inshop_case():
    # Gallery on the unit circle at 0, 90, 180 degrees with classes a, b, a.
    gallery = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    gallery_labels = np.array([0, 1, 0])
    # Query of class 0 at 80 degrees: order by cosine is 90 (b), 0 (a), 180 (a).
    angle = np.deg2rad(80)
    query = np.array([[np.cos(angle), np.sin(angle)]], dtype=np.float32)
    m = retrieval_metrics(query, np.array([0]), gallery, gallery_labels, ks=(1, 2, 3))
    assert m["recall@1"] == 0.0
    assert m["recall@2"] == 1.0
    # R = 2 relevant; ranks 1..2 are (miss, hit): AP@R = (0 + 1/2) / 2 = 0.25.
    assert m["map@r"] == pytest.approx(0.25)
    assert m["num_queries"] == 1


def test_sop_protocol_never_matches_self():
    # Two classes of two points each; every point's nearest *other* point is of the other class.
    x = np.array([[1, 0], [0, 1], [0.9, 0.1], [0.1, 0.9]], dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.array([0, 0, 1, 1])
    m = retrieval_metrics(x, labels, x, labels, ks=(1, 3), same_set=True)
    assert m["recall@1"] == 0.0  # without self-exclusion this would be 1.0
    assert m["recall@3"] == 1.0


@pytest.mark.parametrize("same_set", [False, True])
def test_recall_matches_brute_force(same_set: bool):
    q, ql = _clustered(300, 16, 20, noise=1.2, seed=1)
    g, gl = (q, ql) if same_set else _clustered(500, 16, 20, noise=1.2, seed=1)
    metrics = retrieval_metrics(q, ql, g, gl, ks=(1, 5, 10), same_set=same_set)
    for k in (1, 5, 10):
        expected = brute_force_recall_at_k(q, ql, g, gl, k, same_set=same_set)
        assert metrics[f"recall@{k}"] == pytest.approx(expected)
    assert 0.0 < metrics["recall@1"] < 1.0  # a case that can fail either way


def test_chunked_equals_single_pass():
    q, ql = _clustered(400, 8, 10, noise=1.0, seed=2)
    whole = retrieval_metrics(q, ql, q, ql, ks=(1, 10, 100), same_set=True, query_chunk=10_000)
    chunked = retrieval_metrics(
        q,
        ql,
        q,
        ql,
        ks=(1, 10, 100),
        same_set=True,
        query_chunk=37,
        search=exact_search(q, chunk_elements=1000),
    )
    assert chunked == whole


def test_search_is_an_argument():
    """A search that returns the worst neighbours first gives a lower recall than exact search."""
    q, ql = _clustered(200, 8, 10, noise=0.5, seed=3)

    def reversed_search(queries: np.ndarray, k: int) -> np.ndarray:
        return np.argsort(queries @ q.T, axis=1)[:, :k]  # ascending similarity: farthest first

    exact = retrieval_metrics(q, ql, q, ql, ks=(1,), same_set=False)
    worst = retrieval_metrics(q, ql, q, ql, ks=(1,), same_set=False, search=reversed_search)
    assert exact["recall@1"] == 1.0  # every query finds itself
    assert worst["recall@1"] < 0.2


def test_ks_beyond_gallery_are_left_out_and_singletons_counted():
    x = np.eye(3, dtype=np.float32)
    labels = np.array([0, 0, 1])  # class 1 has no other member under the SOP protocol
    m = retrieval_metrics(x, labels, x, labels, ks=(1, 2, 1000), same_set=True)
    assert "recall@1000" not in m
    assert m["queries_without_match"] == 1
    assert m["num_queries"] == 2


def test_map_at_r_perfect_and_worst():
    q, ql = _clustered(100, 8, 5, noise=0.0, seed=4)  # identical points per class
    assert retrieval_metrics(q, ql, q, ql, ks=(1,), same_set=True)["map@r"] == pytest.approx(1.0)
