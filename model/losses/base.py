"""Shared bookkeeping for metric losses: input checks, normalisation, distances, reductions.

A loss subclasses :class:`MetricLoss` and writes only ``compute(dist, labels, embeddings)``, its
own formula over the distance matrix of the L2-normalised batch. Reductions that several losses
share live here too, and each returns a zero *still attached to the graph* when nothing is
active, so ``loss.backward()`` never fails on an easy or single-class batch.
"""

from __future__ import annotations

import abc

import torch.nn.functional as F
from torch import Tensor, nn

from model.distances import DISTANCE_KINDS, DistanceKind, pairwise_distance


def graph_zero(t: Tensor) -> Tensor:
    """A scalar ``0`` that carries ``t``'s ``grad_fn`` (zero gradient, but backward works)."""
    return t.sum() * 0.0


def safe_mean(values: Tensor) -> Tensor:
    """Mean of ``values``; a graph-connected ``0`` when ``values`` is empty."""
    return values.mean() if values.numel() else graph_zero(values)


def mean_per_anchor(values: Tensor, anchors: Tensor, batch_size: int) -> Tensor:
    """Mean over queries of the mean over each query's active terms.

    With ``A`` the set of anchors owning at least one active (``> 0``) value and ``T_a`` the
    active values of anchor ``a``: ``(1 / |A|) * sum_{a in A} (1 / |T_a|) * sum_{t in T_a} t``.
    Inactive (zero) terms are left out of both averages, so easy triplets do not dilute the loss
    and every query weighs the same however many triplets it owns.

    Args:
        values: Non-negative per-term penalties, shape ``[T]`` (e.g. hinge values of triplets).
        anchors: The anchor (query) index of each term, shape ``[T]``, values in ``[0, B)``.
        batch_size: ``B``, the number of possible anchors.

    Returns:
        A scalar; a graph-connected ``0`` when no term is active.
    """
    active = values > 0
    if not bool(active.any()):
        return graph_zero(values)
    weights = active.to(values.dtype)
    sums = values.new_zeros(batch_size).index_add(0, anchors, values * weights)
    counts = values.new_zeros(batch_size).index_add(0, anchors, weights)
    has_active = counts > 0
    return (sums[has_active] / counts[has_active]).mean()


class MetricLoss(nn.Module, abc.ABC):
    """Base class: ``forward(embeddings, labels)`` -> scalar loss.

    ``forward`` checks shapes, L2-normalises the embeddings, builds the ``[B, B]`` distance matrix
    of kind ``self.distance`` and hands both to :meth:`compute`. Batches with fewer than two
    samples give a graph-connected zero.

    Args:
        distance: ``"cosine"``, ``"euclidean"`` or ``"spherical"`` (see ``model.distances``).
    """

    def __init__(self, distance: DistanceKind = "euclidean") -> None:
        super().__init__()
        if distance not in DISTANCE_KINDS:
            raise ValueError(
                f"unknown distance {distance!r}; choose one of {', '.join(DISTANCE_KINDS)}"
            )
        self.distance: DistanceKind = distance

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Loss of a batch.

        Args:
            embeddings: Raw (unnormalised) embeddings, shape ``[B, D]``.
            labels: Class label of each embedding, shape ``[B]``.

        Returns:
            Scalar loss tensor, attached to ``embeddings``' graph even when it is zero.

        Raises:
            ValueError: When the shapes are not ``[B, D]`` and ``[B]``.
        """
        if embeddings.dim() != 2:
            raise ValueError(f"expected embeddings of shape [B, D], got {tuple(embeddings.shape)}")
        if labels.dim() != 1 or len(labels) != len(embeddings):
            raise ValueError(
                f"expected labels of shape [{len(embeddings)}] (one per embedding), "
                f"got {tuple(labels.shape)}"
            )
        if len(embeddings) < 2:
            return graph_zero(embeddings)
        normed = F.normalize(embeddings, dim=1)
        dist = pairwise_distance(normed, kind=self.distance)
        loss = self.compute(dist, labels, normed)
        if embeddings.requires_grad and not loss.requires_grad:
            loss = loss + graph_zero(embeddings)
        return loss

    @abc.abstractmethod
    def compute(self, dist: Tensor, labels: Tensor, embeddings: Tensor) -> Tensor:
        """The loss formula.

        Args:
            dist: Distance matrix of the normalised batch, shape ``[B, B]``, with gradients.
            labels: Class labels, shape ``[B]``.
            embeddings: The L2-normalised embeddings, shape ``[B, D]``.

        Returns:
            Scalar loss (use :func:`graph_zero` / :func:`safe_mean` for empty terms).
        """
