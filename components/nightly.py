"""One night of Vitrine, step by step: changed? → validate → train → evaluate → gate → index →
rollout → smoke query → finish.

Every step is a function ``(plan, run_dir) -> dict`` that calls one step implementation
(:mod:`components.validate`, :mod:`components.train`, ...) and writes its result to
``run_dir/<step>.json``. A step whose result file exists returns it instead of running again,
so a retried or rerun task is idempotent and each night writes only under its own folder.
The Airflow DAG runs these functions as tasks; :func:`run_night` runs them in order in one
process (``vitrine nightly``, ``vitrine demo``).

A refused gate ends the night after ``gate``: nothing is indexed or rolled out, so the previous
model and collection keep serving, and ``finish`` records the reasons.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.catalog.config import ValidationConfig
from components.evaluate import EvaluationConfig
from components.gate import GateConfig
from components.index import IndexBuildConfig
from model.config import TrainConfig
from model.jsonfile import write_json

log = logging.getLogger(__name__)
LAST_NIGHT_FILE = "last_night.json"
STEPS = ("changed", "validate", "train", "evaluate", "gate", "index", "rollout", "smoke", "finish")


@dataclass(frozen=True)
class NightlyConfig:
    """The ``nightly`` section of ``params.yaml``.

    Attributes:
        catalogue: The manifest validated each night; None: a seeded demo catalogue generated
            once under ``work_dir/demo-catalog``.
        work_dir: Holds one folder per night (``runs/<run id>``) and ``last_night.json``.
        registry: The model registry's root (a folder or an fsspec URI).
        service_url: The search service to roll out and smoke-test; None skips both (the
            alias is moved all the same, and a service started later serves it).
        mode: ``local``: train and evaluate in this process; ``kfp``: run them as a Kubeflow
            pipeline on ``kfp_host`` and wait.
        kfp_host: The KFP API endpoint for mode ``kfp``.
        kfp_timeout_s: How long to wait for the KFP run.
        skip_unchanged: End the night early when neither the catalogue nor the parameters
            changed since the last finished night.
        demo_products: Products in the generated demo catalogue.
        pushgateway: A Prometheus Pushgateway (``http://host:9091``) the night's metrics are
            pushed to; they are also written to ``work_dir/metrics/vitrine_nightly.prom``.
    """

    catalogue: str | None = None
    work_dir: str = "artifacts/nights"
    registry: str = "artifacts/registry"
    service_url: str | None = None
    mode: str = "local"
    kfp_host: str | None = None
    kfp_timeout_s: float = 6 * 3600
    skip_unchanged: bool = True
    demo_products: int = 80
    pushgateway: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("local", "kfp"):
            raise ValueError(f"nightly.mode must be local or kfp, got {self.mode!r}")
        if self.mode == "kfp" and not self.kfp_host:
            raise ValueError("nightly.mode kfp needs nightly.kfp_host (the KFP API URL)")


@dataclass(frozen=True)
class NightPlan:
    """Every section a night reads, parsed once (see :func:`load_plan`)."""

    nightly: NightlyConfig = field(default_factory=NightlyConfig)
    validate: ValidationConfig = field(default_factory=ValidationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluationConfig = field(default_factory=EvaluationConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    index: IndexBuildConfig = field(default_factory=IndexBuildConfig)
    raw: dict[str, Any] = field(default_factory=dict)  # the sections as read, for hashing

    @property
    def work_dir(self) -> Path:
        return Path(self.nightly.work_dir)


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(raw, "train.epochs", 2)``: the ``-S`` of ``dvc exp run``. Gate floors keep
    their dots: ``gate.floors.inshop.recall@1`` sets the floor named ``inshop.recall@1``."""
    parts = key.split(".")
    if parts[:2] == ["gate", "floors"] and len(parts) > 2:
        parts = [*parts[:2], ".".join(parts[2:])]
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.epochs=2"]`` → ``{"train.epochs": 2}`` (values read as YAML): the ``-S`` of
    ``vitrine nightly`` and ``vitrine pipeline``, as ``dvc exp run -S``."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or "." not in key:
            raise ValueError(f"-S needs SECTION.KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"-S {item!r}: the value is not YAML: {err}") from err
    return overrides


def params_file(params: str | Path | None) -> Path | None:
    """The parameters file to read: ``params`` when given (it must exist), else
    ``./params.yaml`` when there is one, else None (the built-in defaults)."""
    if params is None:
        default = Path("params.yaml")
        return default if default.is_file() else None
    if not Path(params).is_file():
        raise FileNotFoundError(f"params file {params} not found")
    return Path(params)


def load_plan(
    params: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> NightPlan:
    """Parse ``params.yaml`` (or the defaults) with dotted ``overrides`` applied first."""
    from model.config import load_params

    raw = load_params(Path(params)) if params else {}
    raw = json.loads(json.dumps(raw))  # a deep copy of plain data
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    sections = {name: raw.get(name) or {} for name in ("nightly", "validate", "train", "evaluate")}
    sections |= {name: raw.get(name) or {} for name in ("gate", "index", "pipeline")}
    unknown = set(sections["nightly"]) - {f.name for f in dataclasses.fields(NightlyConfig)}
    if unknown:
        raise ValueError(f"unknown nightly option(s): {', '.join(sorted(unknown))}")
    return NightPlan(
        nightly=NightlyConfig(**sections["nightly"]),
        validate=ValidationConfig.from_dict(sections["validate"]),
        train=TrainConfig.from_dict(sections["train"]),
        evaluate=EvaluationConfig.from_dict(sections["evaluate"]),
        gate=GateConfig.from_dict(sections["gate"]),
        index=IndexBuildConfig.from_dict(sections["index"]),
        raw=sections,
    )


def new_run_id(now: datetime | None = None) -> str:
    return f"{(now or datetime.now(UTC)):%Y%m%dT%H%M%SZ}"


def safe_run_id(run_id: str) -> str:
    """A run id usable as a folder name (Airflow's contain ``:`` and ``+``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("_") or "run"


def run_dir_for(plan: NightPlan, run_id: str) -> Path:
    return plan.work_dir / "runs" / safe_run_id(run_id)


# ---- bookkeeping ---------------------------------------------------------------------------


def _result_path(run_dir: Path, step: str) -> Path:
    return Path(run_dir) / f"{step}.json"


def step_result(run_dir: Path, step: str) -> dict[str, Any] | None:
    """A finished step's result, or None."""
    path = _result_path(run_dir, step)
    return json.loads(path.read_text()) if path.is_file() else None


def _require(run_dir: Path, step: str) -> dict[str, Any]:
    result = step_result(run_dir, step)
    if result is None:
        raise RuntimeError(f"step {step!r} has not finished in {run_dir}: run it first")
    return result


def _once(step: str, run_dir: Path, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    done = step_result(run_dir, step)
    if done is not None:
        log.info("step %s already done in %s", step, run_dir)
        return done
    started = time.perf_counter()
    result = work()
    result["seconds"] = time.perf_counter() - started
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json(_result_path(run_dir, step), result)
    return result


def last_night(plan: NightPlan) -> dict[str, Any] | None:
    """What the last finished night recorded, or None."""
    path = plan.work_dir / LAST_NIGHT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ---- the steps -----------------------------------------------------------------------------


def catalogue_path(plan: NightPlan, progress: bool = False) -> Path:
    """The night's manifest; the demo catalogue (generated once) when none is configured."""
    if plan.nightly.catalogue:
        return Path(plan.nightly.catalogue)
    from components.catalog.demo import generate_demo_catalog

    manifest = plan.work_dir / "demo-catalog" / "manifest.csv"
    if not manifest.is_file():
        generate_demo_catalog(
            manifest.parent, products=plan.nightly.demo_products, progress=progress
        )
    return manifest


def catalogue_fingerprint(manifest: Path, plan: NightPlan) -> str:
    """SHA-256 over the manifest's bytes, each local image's size and modification time, and
    the parameters: equal fingerprints mean the night would redo the same work."""
    from model.datasets import find_manifest
    from model.datasets.catalog import read_manifest

    manifest = find_manifest(Path(manifest))
    digest = hashlib.sha256(manifest.read_bytes())
    for row in read_manifest(manifest).rows:
        image = row.values.get("image_path", "")
        digest.update(image.encode())
        path = manifest.parent / image
        if image and "://" not in image and path.is_file():
            stat = path.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(json.dumps(plan.raw, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def step_changed(plan: NightPlan, run_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Has anything changed since the last finished night? (``changed``: bool)"""

    def work() -> dict[str, Any]:
        manifest = catalogue_path(plan, progress)
        fingerprint = catalogue_fingerprint(manifest, plan)
        last = last_night(plan)
        unchanged = last is not None and last.get("fingerprint") == fingerprint
        changed = not (plan.nightly.skip_unchanged and unchanged)
        if not unchanged:
            why = "first night" if last is None else "catalogue or parameters changed"
        else:
            why = f"nothing changed since night {last['run_id']}"  # type: ignore[index]
            if changed:
                why += " (nightly.skip_unchanged is off: running anyway)"
        return {
            "changed": changed,
            "reason": why,
            "catalogue": str(manifest),
            "fingerprint": fingerprint,
            "last_run_id": last.get("run_id") if last else None,
        }

    return _once("changed", run_dir, work)


def step_validate(plan: NightPlan, run_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Validate the catalogue; incremental against the last finished night's image facts."""
    from components.validate import validate_catalog

    def work() -> dict[str, Any]:
        catalogue = _require(run_dir, "changed")["catalogue"]
        last = last_night(plan)
        previous = last.get("validation_dir") if last else None
        if previous and not Path(previous).is_dir():
            previous = None
        summary = validate_catalog(
            catalogue,
            Path(run_dir) / "validate",
            plan.validate,
            previous=previous,
            progress=progress,
        )
        if summary["valid_rows"] == 0:
            raise RuntimeError(
                f"no valid rows in {catalogue}: see {summary['outputs']['quarantine']}"
            )
        return {
            "validated": summary["outputs"]["validated"],
            "quarantine": summary["outputs"]["quarantine"],
            "directory": str(Path(run_dir) / "validate"),
            "input_rows": summary["input_rows"],
            "valid_rows": summary["valid_rows"],
            "quarantined_rows": summary["quarantined_rows"],
            "quarantined_by_reason": summary["quarantined_by_reason"],
        }

    return _once("validate", run_dir, work)


def step_train(plan: NightPlan, run_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Fine-tune a candidate (here, or on Kubeflow with its evaluation in mode ``kfp``)."""
    from components.train import train_candidate

    def work() -> dict[str, Any]:
        validated = _require(run_dir, "validate")["validated"]
        if plan.nightly.mode == "kfp":
            from components.pipeline import train_evaluate_on_kfp

            trained, metrics = train_evaluate_on_kfp(plan, Path(run_dir), validated)
            write_json(Path(run_dir) / "kfp_evaluation.json", metrics)
            return trained
        return train_candidate(
            validated, Path(run_dir) / "train" / "package", plan.train, progress=progress
        )

    return _once("train", run_dir, work)


def step_evaluate(plan: NightPlan, run_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Score the candidate on the In-Shop and SOP evaluation sets."""
    from components.evaluate import evaluate_package

    def work() -> dict[str, Any]:
        from_kfp = Path(run_dir) / "kfp_evaluation.json"
        if from_kfp.is_file():
            return json.loads(from_kfp.read_text())
        package = _require(run_dir, "train")["package"]
        validated = _require(run_dir, "validate")["validated"]
        return evaluate_package(package, validated, plan.evaluate, progress=progress)

    return _once("evaluate", run_dir, work)


def step_gate(plan: NightPlan, run_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Promote the candidate in the registry, or refuse it with reasons (``promote``: bool)."""
    from components.gate import run_gate
    from components.registry import ModelRegistry

    def work() -> dict[str, Any]:
        decision = run_gate(
            _require(run_dir, "train")["package"],
            _require(run_dir, "evaluate"),
            _require(run_dir, "validate")["validated"],
            ModelRegistry(plan.nightly.registry),
            plan.gate,
            plan.evaluate,
            run_id=Path(run_dir).name,
            cache_dir=Path(run_dir) / "registry-cache",
            progress=progress,
        )
        for reason in decision["reasons"]:
            log.info("gate: %s", reason)
        return decision

    return _once("gate", run_dir, work)


def step_index(plan: NightPlan, run_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Index the validated catalogue with the production model; verify; move the alias."""
    from components.index import build_index
    from components.registry import ModelRegistry

    def work() -> dict[str, Any]:
        gate = _require(run_dir, "gate")
        if not gate["promote"]:
            return {"skipped": True, "reason": "the gate refused the candidate"}
        registry = ModelRegistry(plan.nightly.registry)
        package = registry.package_path(gate["serving"], Path(run_dir) / "registry-cache")
        summary = build_index(
            _require(run_dir, "validate")["validated"], package, plan.index, progress=progress
        )
        return summary | {"skipped": False}

    return _once("index", run_dir, work)


def step_rollout(plan: NightPlan, run_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Switch the running service onto the new model and collection."""
    from components.rollout import rollout_service

    def work() -> dict[str, Any]:
        index = _require(run_dir, "index")
        if index.get("skipped"):
            return {"skipped": True, "reason": index["reason"]}
        if not plan.nightly.service_url:
            return {
                "skipped": True,
                "reason": "no nightly.service_url: a service started "
                f"later serves alias {index['alias']}",
            }
        answer = rollout_service(plan.nightly.service_url, collection=index["collection"])
        return answer | {"skipped": False}

    return _once("rollout", run_dir, work)


def step_smoke(plan: NightPlan, run_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Search the live service with a catalogue photo; its product must come back."""
    import csv

    from components.rollout import smoke_query

    def work() -> dict[str, Any]:
        rollout = _require(run_dir, "rollout")
        if rollout.get("skipped"):
            return {"skipped": True, "reason": rollout["reason"]}
        with open(_require(run_dir, "validate")["validated"], newline="") as handle:
            first = next(csv.DictReader(handle))
        answer = smoke_query(
            plan.nightly.service_url,  # type: ignore[arg-type]
            first["image_uri"],
            first["product_id"],
            expected_model=_require(run_dir, "index").get("model_version"),
        )
        return answer | {"skipped": False}

    return _once("smoke", run_dir, work)


def step_finish(plan: NightPlan, run_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Record the night's outcome; the next night compares its fingerprint with this one."""

    def work() -> dict[str, Any]:
        from components.night_metrics import publish_night

        outcome = _outcome(plan, run_dir)
        outcome["metrics"] = publish_night(
            outcome | _figures(run_dir), plan.work_dir, plan.nightly.pushgateway
        )
        if outcome["outcome"] != "skipped":
            write_json(plan.work_dir / LAST_NIGHT_FILE, outcome)
        return outcome

    return _once("finish", run_dir, work)


def _outcome(plan: NightPlan, run_dir: Path) -> dict[str, Any]:
    """What a night ended with, for ``last_night.json`` and the monitoring."""
    changed = _require(run_dir, "changed")
    now = datetime.now(UTC)
    previous = last_night(plan) or {}
    outcome: dict[str, Any] = {
        "run_id": Path(run_dir).name,
        "run_dir": str(run_dir),
        "finished_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "finished_ts": now.timestamp(),
        "fingerprint": changed["fingerprint"],
        "last_success_ts": previous.get("last_success_ts"),
        "consecutive_rejections": previous.get("consecutive_rejections", 0),
    }
    if not changed["changed"]:
        return outcome | {"outcome": "skipped", "reasons": [changed["reason"]]}
    gate = _require(run_dir, "gate")
    validate = _require(run_dir, "validate")
    outcome |= {
        "validation_dir": validate["directory"],
        "valid_rows": validate["valid_rows"],
        "quarantined_rows": validate["quarantined_rows"],
        "candidate": gate["candidate"],
        "production": gate["serving"],
        "reasons": gate["reasons"],
    }
    if not gate["promote"]:
        outcome["outcome"] = "rejected"
        outcome["consecutive_rejections"] += 1
        return outcome
    index = _require(run_dir, "index")
    return outcome | {
        "outcome": "promoted",
        "collection": index["collection"],
        "last_success_ts": now.timestamp(),
        "consecutive_rejections": 0,
    }


def _figures(run_dir: Path) -> dict[str, Any]:
    """The figures monitoring reads from the night's steps (not kept in last_night.json)."""
    gate = step_result(run_dir, "gate") or {}
    index = step_result(run_dir, "index") or {}
    return {
        "candidate_metrics": step_result(run_dir, "evaluate"),
        "production_metrics": gate.get("production_metrics"),
        "index_seconds": None if index.get("skipped", True) else index.get("seconds"),
        "collection_rows": index.get("rows"),
    }


STEP_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "changed": step_changed,
    "validate": step_validate,
    "train": step_train,
    "evaluate": step_evaluate,
    "gate": step_gate,
    "index": step_index,
    "rollout": step_rollout,
    "smoke": step_smoke,
    "finish": step_finish,
}


def run_night(
    plan: NightPlan,
    run_id: str | None = None,
    *,
    progress: bool = True,
    on_step: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every step in order in this process; a skipped night or a refused gate ends early
    (straight to ``finish``). Returns each step's result by name."""
    run_dir = run_dir_for(plan, run_id or new_run_id())
    results: dict[str, Any] = {"run_dir": str(run_dir)}
    for step in STEPS:
        if step != "finish":
            if step != "changed" and not results["changed"]["changed"]:
                continue
            if step in ("index", "rollout", "smoke") and not results["gate"]["promote"]:
                continue
        results[step] = STEP_FUNCTIONS[step](plan, run_dir, progress)
        if on_step:
            on_step(step, results[step])
    return results
