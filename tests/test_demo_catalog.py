"""The seeded demo catalogue: reproducible, readable as a catalogue, products tell apart."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
from PIL import Image

from components.catalog.demo import MANIFEST_COLUMNS, generate_demo_catalog, make_products
from model.datasets import load_dataset


def _digest(folder):
    return hashlib.sha256(
        b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())
    ).hexdigest()


def test_catalogue_is_seeded_and_loads(tmp_path):
    def make(folder: str, bad_rows: bool):
        return generate_demo_catalog(
            tmp_path / folder, products=6, photos_per_product=3, progress=False, bad_rows=bad_rows
        )

    first, second = make("a", False), make("b", False)
    assert _digest(first.parent) == _digest(second.parent)
    with_bad = make("c", True)
    assert _digest(with_bad.parent) == _digest(make("d", True).parent)
    assert len(with_bad.read_text().splitlines()) == 1 + 18 + 12
    with first.open() as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == MANIFEST_COLUMNS and len(rows) == 18
    dataset = load_dataset("catalog", first)
    assert len(dataset.train) + len(dataset.query) == 18
    for row in rows:
        with Image.open(first.parent / row["image_path"]) as image:
            assert image.size == (224, 224)


def test_products_are_distinct_and_photos_vary(tmp_path):
    products = make_products(40, seed=3)
    assert len({(p.shape, p.pattern, p.body, p.label) for p in products}) == 40
    manifest = generate_demo_catalog(
        tmp_path, products=2, photos_per_product=2, progress=False, bad_rows=False
    )
    photos = [
        np.asarray(Image.open(manifest.parent / f"images/P0000{p}_{s}.jpg"), dtype=float)
        for p in range(2)
        for s in range(2)
    ]
    assert np.abs(photos[0] - photos[1]).mean() > 10  # two shots of one product differ
