"""The promotion gate: a candidate replaces production only if every floor holds and no metric
regresses by more than the tolerance.

:func:`decide` is the rule alone, over two metrics documents from :mod:`components.evaluate`.
:func:`run_gate` is the step: it registers the candidate, scores the production model on the
same evaluation sets, decides, and moves the registry's ``production`` pointer or records the
rejection. The first model ever is judged against the floors alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.evaluate import EvaluationConfig, evaluate_package, metric_value
from components.registry import ModelRegistry

_DEFAULT_FLOORS = {"inshop.recall@1": 0.2, "sop.recall@1": 0.2}


@dataclass(frozen=True)
class GateConfig:
    """The ``gate`` section of ``params.yaml``.

    Attributes:
        floors: Dotted metric name → lowest acceptable value (``inshop.recall@1: 0.5``).
        tolerance: Largest allowed drop of any compared metric against production, absolute
            (0.01 = one point of recall).
        compare: Metrics checked for regression; empty: every ``recall@K`` and ``map@r`` of
            every evaluation set.
    """

    floors: dict[str, float] = field(default_factory=lambda: dict(_DEFAULT_FLOORS))
    tolerance: float = 0.01
    compare: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GateConfig:
        raw = dict(raw)
        unknown = set(raw) - {"floors", "tolerance", "compare"}
        if unknown:
            raise ValueError(f"unknown gate option(s): {', '.join(sorted(unknown))}")
        floors = {str(k): float(v) for k, v in (raw.get("floors") or {}).items()}
        tolerance = float(raw.get("tolerance", 0.01))
        if tolerance < 0:
            raise ValueError(f"gate.tolerance must be ≥ 0, got {tolerance}")
        return cls(
            floors=floors if "floors" in raw else dict(_DEFAULT_FLOORS),
            tolerance=tolerance,
            compare=tuple(raw.get("compare") or ()),
        )


def compared_metrics(metrics: dict[str, Any], config: GateConfig) -> list[str]:
    """The dotted names checked for regression."""
    if config.compare:
        return list(config.compare)
    names = []
    for set_name, block in metrics.items():
        if isinstance(block, dict):
            names += [
                f"{set_name}.{key}" for key in block if key.startswith("recall@") or key == "map@r"
            ]
    return names


def decide(
    candidate: dict[str, Any], production: dict[str, Any] | None, config: GateConfig
) -> dict[str, Any]:
    """The gate's decision as a JSON-ready document.

    Returns:
        ``{"promote": bool, "reasons": [...], "checks": [...]}``: one check per floor and per
        compared metric, each with its values and whether it passed; ``reasons`` says in words
        why the candidate was refused (or that it passed).
    """
    checks: list[dict[str, Any]] = []
    reasons: list[str] = []
    for name, floor in config.floors.items():
        value = metric_value(candidate, name)
        passed = value is not None and value >= floor
        checks.append(
            {"kind": "floor", "metric": name, "value": value, "floor": floor} | {"passed": passed}
        )
        if value is None:
            reasons.append(f"{name} is missing from the candidate's metrics")
        elif not passed:
            reasons.append(f"{name} {value:.4f} is below the floor {floor:.4f}")
    if production is not None:
        for name in compared_metrics(candidate, config):
            new, old = metric_value(candidate, name), metric_value(production, name)
            if new is None or old is None:
                continue
            passed = new >= old - config.tolerance
            checks.append(
                {"kind": "regression", "metric": name, "value": new, "production": old}
                | {"tolerance": config.tolerance, "passed": passed}
            )
            if not passed:
                reasons.append(
                    f"{name} {new:.4f} regresses from production's {old:.4f} by more than "
                    f"{config.tolerance:.4f}"
                )
    promote = not reasons
    if promote:
        against = "the floors and production" if production is not None else "the floors alone"
        reasons.append(f"every check passed (judged against {against})")
    return {"promote": promote, "reasons": reasons, "checks": checks}


def run_gate(
    candidate_package: str | Path,
    candidate_metrics: dict[str, Any],
    catalogue: str | Path | None,
    registry: ModelRegistry,
    config: GateConfig,
    evaluation: EvaluationConfig | None = None,
    *,
    run_id: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Register the candidate, score production on the same sets, decide, then promote or
    record the rejection.

    Returns:
        The decision (see :func:`decide`) plus ``candidate`` and ``production`` versions, the
        production model's metrics, and ``serving``: the version in production afterwards.
    """
    candidate = registry.register(candidate_package, metrics=candidate_metrics, run_id=run_id)
    production = registry.production_version()
    production_metrics = None
    if production is not None and production != candidate:
        package = registry.package_path(production, cache_dir)
        production_metrics = evaluate_package(package, catalogue, evaluation, progress=progress)
    decision = decide(candidate_metrics, production_metrics, config)
    if production == candidate:
        decision["reasons"].append("the candidate's weights are already in production")
    if decision["promote"]:
        registry.promote(candidate, metrics=candidate_metrics, decision=decision, run_id=run_id)
    else:
        registry.reject(candidate, reasons=decision["reasons"], run_id=run_id)
    return decision | {
        "candidate": candidate,
        "production": production,
        "production_metrics": production_metrics,
        "serving": registry.production_version(),
    }
