"""The evaluate step: Recall@K and MAP@R of one model package on the configured evaluation sets.

By default both sets are the held-out products of the night's validated catalogue, scored
under the In-Shop protocol (one query photo per product searches the other photos) and the
SOP protocol (every photo queries all others). A set may instead name a real SOP or In-Shop
dataset folder in its official format. The gate scores candidate and production with this
same function on the same sets, so their figures compare.

Output: ``{"inshop": {"recall@1": ..., ...}, "sop": {...}, "model_version": ...}``, one
nested block per set, the shape DVC metrics and ``dvc exp show`` read as ``inshop.recall@1``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.datasets.records import RetrievalDataset


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set.

    Attributes:
        name: Its key in the metrics (``inshop`` → ``inshop.recall@1``).
        protocol: ``inshop`` or ``sop``.
        dataset: ``catalog``, ``sop`` or ``inshop``: the reader for ``root``.
        root: The dataset folder or manifest; None: the night's validated catalogue.
    """

    name: str
    protocol: str
    dataset: str = "catalog"
    root: str | None = None


def _default_sets() -> tuple[EvalSet, ...]:
    return (EvalSet("inshop", "inshop"), EvalSet("sop", "sop"))


@dataclass(frozen=True)
class EvaluationConfig:
    """The ``evaluate`` section of ``params.yaml``."""

    sets: tuple[EvalSet, ...] = field(default_factory=_default_sets)
    batch_size: int = 64
    device: str = "auto"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EvaluationConfig:
        raw = dict(raw)
        sets = raw.pop("sets", None)
        unknown = set(raw) - {"batch_size", "device"}
        if unknown:
            raise ValueError(f"unknown evaluate option(s): {', '.join(sorted(unknown))}")
        if sets is None:
            return cls(**raw)
        parsed = []
        for item in sets:
            if not isinstance(item, dict) or "name" not in item or "protocol" not in item:
                raise ValueError(f"each evaluate.sets entry needs name and protocol, got {item!r}")
            extra = set(item) - {"name", "protocol", "dataset", "root"}
            if extra:
                raise ValueError(f"unknown evaluation-set option(s): {', '.join(sorted(extra))}")
            if item["protocol"] not in ("sop", "inshop"):
                raise ValueError(f"evaluation set {item['name']!r}: protocol must be sop or inshop")
            parsed.append(EvalSet(**item))
        if len({s.name for s in parsed}) != len(parsed):
            raise ValueError("evaluation set names must be unique")
        return cls(sets=tuple(parsed), **raw)


def load_eval_set(spec: EvalSet, catalogue: str | Path | None) -> RetrievalDataset:
    """The images of one evaluation set under its protocol."""
    from model.datasets import load_dataset
    from model.datasets.protocols import as_protocol

    root = spec.root
    if root is None:
        if catalogue is None:
            raise ValueError(f"evaluation set {spec.name!r} needs a root or a catalogue")
        root = str(catalogue)
    return as_protocol(load_dataset(spec.dataset, root), spec.protocol)  # type: ignore[arg-type]


def evaluate_package(
    package: str | Path,
    catalogue: str | Path | None,
    config: EvaluationConfig | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the model package on every evaluation set.

    Args:
        package: A model package folder.
        catalogue: The validated manifest the sets without a ``root`` read.
        config: The sets and the batch size; the defaults when None.
        progress: Show progress bars.

    Returns:
        One block of metrics per set name, plus ``model_version`` and ``seconds``.
    """
    from model.evaluate_dataset import evaluate_model
    from model.package import load_package, package_version
    from model.train import resolve_device

    config = config or EvaluationConfig()
    started = time.perf_counter()
    device = resolve_device(config.device)
    model, model_config = load_package(Path(package), device)
    result: dict[str, Any] = {"model_version": package_version(Path(package))}
    for spec in config.sets:
        dataset = load_eval_set(spec, catalogue)
        metrics = evaluate_model(
            model,
            dataset,
            model_config.data,
            batch_size=config.batch_size,
            device=device,
            progress=progress,
        )
        metrics["dataset"] = spec.dataset
        result[spec.name] = metrics
    result["seconds"] = time.perf_counter() - started
    return result


def metric_value(metrics: dict[str, Any], name: str) -> float | None:
    """A metric by dotted name (``inshop.recall@1``), or None when absent."""
    node: Any = metrics
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, int | float) else None


def write_recall_curves(metrics: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """One CSV per evaluation set, ``recall_<set>.csv`` with columns ``k,recall``: the
    Recall@K-against-K curves ``dvc plots`` draws."""
    import csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, block in metrics.items():
        if not isinstance(block, dict):
            continue
        points = sorted(
            (int(key.split("@", 1)[1]), float(value))
            for key, value in block.items()
            if key.startswith("recall@")
        )
        path = out_dir / f"recall_{name}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["k", "recall"])
            writer.writerows(points)
        written.append(path)
    return written
