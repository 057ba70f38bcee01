"""The serving model: a model package loaded once, embedding decoded query images.

It embeds exactly as :func:`model.embed.embed_records` embeds the catalogue (the package's own
eval transform, channels-last memory, autocast on CUDA, L2-normalised float32 rows), so a
query lands in the same space as the indexed products.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.package import load_package, package_version
from model.transforms import eval_transform

log = logging.getLogger(__name__)


class Embedder:
    """One model package, ready to embed images.

    Args:
        package_dir: A folder written by :func:`model.package.save_package`.
        device: Torch device to run on (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        threads: Intra-op CPU threads for torch (process-wide); None leaves torch's default.

    Raises:
        model.package.ModelPackageError: The package is missing, incomplete or unusable.

    Attributes:
        package_dir: The package folder.
        version: ``config.json``'s ``version`` field if it has one, else the folder's name.
        dim: Length of each embedding.
        device: The torch device the model runs on.
        data_config: The package's preprocessing config (input size, crop, normalisation).
    """

    def __init__(
        self, package_dir: str | Path, device: str = "cpu", threads: int | None = None
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.package_dir = Path(package_dir)
        self.device = torch.device(device)
        model, config = load_package(self.package_dir, self.device)
        # As model.embed does on every device: the backbones run faster channels-last.
        self._model = model.to(memory_format=torch.channels_last)
        self.data_config = dict(config.data)
        self._transform = eval_transform(self.data_config)
        self.dim = int(model.embed_dim)
        self.version = package_version(self.package_dir)
        self._use_amp = self.device.type == "cuda"

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed images as one batch.

        Args:
            images: Decoded images in any mode (converted to RGB here, as the indexer does).

        Returns:
            Float32 array ``[len(images), dim]`` whose rows have unit L2 norm.
        """
        if not images:
            return np.empty((0, self.dim), np.float32)
        batch = torch.stack([self._transform(image.convert("RGB")) for image in images])
        return self._forward(batch)

    def warm_up(self, batch_sizes: Sequence[int] = (1, 4)) -> None:
        """Run dummy forwards so the first requests do not pay for lazy initialisation.

        Args:
            batch_sizes: Batch sizes to run once each (the sizes micro-batching will see most).
        """
        channels, height, width = self.data_config["input_size"]
        for size in batch_sizes:
            start = time.perf_counter()
            out = self._forward(torch.zeros(size, channels, height, width))
            if out.shape != (size, self.dim):
                raise RuntimeError(f"warm-up gave shape {out.shape}, expected {(size, self.dim)}")
            log.debug("warm-up batch %d: %.1f ms", size, 1000 * (time.perf_counter() - start))

    def _forward(self, batch: torch.Tensor) -> np.ndarray:
        """Normalised float tensor ``[B, C, H, W]`` -> L2-normalised float32 ``[B, dim]``."""
        with torch.inference_mode(), torch.autocast("cuda", enabled=self._use_amp):
            out = self._model(
                batch.to(self.device, non_blocking=True).contiguous(
                    memory_format=torch.channels_last
                )
            )
        return out.float().cpu().numpy()
