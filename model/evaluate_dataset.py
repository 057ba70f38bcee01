"""Score an embedding model on a retrieval dataset under its protocol (SOP or In-Shop)."""

from __future__ import annotations

from typing import Any

import torch

from model.datasets.records import RetrievalDataset
from model.embed import embed_records
from model.evaluation import INSHOP_KS, SOP_KS, SearchFn, retrieval_metrics
from model.head import EmbeddingModel


def protocol_ks(protocol: str) -> tuple[int, ...]:
    """The Recall@K values each benchmark reports."""
    return SOP_KS if protocol == "sop" else INSHOP_KS


def evaluate_model(
    model: EmbeddingModel,
    dataset: RetrievalDataset,
    data_config: dict,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    search: SearchFn | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed the evaluation split(s) of ``dataset`` and compute Recall@K and MAP@R.

    SOP protocol: every test image queries all other test images. In-Shop protocol: query
    images search the gallery only. Unreadable images are skipped and counted.
    """
    common = dict(batch_size=batch_size, device=device, num_workers=num_workers, progress=progress)
    queries = embed_records(model, dataset.query, data_config, description="queries", **common)
    same_set = dataset.protocol == "sop"
    gallery = (
        queries
        if same_set
        else embed_records(model, dataset.gallery, data_config, description="gallery", **common)
    )
    metrics: dict[str, Any] = retrieval_metrics(
        queries.vectors,
        queries.labels,
        gallery.vectors,
        gallery.labels,
        protocol_ks(dataset.protocol),
        same_set=same_set,
        search=search,
    )
    metrics["protocol"] = dataset.protocol
    metrics["num_gallery"] = len(gallery.labels)
    metrics["skipped_images"] = int(
        len(queries.skipped) + (0 if same_set else len(gallery.skipped))
    )
    return metrics
