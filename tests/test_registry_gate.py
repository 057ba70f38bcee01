"""The model registry (versions, production pointer, history) and the gate's rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.evaluate import EvaluationConfig, metric_value
from components.gate import GateConfig, decide
from components.registry import ModelRegistry, RegistryError


def _package(folder: Path, weights: bytes) -> Path:
    """A folder with the files a registry copies (the weights need not be loadable here)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"backbone": "test_efficientnet"}')
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "checkpoint.pt").write_bytes(b"resume state, not part of a version")
    return folder


def _metrics(inshop: float, sop: float) -> dict:
    return {
        "inshop": {"recall@1": inshop, "recall@10": min(1.0, inshop + 0.2), "map@r": inshop / 2},
        "sop": {"recall@1": sop, "recall@10": min(1.0, sop + 0.2), "map@r": sop / 2},
    }


def test_register_promote_and_history(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    assert registry.production() is None and registry.versions() == []

    first = registry.register(_package(tmp_path / "a", b"weights A"), run_id="night-1")
    assert registry.register(tmp_path / "a") == first  # same weights: same version
    copied = registry.package_path(first)
    assert (copied / "model.safetensors").read_bytes() == b"weights A"
    assert not (copied / "checkpoint.pt").exists()

    registry.promote(first, metrics=_metrics(0.5, 0.5), run_id="night-1", actor="airflow")
    second = registry.register(_package(tmp_path / "b", b"weights B"))
    registry.reject(second, reasons=["inshop.recall@1 regressed"], run_id="night-2")
    assert registry.production_version() == first

    registry.promote(second, actor="ops@laptop")
    pointer = registry.production()
    assert pointer["version"] == second and pointer["previous"] == first
    assert pointer["promoted_by"] == "ops@laptop"
    events = [(e["event"], e["version"]) for e in registry.history()]
    assert events == [
        ("registered", first),
        ("promoted", first),
        ("registered", second),
        ("rejected", second),
        ("promoted", second),
    ]
    assert registry.history()[3]["reasons"] == ["inshop.recall@1 regressed"]
    assert registry.versions() == sorted([first, second])


def test_interrupted_copies_and_unknown_versions(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    half = tmp_path / "registry" / "models" / "20260101T000000Z-deadbeef00"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # no registry.json: the copy never finished
    assert registry.versions() == []
    with pytest.raises(RegistryError, match="no model version"):
        registry.promote("20260101T000000Z-deadbeef00")
    with pytest.raises(RegistryError, match="not a model package"):
        registry.register(tmp_path)


def test_a_remote_registry_through_fsspec(tmp_path: Path) -> None:
    registry = ModelRegistry("memory://vitrine-test/registry")
    version = registry.register(_package(tmp_path / "a", b"weights"))
    registry.promote(version)
    local = registry.package_path(version, cache_dir=tmp_path / "cache")
    assert (local / "model.safetensors").read_bytes() == b"weights"
    assert ModelRegistry("memory://vitrine-test/registry").production_version() == version
    with pytest.raises(RegistryError, match="cache_dir"):
        registry.package_path(version)


def test_the_first_model_is_judged_against_the_floors_alone() -> None:
    config = GateConfig(floors={"inshop.recall@1": 0.4, "sop.recall@1": 0.4})
    passed = decide(_metrics(0.5, 0.45), None, config)
    assert passed["promote"]
    assert passed["reasons"] == ["every check passed (judged against the floors alone)"]
    assert [c["kind"] for c in passed["checks"]] == ["floor", "floor"]

    refused = decide(_metrics(0.5, 0.3), None, config)
    assert not refused["promote"]
    assert refused["reasons"] == ["sop.recall@1 0.3000 is below the floor 0.4000"]


def test_no_metric_may_regress_beyond_the_tolerance() -> None:
    config = GateConfig(floors={"inshop.recall@1": 0.1}, tolerance=0.01)
    production = _metrics(0.60, 0.60)
    within = decide(_metrics(0.595, 0.65), production, config)
    assert within["promote"]
    assert "judged against the floors and production" in within["reasons"][0]

    worse = decide(_metrics(0.70, 0.55), production, config)
    assert not worse["promote"]
    failed = [c["metric"] for c in worse["checks"] if not c["passed"]]
    assert failed == ["sop.recall@1", "sop.recall@10", "sop.map@r"]
    assert worse["reasons"][0] == (
        "sop.recall@1 0.5500 regresses from production's 0.6000 by more than 0.0100"
    )
    json.dumps(worse)  # the decision is a JSON document


def test_a_missing_metric_fails_its_floor() -> None:
    decision = decide({"sop": {"recall@1": 0.9}}, None, GateConfig())
    assert not decision["promote"]
    assert "inshop.recall@1 is missing" in decision["reasons"][0]


def test_gate_and_evaluation_config_from_params() -> None:
    gate = GateConfig.from_dict({"floors": {"inshop.recall@1": 0.5}, "tolerance": 0.02})
    assert gate.floors == {"inshop.recall@1": 0.5} and gate.tolerance == 0.02
    with pytest.raises(ValueError, match="unknown gate option"):
        GateConfig.from_dict({"floor": 0.5})
    with pytest.raises(ValueError, match="tolerance"):
        GateConfig.from_dict({"tolerance": -1})
    sets = EvaluationConfig.from_dict(
        {"sets": [{"name": "sop", "protocol": "sop", "dataset": "sop", "root": "/data/SOP"}]}
    )
    assert sets.sets[0].root == "/data/SOP"
    with pytest.raises(ValueError, match="protocol must be"):
        EvaluationConfig.from_dict({"sets": [{"name": "x", "protocol": "cars"}]})
    with pytest.raises(ValueError, match="unique"):
        EvaluationConfig.from_dict({"sets": [{"name": "x", "protocol": "sop"}] * 2})
    assert metric_value(_metrics(0.5, 0.4), "sop.recall@1") == 0.4
    assert metric_value(_metrics(0.5, 0.4), "cars.recall@1") is None
