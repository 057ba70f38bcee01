"""The train step: fine-tune the embedding model on the training products of a validated
catalogue and write a candidate model package.

The package folder also gets ``loss.csv`` (epoch, loss, validation Recall@1), the training
curve DVC plots. A rerun resumes from the package's checkpoint, so a retried task does not
start over.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from model.config import TrainConfig

LOSS_CURVE = "loss.csv"


def train_candidate(
    catalogue: str | Path,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train on the catalogue's training products (a deterministic split by product id; the
    other half is what :mod:`components.evaluate` scores).

    Returns:
        ``{"package": folder, "loss": name, "train": training metrics, "minutes": ...}``.
    """
    from model.datasets import load_dataset
    from model.train import train

    started = time.perf_counter()
    dataset = load_dataset("catalog", catalogue)
    if not dataset.train:
        raise ValueError(f"{catalogue} has no training products (every product is held out)")
    out_dir = Path(out_dir)
    result = train(dataset, config, out_dir, resume=True, progress=progress)
    write_loss_curve(result.metrics["history"], out_dir / LOSS_CURVE)
    return {
        "package": str(result.package_dir),
        "loss": config.loss.name,
        "train": result.metrics,
        "minutes": (time.perf_counter() - started) / 60,
    }


def write_loss_curve(history: list[dict[str, Any]], path: Path) -> Path:
    """One row per epoch: ``epoch,loss,val_recall@1`` (empty where not measured)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "loss", "val_recall@1"])
        for record in history:
            writer.writerow([record["epoch"], record["loss"], record.get("val_recall@1", "")])
    return path
