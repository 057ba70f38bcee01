"""EIR (AAAI 2026): Enhanced Confusing-Triplet Loss (ECTEL) on the spherical distance.

Only the method's idea is public, so this module fixes its own formula. ``d`` is the geodesic
distance ``arccos(<x, y>)`` between L2-normalised embeddings (radians, in ``[0, pi]``) and
``(a, p, n)`` the mined triplets::

    triplet(a, p, n)   = relu(d(a, p) - d(a, n) + margin)                       (TripletLoss)
    satisfied(a, p, n) = d(a, n) >= d(a, p) + margin                   (triplet term is 0)
    confusing(a, p, n) = relu(d(a, p) + confusing_margin - d(p, n))  on satisfied triplets only

    L = R(triplet) + confusing_weight * R(confusing)

where ``R`` is the shared reduction: per anchor, the mean over its active (``> 0``) values, then
the mean over the anchors that have any (``model.losses.base.mean_per_anchor``); 0 if none.

Why these choices:

* A *confusing* triplet already satisfies the margin as seen from the anchor, yet its negative
  sits close to the positive: ``n`` lies "behind" ``p``. The anchor ranks ``p`` before ``n``, but
  the two are not separated, so a small move of ``p`` (or a query near ``p``) mixes them up. The
  plain triplet loss is 0 on such a triplet and stops training on it.
* The condition compares ``d(p, n)`` with ``d(a, p)``: the negative must be at least as far from
  the positive as the anchor is, plus ``confusing_margin``. That is the triplet constraint seen
  from the positive, scaled by the class's own spread ``d(a, p)`` rather than by an absolute
  radius, so tight and loose classes are treated alike. Its gradient pulls ``a`` to ``p`` (lower
  ``d(a, p)``) and pushes ``n`` away from ``p`` (higher ``d(p, n)``).
* It is restricted to margin-satisfied triplets because violating triplets are already driven by
  the triplet term; applying the confusing penalty to all triplets would count the hard ones twice
  and let them dominate the gradient.

Interactions worth knowing:

* With ``mining="all"`` the swapped triplet ``(p, a, n)`` is mined too, and when
  ``confusing_margin == margin`` its triplet hinge equals ``confusing(a, p, n)``. The confusing term
  then acts as an extra weight (grouped under anchor ``a``) on negatives that are easy for ``a`` but
  hard for ``p``, which is the emphasis the method asks for. With ``mining="hard"`` the swapped
  triplet is usually not mined, and the term adds a constraint the triplet term lacks.
* The default ``confusing_margin`` (0.2) is twice the triplet ``margin`` (0.1), so the term asks
  more of the positive's side than the swapped triplet already does: it pushes the class
  boundary further out instead of only re-weighting the same hinge.
* With ``mining="semihard"`` every mined triplet violates the margin, so the confusing term is
  always 0; use ``"all"`` or ``"hard"``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from model.distances import DistanceKind
from model.losses.base import mean_per_anchor
from model.losses.triplet import TripletLoss
from model.mining import TripletMining


class ECTELLoss(TripletLoss):
    """Triplet loss plus a penalty on margin-satisfied triplets whose negative hugs the positive.

    Args:
        margin: Triplet margin (radians for the spherical distance).
        confusing_margin: Required gap ``d(p, n) - d(a, p)`` on satisfied triplets.
        confusing_weight: Weight of the confusing term.
        distance: Distance between normalised embeddings; EIR uses ``"spherical"``.
        mining: ``"all"``, ``"semihard"`` or ``"hard"`` (``model.mining``).
    """

    def __init__(
        self,
        margin: float = 0.1,
        confusing_margin: float = 0.2,
        confusing_weight: float = 1.0,
        distance: DistanceKind = "spherical",
        mining: TripletMining = "all",
    ) -> None:
        super().__init__(margin=margin, distance=distance, mining=mining)
        self.confusing_margin = float(confusing_margin)
        self.confusing_weight = float(confusing_weight)

    def confusing_term(self, dist: Tensor, a: Tensor, p: Tensor, n: Tensor) -> Tensor:
        """Reduced ``relu(d(a, p) + confusing_margin - d(p, n))`` over margin-satisfied triplets."""
        d_ap, d_an, d_pn = dist[a, p], dist[a, n], dist[p, n]
        satisfied = (d_an >= d_ap + self.margin).detach()
        penalty = F.relu(d_ap + self.confusing_margin - d_pn) * satisfied.to(dist.dtype)
        return mean_per_anchor(penalty, a, len(dist))

    def compute(self, dist: Tensor, labels: Tensor, embeddings: Tensor) -> Tensor:
        """Triplet term plus weighted confusing term over the same mined triplets."""
        a, p, n = self.mine(dist, labels)
        loss = self.margin_term(dist, a, p, n)
        if self.confusing_weight:
            loss = loss + self.confusing_weight * self.confusing_term(dist, a, p, n)
        return loss


EIRLoss = ECTELLoss
"""EIR's training loss: :class:`ECTELLoss` (spherical distance by default)."""
