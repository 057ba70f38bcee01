"""The recall canary and the drift gauge, run by the service against what it serves.

:func:`run_canary` embeds the collection's probe photos (recorded at index time, see
:mod:`serving.probes`) with the serving model, searches the live collection, and reports live
Recall@K beside the figure the index step expected. :class:`DriftMonitor` keeps the last
``window`` query embeddings and reports their standardised mean shift from the catalogue
(see :func:`serving.probes.drift_reference`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any

import numpy as np

from serving.probes import CANARY_KS, HITS_PER_PRODUCT, mean_shift, rank_of_product

log = logging.getLogger(__name__)
# Fewer recent queries than this and the drift figure is noise: it is not reported.
MIN_DRIFT_QUERIES = 32


def _open_image(uri: str, decode_side: int | None):
    """A catalogue photo, decoded upright and in RGB as the indexer decoded it."""
    from PIL import Image

    from model.image_format import decode_scaled, upright_rgb

    if "://" in uri and not uri.startswith("file://"):
        import fsspec

        opened = fsspec.open(uri, "rb")
    else:
        opened = open(uri.removeprefix("file://"), "rb")  # noqa: SIM115 (closed just below)
    with opened as handle:
        image = Image.open(handle)
        decode_scaled(image, decode_side)
        image.load()
    return upright_rgb(image)


def canary_sync(pair: Any, store: Any, batch_size: int = 16) -> dict[str, Any]:
    """Run the canary once (blocking). Returns live and expected Recall@K, probes run,
    probes whose photo could not be read, and probes left out because the collection no
    longer holds another photo of their product (removed through the admin API: no model
    or index could find it, so it says nothing about them)."""
    canary = pair.metadata.get("canary") or {}
    recorded = canary.get("probes", [])
    started = time.perf_counter()
    present = store.images_of_products(pair.collection, [p["product_id"] for p in recorded])
    probes = [p for p in recorded if present.get(p["product_id"], set()) - {p["image_id"]}]
    removed = len(recorded) - len(probes)
    found: list[int | None] = []
    unreadable = 0
    for offset in range(0, len(probes), batch_size):
        batch, images = [], []
        for probe in probes[offset : offset + batch_size]:
            try:
                images.append(_open_image(probe["image_uri"], pair.embedder.decode_side))
                batch.append(probe)
            except (OSError, ValueError) as err:
                unreadable += 1
                log.warning("canary: cannot read %s: %s", probe["image_uri"], err)
        if not batch:
            continue
        # Prepared here, embedded on the model's threads as every forward of the service
        # (Embedder.prepare, MicroBatcher.executor).
        prepared = [pair.embedder.prepare(image) for image in images]
        vectors = pair.batcher.executor.submit(pair.embedder.embed_prepared, prepared).result()
        depth = max(CANARY_KS) * HITS_PER_PRODUCT + 1  # +1: the probe's own image
        hits = store.search(pair.collection, vectors, depth, pair.spec, "")
        for probe, probe_hits in zip(batch, hits, strict=True):
            ranked = [h["product_id"] for h in probe_hits if h["image_id"] != probe["image_id"]]
            found.append(rank_of_product(ranked, probe["product_id"]))
    live = {
        f"recall@{k}": (sum(r is not None and r <= k for r in found) / len(found))
        if found
        else None
        for k in CANARY_KS
    }
    return {
        "recall": live,
        "expected": canary.get("expected", {}),
        "probes": len(found),
        "unreadable": unreadable,
        "removed": removed,
        "seconds": time.perf_counter() - started,
        "collection": pair.collection,
        "model_version": pair.model_version,
        "at": time.time(),
    }


async def run_canary(pair: Any, store: Any) -> dict[str, Any]:
    """:func:`canary_sync` off the event loop."""
    return await asyncio.to_thread(canary_sync, pair, store)


class DriftMonitor:
    """Recent query embeddings against the catalogue centroid of the served collection."""

    def __init__(self, reference: dict[str, Any] | None) -> None:
        reference = reference or {}
        self.mean = np.asarray(reference["mean"], np.float32) if "mean" in reference else None
        self.scale = np.asarray(reference.get("scale", []), np.float32)
        self.threshold = float(reference.get("threshold", float("nan")))
        self.window: collections.deque[np.ndarray] = collections.deque(
            maxlen=int(reference.get("window", 256))
        )
        self._lock = threading.Lock()

    def observe(self, vector: np.ndarray) -> None:
        if self.mean is not None:
            with self._lock:
                self.window.append(np.asarray(vector, np.float32))

    def distance(self) -> float | None:
        """The recent queries' standardised mean shift from the catalogue, or None while
        fewer than :data:`MIN_DRIFT_QUERIES` queries were seen (or no reference exists)."""
        with self._lock:
            if self.mean is None or len(self.window) < MIN_DRIFT_QUERIES:
                return None
            recent = np.mean(np.stack(self.window), axis=0)
        return mean_shift(recent, self.mean, self.scale)

    def describe(self) -> dict[str, Any]:
        return {
            "distance": self.distance(),
            "threshold": self.threshold,
            "queries": len(self.window),
            "window": self.window.maxlen,
        }
