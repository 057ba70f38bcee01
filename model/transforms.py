"""Preprocessing derived from the model's data config, never hard-coded.

Evaluation uses timm's own eval transform (resize the short side to ``size / crop_pct``, centre
crop, normalise). Training decodes each image once into a resized ``uint8`` tensor
(:func:`decode_for_training`) and augments tensors on the fly (:class:`TrainAugment`), so JPEG
decoding is not repeated every epoch on a small CPU.
"""

from __future__ import annotations

import math
from typing import Any

import timm.data
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.functional import pil_to_tensor


def eval_transform(data: dict[str, Any]):
    """PIL image -> normalised float tensor, exactly as timm evaluates the backbone."""
    return timm.data.create_transform(
        input_size=tuple(data["input_size"]),
        interpolation=data["interpolation"],
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        crop_pct=data["crop_pct"],
        crop_mode=data.get("crop_mode", "center"),
        is_training=False,
    )


def resize_short_side(data: dict[str, Any]) -> int:
    """Short side an image is resized to before the centre crop (e.g. 256 for 224 at 0.875)."""
    return math.floor(data["input_size"][-1] / data["crop_pct"])


def decode_for_training(image: Image.Image, data: dict[str, Any]) -> torch.Tensor:
    """RGB image -> ``uint8`` tensor ``[3, H, W]`` whose short side is :func:`resize_short_side`."""
    short = resize_short_side(data)
    width, height = image.size
    scale = short / min(width, height)
    size = (max(short, round(width * scale)), max(short, round(height * scale)))
    return pil_to_tensor(image.convert("RGB").resize(size, Image.Resampling.BICUBIC))


class TrainAugment:
    """Random resized crop + flip + mild colour jitter on ``uint8`` tensors, then normalise."""

    def __init__(self, data: dict[str, Any], scale: tuple[float, float] = (0.35, 1.0)) -> None:
        size = data["input_size"][-1]
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(
                    size, scale=scale, interpolation=InterpolationMode.BILINEAR, antialias=True
                ),
                v2.RandomHorizontalFlip(),
                v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(data["mean"]), std=list(data["std"])),
            ]
        )

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.transform(image)
