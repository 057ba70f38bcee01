"""EET: Equidistant and Equidistributed Triplet loss (WWW 2020).

Three terms over the L2-normalised batch, ``d`` the chosen distance, ``(a, p, n)`` the mined
triplets ``T``::

    margin         = TripletLoss: per-query mean over active triplets of
                     relu(d(a, p) - d(a, n) + margin), then mean over queries with any
    equidistant    = (1 / |T|) * sum_{(a, p, n) in T} |d(a, n) - d(p, n)|
    equidistributed = -mean_c(m_c) + var_c(m_c)

    L = margin + equidistant_weight * equidistant + equidistributed_weight * equidistributed

Equidistant: the negative should be as far from the positive as from the anchor, so the two
"non-matching" distances of a triplet are made equal. For one fixed ``n`` this puts ``a`` and ``p``
on the same shell around ``n``; over the several negatives a pair meets in a batch the shells
intersect only where ``a`` and ``p`` are close, so the term pulls each pair together along the
directions that negatives see, with no margin to switch it off. It is averaged over *all* mined
triplets, satisfied or not, because it is meant to keep acting after the margin holds.

Equidistributed: over the ``C`` classes present in the batch, the centre of class ``c`` is
``mu_c = normalize(mean_{i: y_i = c} x_i)`` and ``m_c = min_{c' != c} d(mu_c, mu_c')`` its
distance to the nearest other centre. ``-mean_c(m_c)`` maximises the minimum inter-class distance;
``var_c(m_c)`` (population variance) makes those minima equal, i.e. spreads the classes uniformly.
We use the variance rather than the standard deviation because ``std`` has an infinite gradient
when all ``m_c`` are equal (the very state we aim for) and returns NaN there. This term is
negative, bounded below by ``-max d`` (``-2`` euclidean/cosine, ``-pi`` spherical), so the total
loss can be negative; only its gradient matters.

With fewer than two classes there is no triplet and no pair of centres: both extra terms are 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.distances import DistanceKind, pairwise_distance
from model.losses.base import graph_zero, safe_mean
from model.losses.triplet import TripletLoss
from model.mining import TripletMining


def equidistant_term(dist: Tensor, a: Tensor, p: Tensor, n: Tensor) -> Tensor:
    """Mean over triplets of ``|d(a, n) - d(p, n)|`` (graph-connected 0 without triplets)."""
    return safe_mean((dist[a, n] - dist[p, n]).abs())


def equidistributed_term(embeddings: Tensor, labels: Tensor, distance: DistanceKind) -> Tensor:
    """``-mean_c(m_c) + var_c(m_c)`` with ``m_c`` the distance from centre ``c`` to its nearest.

    Args:
        embeddings: L2-normalised embeddings, shape ``[B, D]``.
        labels: Class labels, shape ``[B]``.
        distance: Distance kind between class centres.

    Returns:
        Scalar; a graph-connected 0 when the batch holds fewer than two classes.
    """
    classes = labels.unique()
    if len(classes) < 2:
        return graph_zero(embeddings)
    members = (classes[:, None] == labels[None, :]).to(embeddings.dtype)  # [C, B]
    centres = F.normalize(members @ embeddings / members.sum(dim=1, keepdim=True), dim=1)
    d = pairwise_distance(centres, kind=distance)
    eye = torch.eye(len(classes), dtype=torch.bool, device=d.device)
    nearest = d.masked_fill(eye, torch.inf).min(dim=1).values
    return -nearest.mean() + nearest.var(unbiased=False)


class EETLoss(TripletLoss):
    """Triplet margin + equidistant + equidistributed constraints.

    Args:
        margin: Triplet margin.
        equidistant_weight: Weight of the ``|d(a, n) - d(p, n)|`` term.
        equidistributed_weight: Weight of the class-centre spreading term.
        distance: Distance between normalised embeddings (``model.distances``).
        mining: ``"all"``, ``"semihard"`` or ``"hard"`` (``model.mining``).
    """

    def __init__(
        self,
        margin: float = 0.1,
        # At 1.0 these two terms swamp the triplet term and overfit the training classes
        # (In-Shop R@1 71.8 on the Grocery photos); 0.1 gave 87.5 (README, Results).
        equidistant_weight: float = 0.1,
        equidistributed_weight: float = 0.1,
        distance: DistanceKind = "euclidean",
        mining: TripletMining = "all",
    ) -> None:
        super().__init__(margin=margin, distance=distance, mining=mining)
        self.equidistant_weight = float(equidistant_weight)
        self.equidistributed_weight = float(equidistributed_weight)

    def compute(self, dist: Tensor, labels: Tensor, embeddings: Tensor) -> Tensor:
        """Weighted sum of the three EET terms."""
        a, p, n = self.mine(dist, labels)
        loss = self.margin_term(dist, a, p, n)
        if self.equidistant_weight:
            loss = loss + self.equidistant_weight * equidistant_term(dist, a, p, n)
        if self.equidistributed_weight:
            spread = equidistributed_term(embeddings, labels, self.distance)
            loss = loss + self.equidistributed_weight * spread
        return loss
