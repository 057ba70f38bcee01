"""Batch embedding of image records with a progress bar; unreadable images are skipped."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from model.datasets.images import ImageFileDataset, collate_skipping_unreadable, report_skipped
from model.datasets.records import ImageRecord
from model.head import EmbeddingModel
from model.transforms import eval_transform, resize_short_side

log = logging.getLogger(__name__)


@dataclass
class Embeddings:
    """Embeddings of the readable records; ``kept`` indexes into the records given."""

    vectors: np.ndarray  # [N, D] float32, L2-normalised
    labels: np.ndarray  # [N]
    kept: np.ndarray  # [N] indices into the input records
    skipped: np.ndarray  # indices of records that could not be read


@torch.inference_mode()
def embed_records(
    model: EmbeddingModel,
    records: Sequence[ImageRecord],
    data_config: dict,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    description: str = "embedding",
    progress: bool = True,
) -> Embeddings:
    """Embed ``records`` with ``model`` using the model's own eval preprocessing."""
    model.eval().to(device).to(memory_format=torch.channels_last)
    # Decoded as the service decodes uploads: large JPEGs scaled down to the resize side.
    dataset = ImageFileDataset(
        list(records), eval_transform(data_config), decode_side=resize_short_side(data_config)
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_skipping_unreadable,
    )
    vectors, labels, kept = [], [], []
    use_amp = torch.device(device).type == "cuda"
    for images, batch_labels, indices in tqdm(
        loader, desc=description, unit="batch", disable=not progress, leave=False
    ):
        if len(indices) == 0:
            continue
        with torch.autocast(device_type="cuda", enabled=use_amp):
            out = model(
                images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            )
        vectors.append(out.float().cpu().numpy())
        labels.append(batch_labels.numpy())
        kept.append(indices.numpy())
    dim = model.embed_dim
    kept_arr = np.concatenate(kept) if kept else np.empty(0, dtype=np.int64)
    skipped = np.setdiff1d(np.arange(len(records)), kept_arr)
    if len(skipped):
        report_skipped(records, skipped.tolist(), log)
    return Embeddings(
        vectors=np.concatenate(vectors) if vectors else np.empty((0, dim), np.float32),
        labels=np.concatenate(labels) if labels else np.empty(0, np.int64),
        kept=kept_arr,
        skipped=skipped,
    )
