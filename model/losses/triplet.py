"""Triplet margin loss, averaged per query over its active triplets (seed paper 001, eq. 4).

For mined triplets ``(a, p, n)`` with distances ``d``::

    l(a, p, n) = max(0, d(a, p) - d(a, n) + margin)
    L = (1 / |A|) * sum_{a in A} mean_{(p, n) : l(a, p, n) > 0} l(a, p, n)

where ``A`` is the set of anchors (queries) with at least one active (``> 0``) triplet. Triplets
that already satisfy the margin contribute nothing and are not counted in the averages.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from model.distances import DistanceKind
from model.losses.base import MetricLoss, mean_per_anchor
from model.mining import TripletMining, check_mining, mine_triplets


class TripletLoss(MetricLoss):
    """Triplet margin loss with in-batch mining.

    Args:
        margin: Required gap ``d(a, n) - d(a, p)``; must be ``>= 0``.
        distance: Distance between normalised embeddings (``model.distances``).
        mining: ``"all"``, ``"semihard"`` or ``"hard"`` (``model.mining``).
    """

    def __init__(
        self,
        margin: float = 0.1,
        distance: DistanceKind = "euclidean",
        mining: TripletMining = "all",
    ) -> None:
        super().__init__(distance)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        check_mining(mining)
        self.margin = float(margin)
        self.mining: TripletMining = mining

    def mine(self, dist: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Anchor, positive and negative indices of this loss's mined triplets."""
        return mine_triplets(dist, labels, self.mining, self.margin)

    def margin_term(self, dist: Tensor, a: Tensor, p: Tensor, n: Tensor) -> Tensor:
        """Per-query mean over active triplets of ``relu(d(a, p) - d(a, n) + margin)``."""
        hinge = F.relu(dist[a, p] - dist[a, n] + self.margin)
        return mean_per_anchor(hinge, a, len(dist))

    def compute(self, dist: Tensor, labels: Tensor, embeddings: Tensor) -> Tensor:
        """Triplet margin term over the mined triplets."""
        a, p, n = self.mine(dist, labels)
        return self.margin_term(dist, a, p, n)
