"""P classes x K images per batch, the sampling every in-batch metric loss relies on."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np


class PKSampler:
    """Yields batches of ``classes_per_batch`` classes with ``images_per_class`` images each.

    Classes with fewer than K images are sampled with replacement; classes with a single image
    are never drawn (they cannot form a positive pair). One epoch has ``len(labels) // (P*K)``
    batches. Deterministic for a given seed and epoch (:meth:`set_epoch`).
    """

    def __init__(
        self,
        labels: Sequence[int],
        classes_per_batch: int,
        images_per_class: int,
        seed: int = 0,
    ) -> None:
        by_class: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            by_class[int(label)].append(index)
        self.by_class = {c: np.array(ix) for c, ix in by_class.items() if len(ix) >= 2}
        if len(self.by_class) < 2:
            raise ValueError("PK sampling needs at least 2 classes with 2 or more images each")
        self.P = min(classes_per_batch, len(self.by_class))
        self.K = images_per_class
        self.seed = seed
        self.epoch = 0
        self.num_batches = max(1, len(labels) // (self.P * self.K))

    def set_epoch(self, epoch: int) -> None:
        """Reseed so each epoch draws different batches, reproducibly."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        classes = np.array(sorted(self.by_class))
        for _ in range(self.num_batches):
            batch: list[int] = []
            for c in rng.choice(classes, size=self.P, replace=False):
                members = self.by_class[int(c)]
                take = rng.choice(members, size=self.K, replace=len(members) < self.K)
                batch.extend(int(i) for i in take)
            yield batch
