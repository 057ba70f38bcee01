"""Model package: a folder with ``config.json``, ``model.safetensors`` and ``metrics.json``.

The config carries everything a consumer needs to embed images the way the model was trained:
backbone name, pooling, embedding dimension, input size, interpolation, crop and normalisation,
plus provenance (weights source, training-data hash, loss). Serving loads a package without
knowing how it was trained.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.backbone import DEFAULT_BACKBONE, backbone_data_config, create_backbone
from model.head import EmbeddingHead, EmbeddingModel
from model.jsonfile import write_json
from model.package_files import CONFIG_FILE as CONFIG_FILE
from model.package_files import METRICS_FILE as METRICS_FILE
from model.package_files import WEIGHTS_FILE as WEIGHTS_FILE


class ModelPackageError(RuntimeError):
    """A model package is missing, incomplete or does not match its config."""


@dataclass
class ModelConfig:
    """What defines an embedding model; written to ``config.json``."""

    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    pooling: str = "avg"
    embed_dim: int | None = None
    # Filled from the backbone by build_model() when empty.
    data: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)


def build_model(config: ModelConfig, load_weights: bool = True) -> EmbeddingModel:
    """Build the backbone + head described by ``config``; fills ``config.data`` if empty."""
    backbone = create_backbone(config.backbone, config.weights if load_weights else "none")
    if not config.data:
        config.data = backbone_data_config(backbone)
    head = EmbeddingHead(backbone.num_features, config.embed_dim, config.pooling)  # type: ignore[arg-type]
    return EmbeddingModel(backbone, head)


def save_package(
    model: EmbeddingModel,
    config: ModelConfig,
    directory: Path,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a package under ``directory`` (created); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    payload = asdict(config) | {"embed_dim_out": model.embed_dim}
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    if metrics is not None:
        write_json(directory / METRICS_FILE, metrics)
    return directory


def load_package(
    directory: Path, device: str | torch.device = "cpu"
) -> tuple[EmbeddingModel, ModelConfig]:
    """Load a package written by :func:`save_package`, in eval mode on ``device``."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelPackageError(f"model package {directory} has no {path.name}")
    try:
        config = ModelConfig.from_dict(json.loads(config_path.read_text()))
        model = build_model(config, load_weights=False)
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except (ValueError, RuntimeError, KeyError, OSError, SafetensorError) as exc:
        raise ModelPackageError(f"model package {directory} is unusable: {exc}") from exc
    return model.to(device).eval(), config


def package_version(directory: Path) -> str:
    """A model package's version: its folder name and the start of its weights' SHA-256, so
    two packages with the same name but different weights never share a version (a registry
    folder, ``<time>-<sha10>``, is its own version)."""
    import hashlib

    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelPackageError(f"model package {directory} has no {WEIGHTS_FILE}")
    digest = hashlib.sha256()
    with weights.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    name, short = directory.resolve().name, digest.hexdigest()[:10]
    # A registry version already ends with its weights' hash: do not repeat it.
    return name if name.endswith(f"-{short}") else f"{name}-{short}"
