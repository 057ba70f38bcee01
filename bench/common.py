"""Shared helpers for the benchmarks: where the real images are, and timing blocks."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

GROCERY_ROOT = Path(
    os.environ.get(
        "VITRINE_GROCERY_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery"
    )
)


def training_records(limit: int):
    """Real Grocery training photos when present, else a generated demo catalogue."""
    from model.datasets import load_dataset

    if (GROCERY_ROOT / "list_eval_partition.txt").is_file():
        return "grocery", load_dataset("inshop", GROCERY_ROOT).train[:limit]
    from components.catalog.demo import generate_demo_catalog

    folder = Path(tempfile.mkdtemp(prefix="vitrine-bench-"))
    manifest = generate_demo_catalog(folder, products=limit // 6 + 2, photos_per_product=6)
    return "demo catalogue", load_dataset("catalog", manifest, test_fraction=0.01).train[:limit]


def interleaved(blocks: dict[str, Callable[[], int]], rounds: int) -> dict[str, float]:
    """Run each block once per round, alternating, and return items/second per block.

    Alternating the contenders in one process spreads the machine's noise over all of them.
    """
    seconds = dict.fromkeys(blocks, 0.0)
    items = dict.fromkeys(blocks, 0)
    for _ in range(rounds):
        for name, block in blocks.items():
            started = time.perf_counter()
            items[name] += block()
            seconds[name] += time.perf_counter() - started
    return {name: items[name] / seconds[name] for name in blocks}
