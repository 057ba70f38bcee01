"""The serving model: a model package loaded once, embedding decoded query images.

It embeds exactly as :func:`model.embed.embed_records` embeds the catalogue (the package's own
eval transform, channels-last memory, autocast on CUDA, L2-normalised float32 rows), so a
query lands in the same space as the indexed products.

On the CPU the model is traced and frozen into TorchScript (batch-norm folded into the
convolutions, the graph run by TorchScript's interpreter). It embeds a photo about 1.3x faster
than eager PyTorch, up to 1.8x at batch 16, and it holds Python's lock once per forward instead
of once per layer, so the service's other threads (HTTP, decoding, Milvus Lite) no longer stall
the forward. The traced model is checked against the eager one at load time; a backbone that
does not trace, or traces into something else, is served eagerly, and the log says so.
"""

from __future__ import annotations

import logging
import time
import warnings
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
        compile: On the CPU, trace and freeze the model into TorchScript (checked against the
            eager model; eager if that fails). Ignored on other devices.

    Raises:
        model.package.ModelPackageError: The package is missing, incomplete or unusable.

    Attributes:
        package_dir: The package folder.
        version: ``config.json``'s ``version`` field if it has one, else the folder's name.
        dim: Length of each embedding.
        device: The torch device the model runs on.
        data_config: The package's preprocessing config (input size, crop, normalisation).
        runtime: ``"torchscript"`` or ``"eager"``: how forwards run.
    """

    def __init__(
        self,
        package_dir: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        compile: bool = True,
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
        self.runtime = "eager"
        if compile and self.device.type == "cpu":
            self._model, self.runtime = _frozen_or_eager(self._model, self.data_config)

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


# A traced model must give the eager model's embeddings to this tolerance (float32 rounding of
# folded batch-norm is ~1e-6) before it serves.
TRACE_TOLERANCE = 1e-4


def _frozen_or_eager(model: torch.nn.Module, data_config: dict) -> tuple[torch.nn.Module, str]:
    """The model traced and frozen into TorchScript, or the model itself if that fails."""
    channels, height, width = data_config["input_size"]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, channels, height, width, generator=generator).contiguous(
        memory_format=torch.channels_last
    )
    started = time.perf_counter()
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # Shapes turned into constants (e.g. "same" padding at the fixed input size) are
            # what the check below is for; the tracer's warnings about them are noise here.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # torch 2.x marks torch.jit deprecated in favour of torch.compile/torch.export, which
            # on a CPU need a C++ toolchain and tens of seconds per model; should torch.jit go,
            # the except below serves the model eagerly.
            warnings.simplefilter("ignore", FutureWarning)
            frozen = torch.jit.freeze(torch.jit.trace(model.eval(), probe[:1]))
            expected = model(probe)
            # A batch size other than the traced one: the graph must not have baked it in.
            error = float((frozen(probe) - expected).abs().max())
    except Exception as err:  # any backbone that does not trace is still served, eagerly
        log.warning("serving the model eagerly: TorchScript tracing failed (%s)", err)
        return model, "eager"
    if not error <= TRACE_TOLERANCE:
        log.warning(
            "serving the model eagerly: the traced model differs by %.2g (tolerance %g)",
            error,
            TRACE_TOLERANCE,
        )
        return model, "eager"
    log.info(
        "model traced and frozen (TorchScript) in %.1f s; max difference %.1g",
        time.perf_counter() - started,
        error,
    )
    return frozen, "torchscript"
