"""Triplet mining on hand-built distance matrices."""

from __future__ import annotations

import itertools

import pytest
import torch

from model.mining import TRIPLET_MININGS, mine_triplets, triplet_mask


def symmetric(n: int, upper: dict[tuple[int, int], float]) -> torch.Tensor:
    """Symmetric ``[n, n]`` distance matrix with a zero diagonal from its upper triangle."""
    d = torch.zeros(n, n)
    for (i, j), v in upper.items():
        d[i, j] = d[j, i] = v
    return d


def as_set(triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> set[tuple[int, ...]]:
    return set(zip(*(t.tolist() for t in triplets), strict=True))


# Labels [0, 0, 1, 1]; every anchor has exactly one positive.
LABELS_4 = torch.tensor([0, 0, 1, 1])
DIST_4 = symmetric(
    4,
    {(0, 1): 1.0, (0, 2): 1.05, (0, 3): 3.0, (1, 2): 0.5, (1, 3): 1.08, (2, 3): 1.0},
)
ALL_4 = {
    (0, 1, 2), (0, 1, 3), (1, 0, 2), (1, 0, 3),
    (2, 3, 0), (2, 3, 1), (3, 2, 0), (3, 2, 1),
}  # fmt: skip


def test_all_returns_every_valid_triplet() -> None:
    assert as_set(mine_triplets(DIST_4, LABELS_4, "all")) == ALL_4


def test_all_matches_brute_force() -> None:
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0])
    expected = {
        (a, p, n)
        for a, p, n in itertools.product(range(8), repeat=3)
        if a != p and labels[a] == labels[p] and labels[n] != labels[a]
    }
    dist = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    got = as_set(mine_triplets(dist, labels))
    assert got == expected
    assert int(triplet_mask(labels).sum()) == len(expected)


def test_semihard_selects_negatives_inside_the_margin() -> None:
    # margin 0.1, keep d(a,p) < d(a,n) < d(a,p) + 0.1:
    # (0,1,2): 1.0 < 1.05 < 1.1 yes      (0,1,3): 3.0  >= 1.1 no (easy)
    # (1,0,2): 0.5  < 1.0      no (hard)  (1,0,3): 1.0 < 1.08 < 1.1 yes
    # (2,3,0): 1.0 < 1.05 < 1.1 yes      (2,3,1): 0.5  < 1.0 no (hard)
    # (3,2,0): 3.0  >= 1.1     no (easy)  (3,2,1): 1.0 < 1.08 < 1.1 yes
    got = as_set(mine_triplets(DIST_4, LABELS_4, "semihard", margin=0.1))
    assert got == {(0, 1, 2), (1, 0, 3), (2, 3, 0), (3, 2, 1)}


def test_semihard_with_larger_margin_keeps_more_but_never_hard_ones() -> None:
    # margin 2.5: (0,1,3) [3.0 < 3.5] and (3,2,0) [3.0 < 3.5] join; hard ones stay out.
    got = as_set(mine_triplets(DIST_4, LABELS_4, "semihard", margin=2.5))
    assert got == {(0, 1, 2), (0, 1, 3), (1, 0, 3), (2, 3, 0), (3, 2, 0), (3, 2, 1)}


def test_hard_picks_farthest_positive_and_nearest_negative() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    dist = symmetric(
        6,
        {
            (0, 1): 0.2, (0, 2): 0.7, (0, 3): 0.9, (0, 4): 0.4, (0, 5): 1.5,
            (1, 2): 0.3, (1, 3): 0.6, (1, 4): 1.2, (1, 5): 0.25,
            (2, 3): 1.1, (2, 4): 0.8, (2, 5): 0.35,
            (3, 4): 0.5, (3, 5): 1.3,
            (4, 5): 0.45,
        },
    )  # fmt: skip
    # a0: positives 1 (0.2), 2 (0.7) -> 2; negatives 3 (0.9), 4 (0.4), 5 (1.5) -> 4
    # a1: positives 0 (0.2), 2 (0.3) -> 2; negatives 3 (0.6), 4 (1.2), 5 (0.25) -> 5
    # a2: positives 0 (0.7), 1 (0.3) -> 0; negatives 3 (1.1), 4 (0.8), 5 (0.35) -> 5
    # a3: positive 4;                       negatives 0 (0.9), 1 (0.6), 2 (1.1), 5 (1.3) -> 1
    # a4: positive 3;                       negatives 0 (0.4), 1 (1.2), 2 (0.8), 5 (0.45) -> 0
    # a5: the only sample of class 2 -> no positive -> no triplet
    a, p, n = mine_triplets(dist, labels, "hard")
    assert a.tolist() == [0, 1, 2, 3, 4]
    assert p.tolist() == [2, 2, 0, 4, 3]
    assert n.tolist() == [4, 5, 5, 1, 0]


@pytest.mark.parametrize("mining", TRIPLET_MININGS)
def test_single_class_batch_mines_nothing(mining: str) -> None:
    a, p, n = mine_triplets(torch.rand(4, 4), torch.zeros(4, dtype=torch.long), mining)
    assert len(a) == len(p) == len(n) == 0


@pytest.mark.parametrize("mining", TRIPLET_MININGS)
def test_mining_returns_indices_without_gradient(mining: str) -> None:
    dist = DIST_4.clone().requires_grad_(True)
    triplets = mine_triplets(dist, LABELS_4, mining, margin=0.1)
    for t in triplets:
        assert t.dtype == torch.long
        assert not t.requires_grad
    assert as_set(triplets) == as_set(mine_triplets(DIST_4, LABELS_4, mining, margin=0.1))


def test_mining_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="unknown mining 'easy'"):
        mine_triplets(DIST_4, LABELS_4, "easy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected dist \[B, B\]"):
        mine_triplets(DIST_4[:3], LABELS_4)
