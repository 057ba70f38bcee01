"""The nightly workflow as a Kubeflow Pipelines v2 pipeline.

Two pipelines are built from the same components::

    vitrine-nightly:         validate → train (GPU) → evaluate → gate ─┬─ promote: index
                                                                       └─ else:    reject
    vitrine-train-evaluate:  stage-validated → train (GPU) → evaluate

Each component is a thin wrapper over the step function the CLI, the DVC stages and the
Airflow tasks call (:func:`components.validate.validate_catalog`,
:func:`components.train.train_candidate`, :func:`components.evaluate.evaluate_package`,
:func:`components.gate.run_gate`, :func:`components.index.build_index`); a body only unpacks
its arguments, calls the step and records what it returned. Outputs are typed artifacts: the
validated catalogue is a ``Dataset`` folder, the candidate a ``Model`` folder (the model
package), the figures ``Metrics`` (``inshop-recall@1``, ...). Every component gets the same
configuration: ``params_json``, the step sections of ``params.yaml`` as one JSON string, parsed
in the pod by :func:`plan_from_json` exactly as :func:`components.nightly.load_plan` parses
``params.yaml``.

The ``pipeline`` section of ``params.yaml`` (:class:`PipelineSettings`) sets the image every
component runs in and what the train task asks of the cluster: an accelerator, CPU and memory,
tolerations and a node selector for the GPU pool, and optionally a shared volume.

**Exports.** A cluster keeps artifacts in its object store. So that a caller outside the
cluster (the Airflow worker running the nightly ``train`` step in mode ``kfp``) can read them,
every component also copies its outputs into the ``export_dir`` pipeline parameter when it is
not empty: ``validate/``, ``package/`` + ``train.json``, ``evaluation.json``, ``gate.json``,
``index.json``. That folder must be storage both the caller and the pods see at the same path:
a ReadWriteMany volume (NFS, CephFS, EFS, Filestore) mounted on the Airflow workers and into
every task with ``pipeline.shared_volume`` (``{pvc: NAME, mount_path: PATH}``), with
``nightly.work_dir`` under that path. The catalogue and its images must be readable from the
pods too (the same volume, or fsspec URIs).

Caching is off for every task: the gate writes the registry and the index writes Milvus, so
a cached task would silently skip them.

Component bodies import what they need inside, as KFP requires; this module imports
:mod:`components.nightly` (and so torch) only where it parses a plan.
"""

import json
import logging
import re
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

if TYPE_CHECKING:  # components.nightly imports torch (through the gate's registry)
    from components.nightly import NightPlan

log = logging.getLogger(__name__)

NIGHTLY_PIPELINE = "vitrine-nightly"
TRAIN_EVALUATE_PIPELINE = "vitrine-train-evaluate"
STEP_SECTIONS = ("validate", "train", "evaluate", "gate", "index")
DEFAULT_BASE_IMAGE = "ghcr.io/vitrine-ml/vitrine:0.1.0"
_GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "toleration_seconds"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOCAL_WARNINGS = ("no effect in the current local runner", "custom or non-Python base image")


# ---- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineSettings:
    """The ``pipeline`` section of ``params.yaml``: where the pipeline runs and what it asks for.

    Attributes:
        base_image: The image every component runs in; it ships Python, kfp and vitrine
            (components are built with ``install_kfp_package=False``).
        accelerator_type: The train task's accelerator resource (``nvidia.com/gpu``).
        accelerator_limit: Accelerators per train task; 0 asks for none.
        cpu_request: CPU the train task requests (Kubernetes quantity: ``4``, ``500m``).
        memory_request: Memory the train task requests (``16Gi``).
        tolerations: Tolerations of the train pod (``key``, ``operator``, ``value``,
            ``effect``, ``toleration_seconds``), e.g. for the GPU pool's taint.
        node_selector: Node labels the train pod requires.
        shared_volume: ``{pvc: NAME, mount_path: PATH}``: a PersistentVolumeClaim mounted into
            every task, holding ``export_dir`` (and usually the catalogue); None mounts none.
        experiment: The KFP experiment runs are filed under.
        namespace: The Kubernetes namespace (multi-user KFP); None: the client's default.
        pipeline_root: Where the cluster stores artifacts (``s3://...``, ``minio://...``);
            None: the KFP deployment's default.
    """

    base_image: str = DEFAULT_BASE_IMAGE
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_limit: int = 1
    cpu_request: str = "4"
    memory_request: str = "16Gi"
    tolerations: tuple[dict[str, Any], ...] = (_GPU_TOLERATION,)
    node_selector: dict[str, str] = field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )
    shared_volume: dict[str, str] | None = None
    experiment: str = "vitrine"
    namespace: str | None = None
    pipeline_root: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "PipelineSettings":
        """From the ``pipeline`` section; unknown options are an error."""
        raw = dict(raw or {})
        names = set(cls.__dataclass_fields__)
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"unknown pipeline option(s): {', '.join(sorted(unknown))}")
        if "tolerations" in raw:
            tolerations = raw["tolerations"] or []
            if not isinstance(tolerations, list | tuple):
                raise ValueError("pipeline.tolerations must be a list of mappings")
            for item in tolerations:
                if not isinstance(item, dict) or set(item) - _TOLERATION_KEYS:
                    raise ValueError(
                        f"pipeline.tolerations entries take {', '.join(sorted(_TOLERATION_KEYS))};"
                        f" got {item!r}"
                    )
            raw["tolerations"] = tuple(dict(item) for item in tolerations)
        if "node_selector" in raw:
            selector = raw["node_selector"] or {}
            if not isinstance(selector, dict):
                raise ValueError("pipeline.node_selector must map label keys to values")
            raw["node_selector"] = {str(k): str(v) for k, v in selector.items()}
        volume = raw.get("shared_volume")
        if volume is not None and (
            not isinstance(volume, dict) or set(volume) != {"pvc", "mount_path"}
        ):
            raise ValueError("pipeline.shared_volume needs exactly pvc and mount_path")
        for key in ("cpu_request", "memory_request"):
            if key in raw:
                raw[key] = str(raw[key])
        if "accelerator_limit" in raw:
            limit = raw["accelerator_limit"]
            if isinstance(limit, bool) or not str(limit).isdigit():
                raise ValueError(
                    f"pipeline.accelerator_limit must be an integer ≥ 0, got {limit!r}"
                )
            raw["accelerator_limit"] = int(limit)
        settings = cls(**raw)
        if not settings.base_image:
            raise ValueError("pipeline.base_image is empty")
        return settings


def plan_settings(plan: "NightPlan") -> PipelineSettings:
    """The plan's ``pipeline`` section (defaults where the plan carries none)."""
    return PipelineSettings.from_dict(plan.raw.get("pipeline"))


def plan_params_json(plan: "NightPlan") -> str:
    """The step sections of a plan as the ``params_json`` pipeline parameter."""
    return json.dumps({name: plan.raw.get(name) or {} for name in STEP_SECTIONS}, sort_keys=True)


def plan_from_json(params: str, overrides: dict[str, Any] | None = None) -> "NightPlan":
    """Parse ``params_json`` (plus dotted ``overrides``) into a plan, in the pod."""
    try:
        sections = json.loads(params or "{}")
    except json.JSONDecodeError as err:
        raise ValueError(f"params_json is not JSON: {err}") from err
    if not isinstance(sections, dict):
        raise ValueError("params_json must be a JSON object of params.yaml sections")
    from components.nightly import load_plan

    return load_plan(None, {**sections, **(overrides or {})})


# ---- helpers the component bodies import ---------------------------------------------------


def export_output(source: str, export_dir: str, name: str) -> str | None:
    """Copy a file or folder to ``export_dir/name`` (replacing it); None without export_dir."""
    if not export_dir:
        return None
    target = Path(export_dir) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        shutil.rmtree(target)
    if Path(source).is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)
    return str(target)


def write_output_json(path: str, payload: dict[str, Any]) -> None:
    """Write an artifact's JSON file."""
    from model.jsonfile import write_json

    write_json(Path(path), payload)


def evaluation_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """``{"inshop": {"recall@1": x}}`` → ``{"inshop-recall@1": x}``: Recall@K and MAP@R per
    evaluation set, the names the KFP UI shows."""
    flat = {}
    for set_name, block in evaluation.items():
        if isinstance(block, dict):
            for key, value in block.items():
                wanted = key.startswith("recall@") or key == "map@r"
                if wanted and isinstance(value, int | float) and not isinstance(value, bool):
                    flat[f"{set_name}-{key}"] = float(value)
    return flat


def training_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The scalar figures of :func:`components.train.train_candidate`'s result, and the last
    epoch's loss and validation scores."""
    train = summary.get("train") or {}
    flat = {
        k: float(v)
        for k, v in train.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    history = train.get("history") or []
    if history:
        last = history[-1]
        flat |= {
            k.replace("val_", "val-"): float(v)
            for k, v in last.items()
            if k in ("loss", "val_recall@1", "val_map@r") and isinstance(v, int | float)
        }
        flat["epochs"] = float(last.get("epoch", len(history)))
    flat["minutes"] = float(summary.get("minutes", 0.0))
    return flat


# ---- components (bodies run in the pod: imports inside, KFP copies only the function) -----


def validate(catalogue: str, params_json: str, export_dir: str, dataset: Output[Dataset]):
    """Validate the catalogue into the ``dataset`` folder (validated.csv, quarantine.csv, ...)."""
    from components.pipeline import export_output, plan_from_json
    from components.validate import validate_catalog

    if not catalogue:
        raise ValueError("pipeline parameter catalogue is empty: give the manifest's path or URI")
    plan = plan_from_json(params_json)
    summary = validate_catalog(catalogue, dataset.path, plan.validate, progress=False)
    for key in ("input_rows", "valid_rows", "quarantined_rows"):
        dataset.metadata[key] = summary[key]
    export_output(dataset.path, export_dir, "validate")


def stage_validated(validated: str, dataset: Output[Dataset]):
    """Copy an existing validated manifest into a ``Dataset`` (the train-evaluate pipeline)."""
    import os
    import shutil

    from components.validate import VALIDATED_FILE

    if not os.path.isfile(validated):
        raise FileNotFoundError(f"validated manifest {validated} not found from this pod")
    os.makedirs(dataset.path, exist_ok=True)
    shutil.copyfile(validated, os.path.join(dataset.path, VALIDATED_FILE))


def train(
    dataset: Input[Dataset],
    params_json: str,
    export_dir: str,
    model: Output[Model],
    train_metrics: Output[Metrics],
):
    """Fine-tune a candidate; ``model`` is the model package folder."""
    import os

    from components.pipeline import (
        export_output,
        plan_from_json,
        training_metrics,
        write_output_json,
    )
    from components.train import train_candidate
    from components.validate import VALIDATED_FILE

    plan = plan_from_json(params_json)
    validated = os.path.join(dataset.path, VALIDATED_FILE)
    summary = train_candidate(validated, model.path, plan.train, progress=False)
    for name, value in training_metrics(summary).items():
        train_metrics.log_metric(name, value)
    model.metadata["backbone"] = plan.train.backbone
    model.metadata["loss"] = summary["loss"]
    package = export_output(model.path, export_dir, "package")
    if package:
        write_output_json(os.path.join(export_dir, "train.json"), summary | {"package": package})


def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    params_json: str,
    export_dir: str,
    metrics: Output[Metrics],
    evaluation: Output[Artifact],
):
    """Recall@K and MAP@R of the candidate on every evaluation set."""
    import os

    from components.evaluate import evaluate_package
    from components.pipeline import (
        evaluation_metrics,
        export_output,
        plan_from_json,
        write_output_json,
    )
    from components.validate import VALIDATED_FILE

    plan = plan_from_json(params_json)
    validated = os.path.join(dataset.path, VALIDATED_FILE)
    result = evaluate_package(model.path, validated, plan.evaluate, progress=False)
    for name, value in evaluation_metrics(result).items():
        metrics.log_metric(name, value)
    write_output_json(evaluation.path, result)
    export_output(evaluation.path, export_dir, "evaluation.json")


def gate(
    dataset: Input[Dataset],
    model: Input[Model],
    evaluation: Input[Artifact],
    params_json: str,
    registry: str,
    run_id: str,
    export_dir: str,
    decision: Output[Artifact],
) -> NamedTuple("GateOutputs", [("promote", bool), ("reason", str), ("version", str)]):
    """Register the candidate, compare it with production, promote it or record why not."""
    import json
    import os
    import tempfile
    from collections import namedtuple

    from components.gate import run_gate
    from components.pipeline import (
        export_output,
        plan_from_json,
        write_output_json,
    )
    from components.registry import ModelRegistry
    from components.validate import VALIDATED_FILE

    if not registry:
        raise ValueError("pipeline parameter registry is empty: give the registry's folder or URI")
    plan = plan_from_json(params_json)
    with open(evaluation.path) as handle:
        candidate_metrics = json.load(handle)
    with tempfile.TemporaryDirectory(prefix="vitrine-registry-") as cache:
        result = run_gate(
            model.path,
            candidate_metrics,
            os.path.join(dataset.path, VALIDATED_FILE),
            ModelRegistry(registry),
            plan.gate,
            plan.evaluate,
            run_id=run_id or None,
            cache_dir=cache,
            progress=False,
        )
    for reason in result["reasons"]:
        print(f"gate: {reason}")
    write_output_json(decision.path, result)
    decision.metadata["promote"] = result["promote"]
    export_output(decision.path, export_dir, "gate.json")
    outputs = namedtuple("GateOutputs", ["promote", "reason", "version"])
    return outputs(bool(result["promote"]), "; ".join(result["reasons"]), result["serving"] or "")


def index(
    dataset: Input[Dataset],
    version: str,
    params_json: str,
    registry: str,
    milvus_uri: str,
    export_dir: str,
    summary: Output[Artifact],
):
    """Index the catalogue with the production model, verify, move the alias."""
    import os
    import tempfile

    from components.index import build_index
    from components.pipeline import (
        export_output,
        plan_from_json,
        write_output_json,
    )
    from components.registry import ModelRegistry
    from components.validate import VALIDATED_FILE

    plan = plan_from_json(params_json, {"index.uri": milvus_uri} if milvus_uri else None)
    validated = os.path.join(dataset.path, VALIDATED_FILE)
    with tempfile.TemporaryDirectory(prefix="vitrine-registry-") as cache:
        package = ModelRegistry(registry).package_path(version, cache)
        result = build_index(validated, package, plan.index, progress=False)
    write_output_json(summary.path, result)
    summary.metadata["collection"] = result["collection"]
    summary.metadata["alias"] = result["alias"]
    export_output(summary.path, export_dir, "index.json")


def reject(reason: str, version: str):
    """The gate refused the candidate: nothing is indexed; say why."""
    print(f"gate refused the candidate; production stays at {version or 'no model yet'}")
    for line in reason.split("; "):
        print(f"  - {line}")


# ---- the pipelines -------------------------------------------------------------------------


class Components(NamedTuple):
    validate: Any
    stage_validated: Any
    train: Any
    evaluate: Any
    gate: Any
    index: Any
    reject: Any


def build_components(base_image: str = DEFAULT_BASE_IMAGE) -> Components:
    """Every component, running in ``base_image`` (which ships kfp and vitrine)."""

    def component(func: Callable[..., Any]) -> Any:
        return dsl.component(func, base_image=base_image, install_kfp_package=False)

    return Components(
        *(component(f) for f in (validate, stage_validated, train, evaluate, gate, index, reject))
    )


def _configure(
    task: Any, settings: PipelineSettings, *, gpu: bool, resources: bool, train: bool
) -> Any:
    """Caching off everywhere; the shared volume; the train task's resources and placement."""
    from kfp import kubernetes

    task.set_caching_options(False)
    if resources and settings.shared_volume:
        kubernetes.mount_pvc(
            task,
            pvc_name=settings.shared_volume["pvc"],
            mount_path=settings.shared_volume["mount_path"],
        )
    if not (train and resources):
        return task
    task.set_cpu_request(settings.cpu_request).set_memory_request(settings.memory_request)
    if gpu and settings.accelerator_limit > 0:
        task.set_accelerator_type(settings.accelerator_type)
        task.set_accelerator_limit(settings.accelerator_limit)
        for toleration in settings.tolerations:
            kubernetes.add_toleration(task, **toleration)
        for key, value in settings.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
    return task


def nightly_pipeline(
    plan: "NightPlan",
    settings: PipelineSettings | None = None,
    *,
    gpu: bool = True,
    resources: bool = True,
) -> Any:
    """The whole night as a pipeline, with the plan's values as parameter defaults.

    Args:
        plan: Its step sections become the ``params_json`` default; its registry and Milvus
            URI the ``registry`` and ``milvus_uri`` defaults.
        settings: Image and train-task resources; the plan's ``pipeline`` section when None.
        gpu: Ask for the accelerator (and its tolerations and node selector).
        resources: Set requests, placement and volumes at all (False for ``kfp.local``, which
            ignores them).
    """
    settings = settings or plan_settings(plan)
    ops = build_components(settings.base_image)
    default_params = plan_params_json(plan)
    default_registry = plan.nightly.registry
    default_milvus = plan.index.uri

    def configure(task: Any, train: bool = False) -> Any:
        return _configure(task, settings, gpu=gpu, resources=resources, train=train)

    @dsl.pipeline(
        name=NIGHTLY_PIPELINE,
        description="Vitrine's night: validate the catalogue, fine-tune a candidate on a GPU, "
        "evaluate Recall@K, gate it against the floors and production, and index the catalogue "
        "with the promoted model.",
    )
    def vitrine_nightly(
        catalogue: str = "",
        params_json: str = default_params,
        registry: str = default_registry,
        milvus_uri: str = default_milvus,
        run_id: str = "",
        export_dir: str = "",
    ):
        validated = configure(
            ops.validate(catalogue=catalogue, params_json=params_json, export_dir=export_dir)
        )
        dataset = validated.outputs["dataset"]
        trained = configure(
            ops.train(dataset=dataset, params_json=params_json, export_dir=export_dir), train=True
        )
        model = trained.outputs["model"]
        scored = configure(
            ops.evaluate(
                dataset=dataset, model=model, params_json=params_json, export_dir=export_dir
            )
        )
        decided = configure(
            ops.gate(
                dataset=dataset,
                model=model,
                evaluation=scored.outputs["evaluation"],
                params_json=params_json,
                registry=registry,
                run_id=run_id,
                export_dir=export_dir,
            )
        )
        with dsl.If(decided.outputs["promote"] == True, name="promote"):  # noqa: E712
            configure(
                ops.index(
                    dataset=dataset,
                    version=decided.outputs["version"],
                    params_json=params_json,
                    registry=registry,
                    milvus_uri=milvus_uri,
                    export_dir=export_dir,
                )
            )
        with dsl.Else(name="refused"):
            configure(
                ops.reject(reason=decided.outputs["reason"], version=decided.outputs["version"])
            )

    return vitrine_nightly


def train_evaluate_pipeline(
    plan: "NightPlan",
    settings: PipelineSettings | None = None,
    *,
    gpu: bool = True,
    resources: bool = True,
) -> Any:
    """Train and evaluate only, from an already validated manifest (nightly mode ``kfp``)."""
    settings = settings or plan_settings(plan)
    ops = build_components(settings.base_image)
    default_params = plan_params_json(plan)

    def configure(task: Any, train: bool = False) -> Any:
        return _configure(task, settings, gpu=gpu, resources=resources, train=train)

    @dsl.pipeline(
        name=TRAIN_EVALUATE_PIPELINE,
        description="Fine-tune a Vitrine candidate on a GPU from a validated manifest and "
        "evaluate its Recall@K; the caller gates and indexes.",
    )
    def vitrine_train_evaluate(
        validated: str = "",
        params_json: str = default_params,
        export_dir: str = "",
    ):
        staged = configure(ops.stage_validated(validated=validated))
        dataset = staged.outputs["dataset"]
        trained = configure(
            ops.train(dataset=dataset, params_json=params_json, export_dir=export_dir), train=True
        )
        configure(
            ops.evaluate(
                dataset=dataset,
                model=trained.outputs["model"],
                params_json=params_json,
                export_dir=export_dir,
            )
        )

    return vitrine_train_evaluate


def compile_pipeline(pipeline: Any, out: str | Path) -> Path:
    """Compile to a pipeline package (YAML) any KFP v2 backend runs."""
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(out))
    return out


# ---- running ---------------------------------------------------------------------------------


def run_local(pipeline: Any, arguments: dict[str, Any], pipeline_root: str | Path) -> Path:
    """Run a pipeline with ``kfp.local`` in subprocesses of this Python environment.

    Tasks run one after another in this process's environment and working directory; each
    task's outputs land under ``<pipeline_root>/<pipeline name>-<timestamp>/<task>/``.

    Returns:
        That run folder.

    Raises:
        RuntimeError: A task failed (its log is above, on this process's output).
    """
    from kfp import local
    from kfp.local.config import LocalExecutionConfig

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in root.iterdir()}
    previous = LocalExecutionConfig.instance
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    try:
        with warnings.catch_warnings():
            for message in _LOCAL_WARNINGS:  # resources ignored; the image is this Python
                warnings.filterwarnings("ignore", message=f".*{message}")
            pipeline(**arguments)
    except RuntimeError as err:
        raise RuntimeError(
            f"{_ANSI.sub('', str(err))} (kfp.local; the task's log is above; outputs under {root})"
        ) from err
    finally:
        LocalExecutionConfig.instance = previous
    created = sorted(
        (p for p in root.iterdir() if p.name not in before and p.is_dir()),
        key=lambda p: p.stat().st_mtime,
    )
    if not created:
        raise RuntimeError(f"kfp.local wrote no run folder under {root}")
    return created[-1]


def check_reachable(host: str, timeout: float = 10.0) -> None:
    """Connect to the KFP API's host and port, or raise a RuntimeError saying what to check."""
    parts = urlsplit(host if "://" in host else f"https://{host}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"KFP host {host!r} is not an http(s) URL (e.g. http://localhost:8080)")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as err:
        raise RuntimeError(
            f"cannot reach the Kubeflow Pipelines API at {host} ({parts.hostname}:{port}: "
            f"{err}). Check nightly.kfp_host (or --host): the KFP endpoint, e.g. "
            "http://ml-pipeline-ui.kubeflow.svc.cluster.local from inside the cluster or "
            "http://localhost:8080 after `kubectl port-forward -n kubeflow svc/ml-pipeline-ui "
            "8080:80`; that the KFP API server is running; and that no firewall or proxy "
            "blocks this machine"
        ) from err


def _kfp_call(host: str, what: str, call: Callable[[], Any]) -> Any:
    """Run a kfp.Client call, turning transport and API errors into one clear RuntimeError."""
    import kfp_server_api
    from urllib3.exceptions import HTTPError

    try:
        return call()
    except kfp_server_api.ApiException as err:
        hint = (
            " (authentication: give the namespace with pipeline.namespace and a token the "
            "server accepts)"
            if err.status in (401, 403)
            else ""
        )
        raise RuntimeError(
            f"Kubeflow Pipelines at {host}: {what} failed with HTTP {err.status} "
            f"{err.reason}{hint}: {str(err.body or '')[:300]}"
        ) from err
    except HTTPError as err:  # MaxRetryError, timeouts, protocol errors
        raise RuntimeError(
            f"Kubeflow Pipelines at {host}: {what} failed: {err}. Check the host URL, that the "
            "KFP API server is up and reachable from here"
        ) from err


def submit_run(
    host: str,
    package: str | Path,
    arguments: dict[str, Any],
    settings: PipelineSettings,
    *,
    run_name: str,
    wait: bool = True,
    timeout_s: float = 6 * 3600,
) -> dict[str, Any]:
    """Submit a compiled pipeline to a KFP backend, and wait for it when asked.

    Returns:
        ``{"host", "run_id", "run_name", "experiment", "state", "url"}``; ``state`` is None
        when not waiting.

    Raises:
        RuntimeError: The host cannot be reached, the API refuses the run, the run did not
            succeed, or it did not finish within ``timeout_s``.
    """
    import kfp

    check_reachable(host)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="kfp")
        client = _kfp_call(
            host,
            "connecting",
            lambda: kfp.Client(host=host, namespace=settings.namespace or "kubeflow"),
        )
    started = _kfp_call(
        host,
        "creating the run",
        lambda: client.create_run_from_pipeline_package(
            str(package),
            arguments=arguments,
            run_name=run_name,
            experiment_name=settings.experiment,
            namespace=settings.namespace,
            pipeline_root=settings.pipeline_root,
            enable_caching=False,
        ),
    )
    url = f"{host.rstrip('/')}/#/runs/details/{started.run_id}"
    outcome = {
        "host": host,
        "run_id": started.run_id,
        "run_name": run_name,
        "experiment": settings.experiment,
        "state": None,
        "url": url,
    }
    log.info("submitted %s to %s: %s", run_name, host, url)
    if not wait:
        return outcome
    try:
        finished = _kfp_call(
            host,
            "waiting for the run",
            lambda: client.wait_for_run_completion(started.run_id, timeout=timeout_s),
        )
    except TimeoutError as err:
        raise RuntimeError(
            f"KFP run {started.run_id} on {host} did not finish within {timeout_s:.0f} s "
            f"(nightly.kfp_timeout_s); it may still be running: {url}"
        ) from err
    outcome["state"] = str(finished.state)
    if str(finished.state).upper() != "SUCCEEDED":
        error = getattr(finished, "error", None)
        detail = f": {getattr(error, 'message', error)}" if error else ""
        raise RuntimeError(
            f"KFP run {started.run_id} on {host} ended {finished.state}{detail}; see {url}"
        )
    return outcome


def train_evaluate_on_kfp(
    plan: "NightPlan", run_dir: Path, validated: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train and evaluate as a KFP run (nightly mode ``kfp``) and bring the results back.

    Submits ``vitrine-train-evaluate`` to ``plan.nightly.kfp_host``, waits up to
    ``plan.nightly.kfp_timeout_s`` and reads the exports in ``run_dir/kfp`` (which the pods must
    see at the same path: see the module's notes). The host ``local`` runs the same pipeline
    with ``kfp.local`` in this Python environment instead.

    Returns:
        The train summary (``package``: the exported package folder under ``run_dir/kfp``,
        plus ``kfp``: where it ran) and the evaluation metrics.

    Raises:
        RuntimeError: The host is unreachable, the run failed or timed out, or its exports
            are missing.
    """
    host = plan.nightly.kfp_host
    if not host:
        raise ValueError("nightly.kfp_host is not set: the KFP API URL, or local")
    run_dir = Path(run_dir)
    export = (run_dir / "kfp").resolve()
    if export.exists():  # a retried step: leave no file of the earlier attempt
        shutil.rmtree(export)
    export.mkdir(parents=True)
    settings = plan_settings(plan)
    arguments = {
        "validated": str(Path(validated).resolve()),
        "params_json": plan_params_json(plan),
        "export_dir": str(export),
    }
    started = time.perf_counter()
    if host == "local":
        pipeline = train_evaluate_pipeline(plan, settings, resources=False)
        outputs = run_local(pipeline, arguments, run_dir / "kfp-local")
        where: dict[str, Any] = {"host": "local", "outputs": str(outputs)}
    else:
        pipeline = train_evaluate_pipeline(plan, settings)
        package = compile_pipeline(pipeline, export / "pipeline.yaml")
        where = submit_run(
            host,
            package,
            arguments,
            settings,
            run_name=f"{TRAIN_EVALUATE_PIPELINE}-{run_dir.name}",
            timeout_s=plan.nightly.kfp_timeout_s,
        )
    trained, evaluation = export / "train.json", export / "evaluation.json"
    missing = [p.name for p in (trained, evaluation) if not p.is_file()]
    if missing:
        raise RuntimeError(
            f"the KFP run finished but wrote no {', '.join(missing)} to {export}: the pods must "
            "see the run folder at the same path (mount it with pipeline.shared_volume and keep "
            "nightly.work_dir on it)"
        )
    summary = json.loads(trained.read_text())
    summary["kfp"] = where | {"minutes": (time.perf_counter() - started) / 60}
    return summary, json.loads(evaluation.read_text())


def pipeline_arguments(
    plan: "NightPlan",
    catalogue: str,
    *,
    run_id: str | None = None,
    export_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The nightly pipeline's arguments for a plan."""
    from components.nightly import new_run_id

    return {
        "catalogue": str(catalogue),
        "params_json": plan_params_json(plan),
        "registry": plan.nightly.registry,
        "milvus_uri": plan.index.uri,
        "run_id": run_id or new_run_id(),
        "export_dir": str(export_dir or ""),
    }
