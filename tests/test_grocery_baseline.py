"""Independent reference: ImageNet EfficientNet-Lite0, average pooling, no training.

In-Shop protocol on the shared Grocery photos gives Recall@1 = 80.9 in an independent
measurement (224 px centre crop after a short-side resize to 256, cosine). A difference of
more than 1.5 points means the weights, the preprocessing or the metric are wrong.
"""

from __future__ import annotations

import json

import pytest

from components.cli import main

pytestmark = pytest.mark.slow


def test_pretrained_lite0_inshop_recall_matches_reference(grocery_root, tmp_path):
    out = tmp_path / "baseline.json"
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                "inshop",
                "--root",
                str(grocery_root),
                "--json",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    metrics = json.loads(out.read_text())
    assert metrics["recall@1"] == pytest.approx(0.809, abs=0.015)
    assert metrics["num_queries"] == 1197 and metrics["num_gallery"] == 1483
    assert metrics["skipped_images"] == 0
    assert metrics["recall@40"] > metrics["recall@10"] > metrics["recall@1"]
