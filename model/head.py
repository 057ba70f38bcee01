"""Embedding head: pooling (average or GeM), optional linear projection, L2 normalisation."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Pooling = Literal["avg", "gem"]


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al., 2018) with a learnable exponent ``p``.

    ``p = 1`` is average pooling and ``p -> inf`` tends to max pooling.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1)
        return pooled.pow(1.0 / self.p).flatten(1)


class EmbeddingHead(nn.Module):
    """Feature map ``[B, C, H, W]`` -> unit-length embedding ``[B, embed_dim or C]``."""

    def __init__(self, in_features: int, embed_dim: int | None = None, pooling: Pooling = "avg"):
        super().__init__()
        if pooling == "avg":
            self.pool: nn.Module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        elif pooling == "gem":
            self.pool = GeM()
        else:
            raise ValueError(f"unknown pooling {pooling!r}; choose 'avg' or 'gem'")
        self.projection: nn.Module = (
            nn.Linear(in_features, embed_dim) if embed_dim else nn.Identity()
        )
        self.out_features = embed_dim or in_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.pool(features)), dim=-1)


class EmbeddingModel(nn.Module):
    """A timm backbone followed by an :class:`EmbeddingHead`."""

    def __init__(self, backbone: nn.Module, head: EmbeddingHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def embed_dim(self) -> int:
        return self.head.out_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(images))
