"""Contrastive loss on cosine similarity plus the KoLeo spreading regulariser.

With ``x_i`` the L2-normalised embeddings, ``s_ij = <x_i, x_j>``, ``P = {(i, j): i < j, y_i = y_j}``
and ``N = {(i, j): i < j, y_i != y_j, s_ij > margin}`` (only *active* negatives)::

    contrastive = (1 / |P|) * sum_{(i, j) in P} (1 - s_ij)
                + (1 / |N|) * sum_{(i, j) in N} (s_ij - margin)

An empty ``P`` or ``N`` contributes 0. The KoLeo regulariser (Kozachenko-Leonenko entropy
estimator, Sablayrolles et al., ICLR 2019, as used in DINOv2) pushes each point away from its
nearest neighbour so the batch spreads over the sphere::

    koleo = -(1 / B) * sum_i log(min_{j != i} ||x_i - x_j||_2 + eps),   eps = 1e-8

    L = contrastive + koleo_weight * koleo

KoLeo ignores labels; it is what keeps a batch from collapsing to a few directions when the
positive term pulls classes together.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.distances import distance_from_similarity
from model.losses.base import MetricLoss, safe_mean

KOLEO_EPS = 1e-8


def koleo(similarity: Tensor, eps: float = KOLEO_EPS) -> Tensor:
    """KoLeo term ``-mean_i log(min_{j != i} ||x_i - x_j|| + eps)`` from unit-vector cosines."""
    chord = distance_from_similarity(similarity, "euclidean")
    eye = torch.eye(len(chord), dtype=torch.bool, device=chord.device)
    nearest = chord.masked_fill(eye, torch.inf).min(dim=1).values
    return -torch.log(nearest + eps).mean()


class ContrastiveKoLeoLoss(MetricLoss):
    """Contrastive loss (positives to similarity 1, negatives below ``margin``) + KoLeo.

    Args:
        margin: Cosine similarity above which a negative pair is penalised (beta).
        koleo_weight: Weight of the KoLeo regulariser; ``0`` disables it.
    """

    def __init__(self, margin: float = 0.5, koleo_weight: float = 0.1) -> None:
        super().__init__(distance="cosine")
        self.margin = float(margin)
        self.koleo_weight = float(koleo_weight)

    def compute(self, dist: Tensor, labels: Tensor, embeddings: Tensor) -> Tensor:
        """Contrastive term over the upper-triangle pairs plus weighted KoLeo."""
        sim = 1.0 - dist  # cosine distance back to cosine similarity
        upper = torch.ones_like(sim, dtype=torch.bool).triu(diagonal=1)
        same = labels[:, None] == labels[None, :]
        positives = upper & same
        negatives = upper & ~same & (sim.detach() > self.margin)
        loss = safe_mean(1.0 - sim[positives]) + safe_mean(sim[negatives] - self.margin)
        if self.koleo_weight:
            loss = loss + self.koleo_weight * koleo(sim)
        return loss
