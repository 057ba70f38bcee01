"""Loading the images of a dataset for training or embedding, skipping unreadable files.

Real catalogues hold missing, corrupt and truncated images. :class:`ImageFileDataset` returns
None for such an image instead of raising, and :func:`collate_skipping_unreadable` drops the
Nones from each batch. Every batch carries the dataset indices of the images it holds, so a
caller learns what was skipped by comparing them with the indices it asked for::

    loader = DataLoader(ImageFileDataset(records, transform), batch_size=64,
                        collate_fn=collate_skipping_unreadable)
    seen = []
    for images, labels, indices in loader:
        if len(indices) == 0:
            continue
        seen.extend(indices.tolist())
        ...
    skipped = sorted(set(range(len(records))) - set(seen))
    report_skipped(records, skipped, logger)

This works with any number of DataLoader workers, since nothing is recorded inside the dataset
(a worker's copy of it would not report back).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from model.datasets.records import ImageRecord
from model.image_format import decode_scaled, upright_rgb

log = logging.getLogger(__name__)

# PIL signals unreadable input through these; UnidentifiedImageError is an OSError (missing,
# truncated and corrupt files) and DecompressionBombError is not, so both are named.
_UNREADABLE = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)

Sample = tuple[torch.Tensor, int, int]


class ImageFileDataset(Dataset):
    """Images of a list of records, as ``(tensor, label, index)`` or None when unreadable.

    Args:
        records: The images to load, e.g. one split of a
            :class:`~model.datasets.records.RetrievalDataset`.
        transform: Turns an RGB PIL image into a tensor (resize, crop, normalise), e.g. timm's
            ``create_transform(**resolve_model_data_config(model))``.
        decode_side: The short side ``transform`` resizes to: JPEGs much larger decode
            scaled down (:func:`~model.image_format.decode_scaled`). None decodes full size
            (training, whose random crops want every pixel).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Callable[[Image.Image], torch.Tensor],
        decode_side: int | None = None,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.decode_side = decode_side

    def __len__(self) -> int:
        """Number of records."""
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | None:
        """Load, convert to RGB and transform one image; None if it cannot be read or decoded.

        Errors raised by the transform itself are not caught: they are bugs, not bad files.
        """
        record = self.records[index]
        image = _open_rgb(record, self.decode_side)
        if image is None:
            return None
        return self.transform(image), record.label, index


def _open_rgb(record: ImageRecord, decode_side: int | None = None) -> Image.Image | None:
    """Decode an image file fully, upright and in RGB as a query upload is, or None (logged at
    debug level) if that fails."""
    try:
        with Image.open(record.path) as image:
            decode_scaled(image, decode_side)
            image.load()
            return upright_rgb(image)
    except _UNREADABLE as err:
        log.debug("unreadable image %s: %s: %s", record.path, type(err).__name__, err)
        return None


def collate_skipping_unreadable(
    batch: Sequence[Sample | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collate ``(tensor, label, index)`` samples, dropping the None of unreadable images.

    Args:
        batch: Samples from :class:`ImageFileDataset`, some of which may be None.

    Returns:
        ``(images, labels, indices)``: images stacked as ``[N, C, H, W]`` and int64 labels and
        dataset indices of shape ``[N]``, where ``N`` counts the readable samples. When no
        sample in the batch is readable, ``N`` is 0 and images is an empty float tensor of
        shape ``[0, 0, 0, 0]`` (the image size is unknown); callers should skip such a batch
        (``if len(indices) == 0: continue``).
    """
    samples = [sample for sample in batch if sample is not None]
    if not samples:
        empty = torch.empty(0, dtype=torch.long)
        return torch.empty(0, 0, 0, 0), empty, empty.clone()
    images = torch.stack([sample[0] for sample in samples])
    labels = torch.tensor([sample[1] for sample in samples], dtype=torch.long)
    indices = torch.tensor([sample[2] for sample in samples], dtype=torch.long)
    return images, labels, indices


def report_skipped(
    records: Sequence[ImageRecord],
    skipped_indices: Sequence[int],
    logger: logging.Logger,
    max_paths: int = 5,
) -> None:
    """Log how many images were skipped as unreadable, with the first few paths.

    Args:
        records: The records the dataset was built from.
        skipped_indices: Indices into ``records`` that no batch returned.
        logger: Where the warning goes; nothing is logged when no image was skipped.
        max_paths: How many paths to name.
    """
    if not skipped_indices:
        return
    paths = [str(records[i].path) for i in list(skipped_indices)[:max_paths]]
    more = len(skipped_indices) - len(paths)
    logger.warning(
        "skipped %d of %d images that could not be read or decoded: %s%s",
        len(skipped_indices),
        len(records),
        ", ".join(paths),
        f" and {more} more" if more else "",
    )
