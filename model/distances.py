"""Distances between L2-normalised embeddings.

All three kinds are monotone functions of the cosine similarity on the unit sphere, so they rank
neighbours identically; they differ in how a loss "feels" them:

* ``cosine``:    d = 1 - cos(x, y)                     in [0, 2]
* ``euclidean``: d = ||x - y|| = sqrt(2 - 2 cos(x, y)) in [0, 2]
* ``spherical``: d = arccos(cos(x, y))                 in [0, pi]   (EIR's geodesic distance)

The spherical distance is the length of the great-circle arc between the two points; unlike the
chord (euclidean) its gradient does not vanish as two embeddings become antipodal, and it is the
distance the EIR paper (AAAI 2026) uses for both training and retrieval.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DistanceKind = Literal["cosine", "euclidean", "spherical"]
DISTANCE_KINDS: tuple[str, ...] = ("cosine", "euclidean", "spherical")

# arccos has an infinite derivative at +-1; clamping keeps gradients finite for identical points.
_ACOS_EPS = 1e-6


def cosine_similarity_matrix(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity of every row of ``x`` with every row of ``y`` (``x`` itself if None)."""
    x = F.normalize(x, dim=-1)
    y = x if y is None else F.normalize(y, dim=-1)
    return x @ y.T


def distance_from_similarity(sim: torch.Tensor, kind: DistanceKind) -> torch.Tensor:
    """Turn cosine similarities of unit vectors into distances of the given kind."""
    if kind == "cosine":
        return 1.0 - sim
    if kind == "euclidean":
        # sqrt has an infinite derivative at 0 (a point and itself): keep a small floor.
        return torch.sqrt(torch.clamp(2.0 - 2.0 * sim, min=1e-12))
    if kind == "spherical":
        return torch.arccos(torch.clamp(sim, -1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
    raise ValueError(f"unknown distance {kind!r}; choose one of {', '.join(DISTANCE_KINDS)}")


def pairwise_distance(
    x: torch.Tensor, y: torch.Tensor | None = None, kind: DistanceKind = "euclidean"
) -> torch.Tensor:
    """Distance matrix ``[len(x), len(y)]`` between L2-normalised rows of ``x`` and ``y``."""
    return distance_from_similarity(cosine_similarity_matrix(x, y), kind)
