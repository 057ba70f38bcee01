"""``vitrine pipeline``: compile the Kubeflow pipeline, run it with ``kfp.local``, or submit it.

A thin edge over :mod:`components.pipeline`; nothing heavy is imported until a handler runs,
so ``vitrine --help`` stays fast. Handlers raise ``ValueError`` / ``RuntimeError`` with a
clear message for bad input, which ``vitrine`` prints as one ``error:`` line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

SET_HELP = (
    "override a params.yaml value, like `dvc exp run -S` (repeatable): -S train.epochs=2, "
    "-S gate.floors.inshop.recall@1=0.5, -S nightly.service_url=http://127.0.0.1:8000, "
    "-S pipeline.accelerator_limit=2; the value is read as YAML"
)
PARAMS_HELP = "params.yaml to read (default: ./params.yaml when it exists, else the defaults)"


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """``--params`` and repeatable ``-S KEY=VALUE`` (into ``args.overrides``), for every
    command that reads a night's plan."""
    parser.add_argument("--params", type=Path, help=PARAMS_HELP)
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=SET_HELP,
    )


def add_pipeline_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``vitrine pipeline compile|run|submit`` to the ``vitrine`` sub-command parsers."""
    pipeline = subparsers.add_parser(
        "pipeline",
        help="the nightly workflow as a Kubeflow pipeline: compile it, run it locally, submit it",
        description="The nightly workflow as a Kubeflow Pipelines v2 pipeline: validate -> "
        "train (on a GPU node) -> evaluate -> gate -> index if promoted (else reject, with the "
        "reasons). Its components call the same step functions as the other commands. "
        "Parameters come from params.yaml (the step sections travel with the run as one JSON "
        "parameter) and its `pipeline` section: base_image, accelerator_type, "
        "accelerator_limit, cpu_request, memory_request, tolerations, node_selector, "
        "shared_volume, experiment, namespace, pipeline_root.",
    )
    actions = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")

    compile_ = actions.add_parser(
        "compile",
        help="write the pipeline package (YAML) for a KFP backend",
        description="Compile the pipeline into a package any KFP v2 backend runs (upload it in "
        "the KFP UI or with `kfp pipeline create`). The train task asks for the configured "
        "accelerator, CPU and memory, tolerations and node selector; every task runs in "
        "pipeline.base_image. The params read here become the parameters' defaults.",
    )
    compile_.add_argument(
        "--out",
        type=Path,
        default=Path("pipeline.yaml"),
        help="output file (default: pipeline.yaml)",
    )
    add_config_options(compile_)
    compile_.add_argument(
        "--no-gpu",
        action="store_true",
        help="no accelerator, toleration or node selector on the train task (a CPU cluster)",
    )
    compile_.add_argument(
        "--pipeline",
        choices=["nightly", "train-evaluate"],
        default="nightly",
        help="nightly: the whole night (default); train-evaluate: train and evaluate from a "
        "validated manifest, what `nightly.mode: kfp` submits",
    )
    compile_.set_defaults(handler=run_compile)

    run = actions.add_parser(
        "run",
        help="run the whole pipeline on this machine with kfp.local",
        description="Run the nightly pipeline with kfp.local: each task runs in a subprocess of "
        "this Python environment, in this working directory, one after another (GPU requests "
        "and placement do not apply). Writes the registry and the Milvus collection named in "
        "params.yaml like a real night, then prints each task's outcome, the gate's decision "
        "and where the outputs are.",
    )
    run.add_argument(
        "--local",
        action="store_true",
        help="run with kfp.local (required; use `submit` for a cluster)",
    )
    add_config_options(run)
    run.add_argument(
        "--catalogue",
        "--catalog",
        help="manifest to validate (default: nightly.catalogue, else the demo catalogue "
        "generated under nightly.work_dir)",
    )
    run.add_argument("--run-id", help="registry run id (default: the UTC time)")
    run.add_argument(
        "--out",
        type=Path,
        help="folder for the task outputs and exports (default: "
        "<nightly.work_dir>/kfp-local/<run id>)",
    )
    run.set_defaults(handler=run_local_pipeline)

    submit = actions.add_parser(
        "submit",
        help="submit the pipeline to a Kubeflow Pipelines cluster",
        description="Compile the nightly pipeline and start a run of it on a KFP backend, then "
        "wait for it (--no-wait returns at once). The catalogue, registry and Milvus URIs are "
        "passed as they are: they must make sense inside the pods (object-store URIs, a Milvus "
        "server, or paths on pipeline.shared_volume).",
    )
    submit.add_argument(
        "--host",
        help="KFP API endpoint, e.g. http://localhost:8080 after `kubectl port-forward -n "
        "kubeflow svc/ml-pipeline-ui 8080:80` (default: nightly.kfp_host)",
    )
    add_config_options(submit)
    submit.add_argument("--catalogue", "--catalog", help="manifest path or URI the pods can read")
    submit.add_argument("--run-id", help="registry run id (default: the UTC time)")
    submit.add_argument(
        "--export-dir",
        help="also copy each task's outputs here (a folder on pipeline.shared_volume)",
    )
    submit.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait for the run to finish and fail unless it succeeded (default: --wait)",
    )
    submit.add_argument(
        "--timeout",
        type=float,
        help="seconds to wait (default: nightly.kfp_timeout_s, 6 hours)",
    )
    submit.add_argument("--no-gpu", action="store_true", help="no accelerator on the train task")
    submit.set_defaults(handler=run_submit)
    return pipeline


# ---- configuration -----------------------------------------------------------------------


def load_configuration(args: argparse.Namespace):
    """The night's plan and the pipeline settings from ``--params`` and ``-S``."""
    from components.nightly import load_plan, params_file, parse_overrides, set_dotted
    from components.pipeline import PipelineSettings
    from model.config import load_params

    overrides = parse_overrides(args.overrides)
    params = params_file(args.params)
    plan = load_plan(params, overrides)
    raw = {"pipeline": load_params(params, "pipeline") if params else {}}
    for key, value in overrides.items():
        if key.startswith("pipeline."):
            set_dotted(raw, key, value)
    return plan, PipelineSettings.from_dict(raw["pipeline"])


def _describe_train_task(settings: Any, gpu: bool) -> str:
    parts = [f"cpu {settings.cpu_request}", f"memory {settings.memory_request}"]
    if gpu and settings.accelerator_limit > 0:
        parts.insert(0, f"{settings.accelerator_limit} x {settings.accelerator_type}")
        if settings.tolerations:
            parts.append(
                "tolerations "
                + ", ".join(
                    f"{t.get('key', '*')}:{t.get('effect', 'any')}" for t in settings.tolerations
                )
            )
        if settings.node_selector:
            parts.append(
                "node selector " + ", ".join(f"{k}={v}" for k, v in settings.node_selector.items())
            )
    else:
        parts.insert(0, "no accelerator")
    return "; ".join(parts)


# ---- handlers ----------------------------------------------------------------------------


def run_compile(args: argparse.Namespace) -> int:
    """``vitrine pipeline compile``."""
    from components.pipeline import compile_pipeline, nightly_pipeline, train_evaluate_pipeline

    plan, settings = load_configuration(args)
    build = nightly_pipeline if args.pipeline == "nightly" else train_evaluate_pipeline
    out = compile_pipeline(build(plan, settings, gpu=not args.no_gpu), args.out)
    print(f"wrote {out} ({args.pipeline} pipeline)")
    print(f"  image: {settings.base_image}")
    print(f"  train task: {_describe_train_task(settings, not args.no_gpu)}")
    if settings.shared_volume:
        volume = settings.shared_volume
        print(f"  every task mounts PVC {volume['pvc']} at {volume['mount_path']}")
    return 0


def run_local_pipeline(args: argparse.Namespace) -> int:
    """``vitrine pipeline run --local``."""
    if not args.local:
        raise ValueError(
            "vitrine pipeline run needs --local (kfp.local on this machine); for a cluster use "
            "vitrine pipeline submit --host URL"
        )
    from components.nightly import catalogue_path, new_run_id, safe_run_id
    from components.pipeline import (
        NIGHTLY_PIPELINE,
        nightly_pipeline,
        pipeline_arguments,
        run_local,
    )

    plan, settings = load_configuration(args)
    catalogue = args.catalogue or str(catalogue_path(plan, progress=True))
    run_id = args.run_id or new_run_id()
    out = args.out or plan.work_dir / "kfp-local" / safe_run_id(run_id)
    export = Path(out) / "export"
    arguments = pipeline_arguments(plan, catalogue, run_id=run_id, export_dir=export.resolve())
    print(f"running {NIGHTLY_PIPELINE} with kfp.local (run id {run_id}, catalogue {catalogue})")
    started = time.perf_counter()
    run_dir = run_local(
        nightly_pipeline(plan, settings, resources=False), arguments, Path(out) / "root"
    )
    seconds = time.perf_counter() - started
    print(f"\n{NIGHTLY_PIPELINE} finished in {seconds:.1f} s")
    for line in describe_exports(export):
        print(f"  {line}")
    print(f"task outputs: {run_dir}")
    print(f"exports:      {export}")
    return 0


def run_submit(args: argparse.Namespace) -> int:
    """``vitrine pipeline submit``."""
    from components.nightly import new_run_id
    from components.pipeline import (
        NIGHTLY_PIPELINE,
        compile_pipeline,
        nightly_pipeline,
        pipeline_arguments,
        submit_run,
    )

    plan, settings = load_configuration(args)
    host = args.host or plan.nightly.kfp_host
    if not host or host == "local":
        raise ValueError(
            "vitrine pipeline submit needs --host URL (or nightly.kfp_host): the KFP API "
            "endpoint; to run on this machine use vitrine pipeline run --local"
        )
    catalogue = args.catalogue or plan.nightly.catalogue
    if not catalogue:
        raise ValueError(
            "vitrine pipeline submit needs --catalogue (or nightly.catalogue): a manifest path "
            "or URI the pods can read"
        )
    if args.timeout is not None and args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    for name, uri in (("registry", plan.nightly.registry), ("Milvus URI", plan.index.uri)):
        if "://" not in uri and not Path(uri).is_absolute():
            print(
                f"note: the {name} {uri} is a relative path: the pods resolve it in their own "
                "working directory; use a URI or a path on the shared volume"
            )
    run_id = args.run_id or new_run_id()
    arguments = pipeline_arguments(plan, catalogue, run_id=run_id, export_dir=args.export_dir)
    with tempfile.TemporaryDirectory(prefix="vitrine-pipeline-") as folder:
        package = compile_pipeline(
            nightly_pipeline(plan, settings, gpu=not args.no_gpu), Path(folder) / "pipeline.yaml"
        )
        outcome = submit_run(
            host,
            package,
            arguments,
            settings,
            run_name=f"{NIGHTLY_PIPELINE}-{run_id}",
            wait=args.wait,
            timeout_s=args.timeout or plan.nightly.kfp_timeout_s,
        )
    print(f"run {outcome['run_id']} ({outcome['run_name']}) in experiment {outcome['experiment']}")
    print(f"  {outcome['url']}")
    if args.wait:
        print(f"  finished: {outcome['state']}")
        if args.export_dir:
            for line in describe_exports(Path(args.export_dir)):
                print(f"  {line}")
    return 0


# ---- reporting ---------------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def describe_exports(export: Path) -> list[str]:
    """One line per task from a run's exports (``export_dir``)."""
    lines = []
    validated = _read(export / "validate" / "summary.json")
    if validated:
        lines.append(
            f"validate  {validated['valid_rows']} valid rows, {validated['quarantined_rows']} "
            "quarantined"
        )
    trained = _read(export / "train.json")
    if trained:
        epochs = len(trained.get("train", {}).get("history", []))
        lines.append(
            f"train     {trained['loss']} loss, {epochs} epoch(s), {trained['minutes']:.1f} min; "
            f"package {trained['package']}"
        )
    evaluation = _read(export / "evaluation.json")
    if evaluation:
        scores = ", ".join(
            f"{name} recall@1 {block['recall@1']:.3f}"
            for name, block in evaluation.items()
            if isinstance(block, dict) and "recall@1" in block
        )
        lines.append(f"evaluate  {scores}")
    decision = _read(export / "gate.json")
    if decision:
        verdict = "promoted" if decision["promote"] else "refused"
        lines.append(
            f"gate      {verdict} {decision['candidate']}; production: "
            f"{decision['serving'] or 'none'}"
        )
        lines += [f"            - {reason}" for reason in decision["reasons"]]
    indexed = _read(export / "index.json")
    if indexed:
        lines.append(
            f"index     alias {indexed['alias']} -> {indexed['collection']} ({indexed['rows']} "
            f"rows, ANN recall@{indexed['verification']['k']} "
            f"{indexed['verification']['recall_at_k']:.3f})"
        )
    elif decision and not decision["promote"]:
        lines.append("index     skipped: the gate refused the candidate (reject ran)")
    return lines
