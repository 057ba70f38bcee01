"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The real Grocery Store images in SOP and In-Shop formats live beside the repository, never in
# it; a fresh clone does not have them, so tests that need them skip.
GROCERY_ROOT = Path(
    os.environ.get(
        "VITRINE_GROCERY_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery"
    )
)

# A tiny timm model (about 0.1 M parameters) so training tests stay fast on a CPU.
TINY_BACKBONE = "test_efficientnet"
# A `train` section for a training run of about a second (the nightly, DVC and KFP tests).
TINY_TRAIN = {
    "backbone": TINY_BACKBONE,
    "weights": "none",
    "epochs": 1,
    "classes_per_batch": 4,
    "images_per_class": 2,
    "train_image_size": 64,
}


@pytest.fixture(scope="session")
def grocery_root() -> Path:
    """The shared Grocery Store dataset folder; skips the test when it is absent."""
    if not (GROCERY_ROOT / "Ebay_train.txt").is_file():
        pytest.skip(f"shared Grocery Store data not found at {GROCERY_ROOT}")
    return GROCERY_ROOT


def _product_photo(class_id: int, shot: int, size: int = 72) -> Image.Image:
    """A coloured square per class on a noisy background, shifted a little per shot."""
    rng = np.random.default_rng(1000 * class_id + shot)
    pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    colour = np.array(
        [(class_id * 97) % 256, (class_id * 53 + 80) % 256, (class_id * 29 + 160) % 256]
    )
    offset = int(rng.integers(4, 20))
    side = 28 + (class_id % 3) * 8
    pixels[offset : offset + side, offset : offset + side] = colour
    return Image.fromarray(pixels)


@pytest.fixture(scope="session")
def tiny_sop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Stanford-Online-Products-format folder: 8 train and 6 test classes x 5 JPEGs."""
    root = tmp_path_factory.mktemp("tiny_sop")
    image_id = 0
    for split, classes in (("train", range(1, 9)), ("test", range(9, 15))):
        lines = ["image_id class_id super_class_id path"]
        for class_id in classes:
            folder = root / split / f"class_{class_id}"
            folder.mkdir(parents=True)
            for shot in range(5):
                image_id += 1
                relative = f"{split}/class_{class_id}/{shot}.jpg"
                _product_photo(class_id, shot).save(root / relative, quality=92)
                lines.append(f"{image_id} {class_id} {1 + class_id % 2} {relative}")
        (root / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return root
