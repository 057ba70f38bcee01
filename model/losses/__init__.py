"""Metric-learning losses, one per module, built by name with :func:`build_loss`."""

from __future__ import annotations

import inspect
from typing import Any

from model.losses.base import MetricLoss, mean_per_anchor
from model.losses.contrastive_koleo import ContrastiveKoLeoLoss
from model.losses.eet import EETLoss
from model.losses.eir import ECTELLoss, EIRLoss
from model.losses.triplet import TripletLoss

__all__ = [
    "LOSS_NAMES",
    "ContrastiveKoLeoLoss",
    "ECTELLoss",
    "EETLoss",
    "EIRLoss",
    "MetricLoss",
    "TripletLoss",
    "build_loss",
    "mean_per_anchor",
]

_LOSSES: dict[str, type[MetricLoss]] = {
    "triplet": TripletLoss,
    "contrastive": ContrastiveKoLeoLoss,
    "eet": EETLoss,
    "eir": ECTELLoss,
}
LOSS_NAMES: tuple[str, ...] = tuple(_LOSSES)


def build_loss(name: str, **kwargs: Any) -> MetricLoss:
    """Build a loss by name.

    Keyword arguments the loss does not accept (e.g. ``mining`` for ``"contrastive"``) and those
    set to ``None`` are dropped, so one config section can feed every loss.

    Args:
        name: One of :data:`LOSS_NAMES`.
        **kwargs: Constructor arguments, e.g. ``margin=0.2, distance="spherical"``.

    Returns:
        The loss module.

    Raises:
        ValueError: When ``name`` is not a known loss.
    """
    try:
        cls = _LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}") from None
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in accepted and v is not None})
