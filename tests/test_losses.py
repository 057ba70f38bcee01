"""Losses on hand-built 2-D embeddings whose values are worked out by hand.

Points are unit vectors at the given angles. For an angle gap t between two of them:
cosine distance 1 - cos t, euclidean (chord) 2 sin(t/2), spherical t (radians). Handy chords:
30 deg -> 2 sin 15 = 0.517638, 60 -> 1, 90 -> sqrt 2 = 1.414214, 120 -> sqrt 3 = 1.732051,
180 -> 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from model.distances import cosine_similarity_matrix, pairwise_distance
from model.losses import (
    LOSS_NAMES,
    ContrastiveKoLeoLoss,
    ECTELLoss,
    EETLoss,
    EIRLoss,
    MetricLoss,
    TripletLoss,
    build_loss,
    mean_per_anchor,
)
from model.losses.eet import equidistant_term

SIN15 = math.sin(math.radians(15))  # chord(30 deg) = 2 * SIN15


def circle(*degrees: float) -> Tensor:
    """Unit vectors in 2-D at the given angles (float64 so hand values match to 1e-9)."""
    rad = [math.radians(d) for d in degrees]
    return torch.tensor([[math.cos(r), math.sin(r)] for r in rad], dtype=torch.float64)


def angle(x: Tensor, i: int, j: int) -> float:
    """Angle in degrees between rows ``i`` and ``j`` of ``x``."""
    cos = cosine_similarity_matrix(x.detach())[i, j].clamp(-1, 1)
    return math.degrees(math.acos(float(cos)))


def sgd_step(
    loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, labels: Tensor, lr: float = 0.05
) -> tuple[float, float, Tensor]:
    """One SGD step on the embeddings; returns (loss before, loss after, new embeddings)."""
    x = x.clone().requires_grad_(True)
    before = loss_fn(x, labels)
    (grad,) = torch.autograd.grad(before, x)
    with torch.no_grad():
        x_new = x - lr * grad  # plain SGD, without torch.optim's import cost
        after = loss_fn(x_new, labels)
    return before.item(), after.item(), x_new


# 0 deg, 60 deg (class 0) and 90 deg, 180 deg (class 1); euclidean distances:
# d01 = 1, d02 = sqrt2, d03 = 2, d12 = 2 sin15 = 0.517638, d13 = sqrt3, d23 = sqrt2.
X4 = circle(0, 60, 90, 180)
Y4 = torch.tensor([0, 0, 1, 1])


# --------------------------------------------------------------------------------------- helpers


def test_mean_per_anchor_ignores_inactive_terms() -> None:
    # anchor 0: active {0.2} -> 0.2 (the 0.0 is not counted); anchor 1: {0.4, 0.6} -> 0.5;
    # anchor 2 owns only a 0 -> left out. Mean over anchors 0, 1: (0.2 + 0.5) / 2 = 0.35.
    values = torch.tensor([0.2, 0.0, 0.4, 0.6, 0.0])
    anchors = torch.tensor([0, 0, 1, 1, 2])
    assert mean_per_anchor(values, anchors, 3).item() == pytest.approx(0.35)


def test_spherical_distance_is_arccos_and_ranks_like_cosine() -> None:
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cos = cosine_similarity_matrix(x)
    sph = pairwise_distance(x, kind="spherical")
    off = ~torch.eye(12, dtype=torch.bool)
    assert torch.allclose(sph[off], torch.arccos(cos)[off], atol=1e-12, rtol=0)
    # arccos is decreasing, so every row orders neighbours exactly as cosine distance does.
    for kind in ("cosine", "euclidean"):
        other = pairwise_distance(x, kind=kind)
        assert torch.equal(sph.argsort(dim=1), other.argsort(dim=1))


# --------------------------------------------------------------------------------------- triplet


def test_triplet_all_mining_hand_value() -> None:
    # margin 0.5, hinge = d(a,p) - d(a,n) + 0.5 per triplet:
    # a0, p1: n2: 1 - sqrt2 + .5 = 0.085786 ; n3: 1 - 2 + .5 = -0.5 (inactive)  -> a0 = 0.085786
    # a1, p0: n2: 1 - 0.517638 + .5 = 0.982362 ; n3: 1 - sqrt3 + .5 < 0         -> a1 = 0.982362
    # a2, p3: n0: sqrt2 - sqrt2 + .5 = 0.5 ; n1: sqrt2 - 0.517638 + .5 = 1.396575
    #                                                     -> a2 = (0.5 + 1.396575) / 2 = 0.948288
    # a3, p2: n0: sqrt2 - 2 + .5 < 0 ; n1: sqrt2 - sqrt3 + .5 = 0.182163          -> a3 = 0.182163
    # loss = (0.085786 + 0.982362 + 0.948288 + 0.182163) / 4 = 2.198599 / 4 = 0.549650
    s2, s3 = math.sqrt(2), math.sqrt(3)
    per_anchor = [1.5 - s2, 1.5 - 2 * SIN15, (1 + s2 - 2 * SIN15) / 2, 0.5 + s2 - s3]
    expected = sum(per_anchor) / 4
    assert expected == pytest.approx(0.549650, abs=1e-6)
    assert TripletLoss(margin=0.5)(X4, Y4).item() == pytest.approx(expected, abs=1e-9)


def test_triplet_hard_mining_hand_value() -> None:
    # hardest negative per anchor (one positive each):
    # a0: n = argmin(sqrt2, 2) = 2 -> 1 - sqrt2 + .5 = 0.085786
    # a1: n = argmin(0.517638, sqrt3) = 2 -> 1 - 0.517638 + .5 = 0.982362
    # a2: n = argmin(sqrt2, 0.517638) = 1 -> sqrt2 - 0.517638 + .5 = 1.396575
    # a3: n = argmin(2, sqrt3) = 1 -> sqrt2 - sqrt3 + .5 = 0.182163
    # loss = 2.646887 / 4 = 0.661722
    expected = (4 + math.sqrt(2) - 4 * SIN15 - math.sqrt(3)) / 4
    assert expected == pytest.approx(0.661722, abs=1e-6)
    assert TripletLoss(margin=0.5, mining="hard")(X4, Y4).item() == pytest.approx(expected)


def test_triplet_easy_batch_is_zero_with_grad_fn() -> None:
    # classes 40 deg apart from each other, 10 deg inside: every hinge is negative.
    x = circle(0, 10, 90, 100).requires_grad_(True)
    loss = TripletLoss(margin=0.1)(x, Y4)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "spherical"])
def test_triplet_gradient_pulls_positive_and_pushes_negative(distance: str) -> None:
    # a 0 deg, p 60 deg, n -30 deg: only (a, p, n) is active (n is nearer a than p is).
    x, labels = circle(0, 60, -30), torch.tensor([0, 0, 1])
    loss = TripletLoss(margin=0.1, distance=distance)  # type: ignore[arg-type]
    before, after, x_new = sgd_step(loss, x, labels)
    assert after < before
    assert angle(x_new, 0, 1) < 60  # anchor-positive closer
    assert angle(x_new, 0, 2) > 30  # anchor-negative farther


# ----------------------------------------------------------------------------------- contrastive


def test_contrastive_koleo_hand_value() -> None:
    # cosines: s01 = .5, s02 = 0, s03 = -1, s12 = cos30 = 0.866025, s13 = -.5, s23 = 0.
    # positives (0,1), (2,3): mean(1 - .5, 1 - 0) = 0.75
    # negatives with s > .5: only (1,2) -> 0.866025 - .5 = 0.366025
    # contrastive = 0.75 + 0.366025 = 1.116025
    # nearest-neighbour chords: x0 -> x1: 1; x1 -> x2: 0.517638; x2 -> x1: 0.517638; x3 -> x2: sqrt2
    # koleo = -(ln 1 + 2 ln 0.517638 + ln sqrt2) / 4 = -(0 - 1.316958 + 0.346574) / 4 = 0.242596
    # loss = 1.116025 + 0.1 * 0.242596 = 1.140285
    contrastive = 0.75 + math.cos(math.radians(30)) - 0.5
    koleo = -(2 * math.log(2 * SIN15) + math.log(math.sqrt(2))) / 4
    expected = contrastive + 0.1 * koleo
    assert expected == pytest.approx(1.140285, abs=1e-6)
    loss = ContrastiveKoLeoLoss(margin=0.5, koleo_weight=0.1)(X4, Y4)
    assert loss.item() == pytest.approx(expected, abs=1e-7)


def test_contrastive_without_koleo_hand_value() -> None:
    assert ContrastiveKoLeoLoss(koleo_weight=0.0)(X4, Y4).item() == pytest.approx(
        0.75 + math.cos(math.radians(30)) - 0.5
    )


def test_contrastive_gradient_pulls_positive_and_pushes_active_negative() -> None:
    # a 0 deg, p 80 deg (class 0), n -40 deg: s(a,n) = cos40 = .77 > .5 is active.
    x, labels = circle(0, 80, -40), torch.tensor([0, 0, 1])
    before, after, x_new = sgd_step(ContrastiveKoLeoLoss(), x, labels)
    assert after < before
    assert angle(x_new, 0, 1) < 80
    assert angle(x_new, 0, 2) > 40


def test_koleo_pushes_nearest_neighbours_apart() -> None:
    # three singleton classes crowded at 0, 10, 20 deg: no positive pair, and with margin .99 no
    # active negative (cos10 = .985), so the loss is KoLeo alone and its step spreads the batch.
    x, labels = circle(0, 10, 20), torch.tensor([0, 1, 2])
    loss = ContrastiveKoLeoLoss(margin=0.99, koleo_weight=1.0)
    # nearest chords: 2 sin5 for all three -> koleo = -ln(2 sin5) = 1.747...
    assert loss(x, labels).item() == pytest.approx(-math.log(2 * math.sin(math.radians(5))))
    before, after, x_new = sgd_step(loss, x, labels, lr=0.01)
    assert after < before
    assert angle(x_new, 0, 2) > 20  # the batch spreads out
    assert angle(x_new, 0, 1) > 10  # and the crowded pair separates


# ------------------------------------------------------------------------------------------- EET


def test_eet_hand_value_all_terms() -> None:
    # cosine distance; a 0 deg, p 90 deg (class 0), n 180 deg (class 1).
    # d(a,p) = 1, d(a,n) = 2, d(p,n) = 1. Triplets (a,p,n), (p,a,n).
    # margin .5: (a,p,n): 1 - 2 + .5 < 0 ; (p,a,n): 1 - 1 + .5 = .5        -> margin term .5
    # equidistant: |d(a,n) - d(p,n)| = |2 - 1| = 1 for both triplets        -> 1
    # centres: class 0 at 45 deg, class 1 at 180 deg: d = 1 - cos135 = 1 + sqrt2/2 = 1.707107
    #   m = [1.707107, 1.707107], var 0                                      -> -1.707107
    # loss = .5 + 2 * 1 + .5 * (-1.707107) = 1.646447
    expected = 0.5 + 2.0 - 0.5 * (1 + math.sqrt(2) / 2)
    assert expected == pytest.approx(1.646447, abs=1e-6)
    loss = EETLoss(
        margin=0.5, equidistant_weight=2.0, equidistributed_weight=0.5, distance="cosine"
    )
    assert loss(circle(0, 90, 180), torch.tensor([0, 0, 1])).item() == pytest.approx(expected)


def test_eet_equidistributed_hand_value_with_variance() -> None:
    # three singleton classes at 0, 60, 180 deg (no triplets); cosine distances between centres:
    # d(0,60) = .5, d(0,180) = 2, d(60,180) = 1.5 -> m = [.5, .5, 1.5]
    # mean = 5/6; deviations -1/3, -1/3, 2/3 -> var = (1/9 + 1/9 + 4/9) / 3 = 2/9
    # loss = -5/6 + 2/9 = -11/18 = -0.611111
    loss = EETLoss(distance="cosine", equidistributed_weight=1.0)(
        circle(0, 60, 180), torch.tensor([0, 1, 2])
    )
    assert loss.item() == pytest.approx(-11 / 18)


def test_eet_equidistant_gradient_pulls_anchor_and_positive_together() -> None:
    # a 20 deg, p 90 deg (class 0), n 180 deg: margin holds for both triplets
    # ((a,p,n): chord70 - chord160 + .1 < 0; (p,a,n): chord70 - chord90 + .1 < 0), so only the
    # equidistant term acts: |chord160 - chord90| = 2 sin80 - sqrt2 = 0.555402.
    x, labels = circle(20, 90, 180), torch.tensor([0, 0, 1])
    loss = EETLoss(margin=0.1, equidistant_weight=1.0, equidistributed_weight=0.0)
    assert loss(x, labels).item() == pytest.approx(2 * math.sin(math.radians(80)) - math.sqrt(2))
    before, after, x_new = sgd_step(loss, x, labels)
    assert after < before
    assert angle(x_new, 0, 1) < 70


def test_eet_equidistant_term_is_zero_when_negative_is_equidistant() -> None:
    # n at 180 deg is equally far from a at 90 and p at 270 deg.
    dist = pairwise_distance(circle(90, 270, 180))
    term = equidistant_term(dist, torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    assert term.item() == pytest.approx(0.0, abs=1e-12)


def test_eet_equidistributed_gradient_spreads_class_centres() -> None:
    # class 0 at 0, 20 deg (centre 10), class 1 at 60, 80 deg (centre 70). Every triplet holds the
    # margin (within-class chord20 = .347 vs between >= chord40 = .684), so the loss is
    # -chord(60) = -1 and its gradient moves the centres apart.
    x, labels = circle(0, 20, 60, 80), torch.tensor([0, 0, 1, 1])
    loss = EETLoss(margin=0.1, equidistant_weight=0.0, equidistributed_weight=1.0)
    assert loss(x, labels).item() == pytest.approx(-1.0)
    before, after, x_new = sgd_step(loss, x, labels)
    assert after < before
    centres = torch.stack([x_new[:2].sum(0), x_new[2:].sum(0)])
    assert angle(centres, 0, 1) > 60


def test_eet_default_step_decreases_loss() -> None:
    before, after, x_new = sgd_step(EETLoss(), circle(0, 90, 150), torch.tensor([0, 0, 1]))
    assert after < before
    assert angle(x_new, 0, 1) < 90


# ------------------------------------------------------------------------------------------- EIR


def test_ectel_hand_value() -> None:
    # spherical distance (radians); a 0 deg, p 30 deg (class 0), n 50 deg (class 1).
    # d(a,p) = pi/6, d(a,n) = 5pi/18, d(p,n) = pi/9. margin .1, confusing margin .2, weight .5.
    # triplet: (a,p,n): pi/6 - 5pi/18 + .1 = -0.249 (inactive, margin satisfied)
    #          (p,a,n): pi/6 - pi/9 + .1 = pi/18 + .1 = 0.274533           -> triplet 0.274533
    # confusing: (a,p,n) satisfied, d(p,n) = pi/9 < pi/6 + .2:
    #            pi/6 + .2 - pi/9 = pi/18 + .2 = 0.374533
    #            (p,a,n) violates the margin -> excluded                   -> confusing 0.374533
    # loss = 0.274533 + .5 * 0.374533 = pi/12 + .2 = 0.461799
    expected = math.pi / 12 + 0.2
    assert expected == pytest.approx(0.461799, abs=1e-6)
    loss = ECTELLoss(margin=0.1, confusing_margin=0.2, confusing_weight=0.5)
    assert loss(circle(0, 30, 50), torch.tensor([0, 0, 1])).item() == pytest.approx(expected)


def test_ectel_well_separated_triplets_give_zero() -> None:
    # a 0, p 30 deg, n 180 deg: margin satisfied both ways and d(p,n) = 150 deg is not confusing.
    x = circle(0, 30, 180).requires_grad_(True)
    loss = EIRLoss()(x, torch.tensor([0, 0, 1]))
    assert loss.item() == 0.0
    assert loss.grad_fn is not None


def test_ectel_confusing_term_pulls_positive_and_pushes_negative_off_it() -> None:
    # the confusing term alone on the single triplet (a=0 deg, p=30 deg, n=50 deg).
    ectel = ECTELLoss(margin=0.1, confusing_margin=0.2)
    idx = torch.tensor([0]), torch.tensor([1]), torch.tensor([2])

    def confusing(x: Tensor, _: Tensor) -> Tensor:
        return ectel.confusing_term(pairwise_distance(x, kind="spherical"), *idx)

    before, after, x_new = sgd_step(confusing, circle(0, 30, 50), torch.tensor([0, 0, 1]))
    assert before == pytest.approx(math.pi / 18 + 0.2)
    assert after < before
    assert angle(x_new, 0, 1) < 30  # anchor-positive closer
    assert angle(x_new, 1, 2) > 20  # negative pushed off the positive


def test_ectel_confusing_term_skips_violating_triplets() -> None:
    # (p, a, n) with p=30, a=0, n=50 deg violates the margin: no confusing penalty.
    dist = pairwise_distance(circle(0, 30, 50), kind="spherical")
    term = ECTELLoss().confusing_term(dist, torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    assert term.item() == 0.0


def test_eir_default_step_decreases_loss() -> None:
    assert EIRLoss().distance == "spherical"
    before, after, x_new = sgd_step(EIRLoss(), circle(0, 30, 50), torch.tensor([0, 0, 1]))
    assert after < before
    assert angle(x_new, 0, 1) < 30
    assert angle(x_new, 1, 2) > 20


# ---------------------------------------------------------------------------------------- shared


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_single_sample_batch_is_zero_with_grad_fn(name: str) -> None:
    x = torch.randn(1, 4, requires_grad=True)
    loss = build_loss(name)(x, torch.tensor([3]))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert x.grad is not None and torch.all(x.grad == 0)


@pytest.mark.parametrize("name", ["triplet", "eet", "eir"])
def test_single_class_batch_is_zero_with_grad_fn(name: str) -> None:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    loss = build_loss(name)(x, torch.zeros(5, dtype=torch.long))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert x.grad is not None and torch.all(x.grad == 0)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_shape_errors_name_expected_and_got(name: str) -> None:
    loss = build_loss(name)
    with pytest.raises(ValueError, match=r"expected embeddings of shape \[B, D\], got \(4,\)"):
        loss(torch.randn(4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"expected labels of shape \[4\].*got \(3,\)"):
        loss(torch.randn(4, 2), torch.zeros(3))


def test_build_loss_by_name_filters_kwargs() -> None:
    kinds = {
        "triplet": TripletLoss,
        "contrastive": ContrastiveKoLeoLoss,
        "eet": EETLoss,
        "eir": ECTELLoss,
    }
    for name in LOSS_NAMES:
        loss = build_loss(name, margin=0.3, mining="hard", koleo_weight=None)
        assert type(loss) is kinds[name] and isinstance(loss, MetricLoss)
        assert loss.margin == pytest.approx(0.3)
    contrastive = build_loss("contrastive", distance="spherical", koleo_weight=None)
    assert contrastive.distance == "cosine" and contrastive.koleo_weight == pytest.approx(0.1)
    assert build_loss("eir", confusing_weight=2.0).confusing_weight == pytest.approx(2.0)


def test_build_loss_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown loss 'arcface'; choose one of triplet, contra"):
        build_loss("arcface")


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="unknown distance"):
        TripletLoss(distance="manhattan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown mining"):
        EETLoss(mining="easy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin must be >= 0"):
        TripletLoss(margin=-0.1)
