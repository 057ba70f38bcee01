"""The decode benchmark on two photos: both ways run, and scaled decoding keeps the embedding
(its timings are measurements, not tests)."""

from __future__ import annotations

import argparse

from bench.bench_decode import SIZES, run


def test_scaled_decoding_keeps_the_embedding() -> None:
    result = run(argparse.Namespace(photos=2, rounds=1))
    assert result["decode_side"] == 256  # Lite0: 224 at crop 0.875
    assert [row["size"] for row in result["rows"]] == [f"{w}x{h}" for w, h in SIZES]
    for row in result["rows"]:
        assert row["full_ms"] > 0 and row["scaled_ms"] > 0
        assert row["cosine_min"] > 0.99, row
