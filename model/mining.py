"""In-batch triplet mining over a distance matrix.

A triplet ``(a, p, n)`` is valid when ``a != p``, ``y_a == y_p`` and ``y_n != y_a``. Mining only
*chooses* triplets: it reads detached distances and returns index tensors, so a loss re-reads
``dist[a, p]`` and ``dist[a, n]`` from the graph and the gradient flows through the loss formula
alone, never through the selection.

Strategies (``d`` is the distance matrix, ``margin`` the triplet margin):

* ``all``:      every valid triplet.
* ``semihard``: valid triplets with ``d(a, p) < d(a, n) < d(a, p) + margin`` (FaceNet): the
  negative is farther than the positive but still inside the margin.
* ``hard``:     per anchor, its hardest positive (largest ``d(a, p)``) and its hardest negative
  (smallest ``d(a, n)``); one triplet per anchor that has at least one of each.

Everything is a broadcast mask, ``O(B^3)`` booleans: about 17 M (17 MB) at ``B = 256``.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

TripletMining = Literal["all", "semihard", "hard"]
TRIPLET_MININGS: tuple[str, ...] = get_args(TripletMining)


def check_mining(mining: str) -> None:
    """Raise ``ValueError`` unless ``mining`` is one of :data:`TRIPLET_MININGS`."""
    if mining not in TRIPLET_MININGS:
        raise ValueError(f"unknown mining {mining!r}; choose one of {', '.join(TRIPLET_MININGS)}")


def pair_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean ``[B, B]`` masks of positive pairs (same label, ``i != j``) and negative pairs."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def triplet_mask(labels: Tensor) -> Tensor:
    """Boolean ``[B, B, B]`` mask, ``True`` at every valid triplet ``(a, p, n)``.

    Args:
        labels: Class label of each sample, shape ``[B]``.

    Returns:
        ``mask[a, p, n]`` is ``a != p and y_a == y_p and y_a != y_n``.
    """
    positive, negative = pair_masks(labels)
    return positive[:, :, None] & negative[:, None, :]


def mine_triplets(
    dist: Tensor, labels: Tensor, mining: TripletMining = "all", margin: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """Pick triplets from a batch's distance matrix.

    Args:
        dist: Pairwise distances, shape ``[B, B]``; read detached, never differentiated.
        labels: Class label of each sample, shape ``[B]``.
        mining: ``"all"``, ``"semihard"`` or ``"hard"`` (see the module docstring).
        margin: Triplet margin; only ``"semihard"`` uses it.

    Returns:
        ``(anchor, positive, negative)``: three ``int64`` index tensors of equal length, one entry
        per mined triplet (empty when the batch has no valid triplet).

    Raises:
        ValueError: On an unknown strategy or when ``dist`` is not ``[B, B]`` for ``B`` labels.
    """
    check_mining(mining)
    if labels.dim() != 1 or dist.shape != (len(labels), len(labels)):
        raise ValueError(
            f"expected dist [B, B] and labels [B]; got dist {tuple(dist.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    d = dist.detach()
    if mining == "hard":
        return _hardest_triplets(d, labels)
    mask = triplet_mask(labels)
    if mining == "semihard":
        d_ap, d_an = d[:, :, None], d[:, None, :]
        mask = mask & (d_an > d_ap) & (d_an < d_ap + margin)
    anchor, positive, negative = mask.nonzero(as_tuple=True)
    return anchor, positive, negative


def _hardest_triplets(d: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One triplet per anchor: farthest positive, nearest negative."""
    positive, negative = pair_masks(labels)
    hardest_p = d.masked_fill(~positive, -torch.inf).argmax(dim=1)
    hardest_n = d.masked_fill(~negative, torch.inf).argmin(dim=1)
    anchor = (positive.any(dim=1) & negative.any(dim=1)).nonzero(as_tuple=True)[0]
    return anchor, hardest_p[anchor], hardest_n[anchor]
