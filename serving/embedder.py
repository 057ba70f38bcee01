"""The serving model: a model package loaded once, embedding decoded query images.

It embeds exactly as :func:`model.embed.embed_records` embeds the catalogue (the package's own
eval transform, channels-last memory, autocast on CUDA, L2-normalised float32 rows), so a
query lands in the same space as the indexed products.

On the CPU the model is traced and frozen into TorchScript (batch-norm folded into the
convolutions, the graph run by TorchScript's interpreter, every convolution on oneDNN: see
:func:`convolutions_on_onednn`). It embeds a photo 1.6x faster than eager PyTorch (8.1 against
13.0 ms for Lite0 at one thread), and it holds Python's lock once per forward instead of once
per layer, so the service's other threads (HTTP, decoding, Milvus Lite) no longer stall the
forward. The traced model is checked against the eager one at load time; a backbone that
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
from torchvision.transforms import Normalize, PILToTensor, ToTensor

from model.image_format import rgb
from model.package import load_package, package_version
from model.transforms import eval_transform, resize_short_side

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
        decode_side: The short side images are resized to: what a JPEG needs decoded (see
            :func:`model.image_format.decode_scaled`).
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
        self.decode_side = resize_short_side(self.data_config)
        self._image_steps, self._tensor_steps = split_transform(self._transform)
        if self._tensor_steps is not None and not self._split_matches_transform():
            log.warning("preparing images with the whole transform: its split differs")
            self._tensor_steps = None
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
        return self.embed_prepared([self.prepare(image) for image in images])

    def prepare(self, image: Image.Image) -> np.ndarray | torch.Tensor:
        """One decoded image made ready for :meth:`embed_prepared`.

        The service calls it on the thread that decoded the upload, not on the model's: each
        resizing step lets go of Python's lock and must take it back, and beside a busy event
        loop every take waits up to the interpreter's switch interval (5 ms); eight images
        prepared on the model thread beside a busy Python thread took 550 ms instead of 6.
        It runs no torch operation where it can: a torch operation on a thread of its own
        starts an OpenMP team there when torch has several threads, which slows the model's
        (see :attr:`serving.batching.MicroBatcher.executor`). So for the usual timm eval
        transform (image steps, then to-tensor and normalise) it returns the ``uint8`` pixels
        after the image steps, and :meth:`embed_prepared` scales and normalises them, the
        same operations in the same order; any other transform runs whole here.
        """
        image = rgb(image)  # not convert(), which copies even an RGB image
        if self._tensor_steps is None:
            return self._transform(image)
        for step in self._image_steps:
            image = step(image)
        return np.asarray(image)

    def _split_matches_transform(self) -> bool:
        """Whether the split transform gives exactly the whole one's input (on a test card)."""
        ramp = np.linspace(0, 255, 97 * 61 * 3).astype(np.uint8).reshape(61, 97, 3)
        card = Image.fromarray(ramp)
        return torch.equal(self.batch_of([self.prepare(card)]), self._transform(card)[None])

    def embed_prepared(self, inputs: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
        """Embed what :meth:`prepare` returned, as one batch (as :meth:`embed_images` does)."""
        if not inputs:
            return np.empty((0, self.dim), np.float32)
        return self._forward(self.batch_of(inputs))

    def batch_of(self, inputs: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """The model's input batch ``[B, C, H, W]`` (channels-last) for prepared images."""
        if self._tensor_steps is None or not isinstance(inputs[0], np.ndarray):
            return torch.stack([torch.as_tensor(x) for x in inputs])
        mean, std = self._tensor_steps
        # As ToTensor (to float, / 255) and Normalize (- mean, / std) compute it, per element.
        pixels = torch.from_numpy(np.stack(inputs)).permute(0, 3, 1, 2)
        return pixels.to(torch.float32).div(255).sub_(mean).div_(std)

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


def split_transform(transform) -> tuple[list, tuple[torch.Tensor, torch.Tensor] | None]:
    """A timm eval transform's image steps, and the mean and std (as ``[1, C, 1, 1]``) of the
    to-tensor + normalise steps that end it; ``([], None)`` if it does not end that way."""
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2:
        return [], None
    to_tensor, normalize = steps[-2:]
    if not (isinstance(to_tensor, ToTensor) and type(normalize) is Normalize):
        return [], None
    if any(isinstance(step, (ToTensor, PILToTensor, Normalize)) for step in steps[:-2]):
        return [], None  # a tensor step before the end: not the plain eval transform
    mean, std = (
        torch.as_tensor(value, dtype=torch.float32).reshape(1, -1, 1, 1)
        for value in (normalize.mean, normalize.std)
    )
    return steps[:-2], (mean, std)


# A traced model must give the eager model's embeddings to this tolerance (float32 rounding of
# folded batch-norm is ~1e-6) before it serves.
TRACE_TOLERANCE = 1e-4


def _frozen_or_eager(model: torch.nn.Module, data_config: dict) -> tuple[torch.nn.Module, str]:
    """The model traced and frozen into TorchScript with its convolutions on oneDNN; else
    frozen as traced; else the model itself. Each candidate must match the eager model."""
    channels, height, width = data_config["input_size"]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, channels, height, width, generator=generator).contiguous(
        memory_format=torch.channels_last
    )
    started = time.perf_counter()
    problems = []
    for on_onednn in (True, False):
        try:
            frozen, moved, error = _frozen_and_checked(model, probe, on_onednn)
        except Exception as err:  # any backbone that does not trace is still served, eagerly
            problems.append(f"tracing failed ({err})")
            continue
        if not error <= TRACE_TOLERANCE:
            problems.append(
                f"the traced model differs by {error:.2g} (tolerance {TRACE_TOLERANCE})"
            )
            continue
        if problems:
            log.warning("convolutions left to PyTorch's choice of kernel: %s", problems[0])
        log.info(
            "model traced and frozen (TorchScript) in %.1f s, %d convolutions on oneDNN; "
            "max difference %.1g",
            time.perf_counter() - started,
            moved,
            error,
        )
        return frozen, "torchscript"
    log.warning("serving the model eagerly: %s", problems[-1])
    return model, "eager"


def _frozen_and_checked(
    model: torch.nn.Module, probe: torch.Tensor, on_onednn: bool
) -> tuple[torch.nn.Module, int, float]:
    """The model traced and frozen (convolutions on oneDNN if asked), the convolutions moved,
    and its largest difference from the eager model on ``probe``."""
    with torch.inference_mode(), warnings.catch_warnings():
        # Shapes turned into constants (e.g. "same" padding at the fixed input size) are what
        # the check below is for; the tracer's warnings about them are noise here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch 2.x marks torch.jit deprecated in favour of torch.compile/torch.export, which on
        # a CPU need a C++ toolchain and tens of seconds per model; should torch.jit go, the
        # caller serves the model eagerly.
        warnings.simplefilter("ignore", FutureWarning)
        frozen = torch.jit.freeze(torch.jit.trace(model.eval(), probe[:1]))
        moved = convolutions_on_onednn(frozen.graph) if on_onednn else 0  # before it first runs
        expected = model(probe)
        # A batch size other than the traced one: the graph must not have baked it in.
        return frozen, moved, float((frozen(probe) - expected).abs().max())


def convolutions_on_onednn(graph: torch.Graph) -> int:
    """Run a frozen graph's 2-D convolutions on oneDNN at every batch size; returns how many.

    PyTorch picks the kernel per call, and on one CPU thread it sends 1x1 convolutions of a
    batch under 16 to its own slower kernel (a heuristic in ATen's ``use_mkldnn``). Those are
    most of an EfficientNet's or MobileNet's work: at one thread a frozen Lite0 embedded one
    photo in 10.6 ms and batches of 2 to 8 at 10 ms per photo, but batches of 16 at 6.5.
    Calling oneDNN's convolution directly gives 8.1 ms for one photo and 6.0-6.6 ms per photo
    for 2 to 8. Transposed convolutions and anything but 4-D float weights are left as they
    are; the caller checks the result against the eager model.
    """
    if not torch.backends.mkldnn.is_available():
        return 0
    moved = 0
    for node in graph.findAllNodes("aten::_convolution"):
        (source, weight, bias, stride, padding, dilation, transposed, _, groups, *_) = list(
            node.inputs()
        )
        kernel = weight.toIValue()
        if (
            transposed.toIValue() is not False
            or not isinstance(kernel, torch.Tensor)
            or kernel.dim() != 4
            or kernel.dtype != torch.float32
        ):
            continue
        direct = graph.create(
            "aten::mkldnn_convolution", [source, weight, bias, padding, stride, dilation, groups]
        )
        direct.insertBefore(node)
        direct.output().setType(node.output().type())
        node.output().replaceAllUsesWith(direct.output())
        node.destroy()
        moved += 1
    return moved
