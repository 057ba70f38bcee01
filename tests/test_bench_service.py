"""The service benchmark's arithmetic (its runs are measurements, not tests)."""

from __future__ import annotations

import math

import pytest

from bench.bench_service import ratios_by_round


def test_ratios_by_round_pair_each_round_and_skip_rounds_without_latencies() -> None:
    service = {"p50_by_round": [16.0, 17.0, math.nan, 15.0]}
    bare = {"p50_by_round": [14.5, 14.0, 14.2, math.nan]}
    assert ratios_by_round(service, bare) == pytest.approx([16.0 / 14.5, 17.0 / 14.0])


def test_ratios_by_round_need_as_many_rounds_on_both_sides() -> None:
    with pytest.raises(ValueError):
        ratios_by_round({"p50_by_round": [16.0]}, {"p50_by_round": [14.0, 15.0]})
