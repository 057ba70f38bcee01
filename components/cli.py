"""The ``vitrine`` command line: a thin edge over the step functions.

Each sub-command parses its options into typed config, calls one library function, prints a
short human summary, and writes every metric it computed as JSON when ``--json`` is given.
Library errors become a one-line ``error:`` message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DATASET_HELP = (
    "sop: Stanford Online Products (Ebay_train.txt/Ebay_test.txt in --root); "
    "inshop: DeepFashion In-Shop (list_eval_partition.txt in --root); "
    "catalog: a Vitrine catalogue manifest (--root is the manifest CSV/Parquet or its folder)"
)


def _add_dataset_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--dataset", required=required, choices=["sop", "inshop", "catalog"], help=DATASET_HELP
    )
    parser.add_argument("--root", required=required, type=Path, help="dataset folder (or manifest)")
    parser.add_argument("--json", type=Path, help="write every metric to this JSON file")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu or cuda (default: auto)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every ``vitrine`` sub-command."""
    from components.catalog.config import ImageLimits  # light: no torch, no GX
    from components.pipeline_cli import add_config_options, add_pipeline_parser  # light
    from model.config import TrainConfig  # light: dataclasses and yaml, no torch

    parser = argparse.ArgumentParser(
        prog="vitrine",
        description="Vitrine: validate a product catalogue, fine-tune an image-embedding model, "
        "gate it on Recall@K, index it in Milvus and serve visual search.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    evaluate = sub.add_parser(
        "evaluate",
        help="Recall@K and MAP@R of a model on SOP, In-Shop or a catalogue",
        description="Embed the evaluation images and report Recall@K and MAP@R under the "
        "dataset's protocol (SOP: every test image queries all others, K=1,10,100,1000; "
        "In-Shop: queries search the gallery, K=1,10,20,30,40). Without --package, scores the "
        "pretrained backbone with average pooling and no training. With --catalog instead of "
        "--dataset/--root, scores a package on every set of the `evaluate` section of --params "
        "(by default the catalogue's held-out products under both protocols), as the nightly "
        "gate does; metrics nest per set (inshop.recall@1).",
    )
    _add_dataset_options(evaluate, required=False)
    evaluate.add_argument(
        "--catalog",
        type=Path,
        help="validated manifest: evaluate --package on the configured sets (needs --package)",
    )
    evaluate.add_argument(
        "--params", type=Path, help="params.yaml whose `evaluate` section to read"
    )
    evaluate.add_argument(
        "--plots", type=Path, help="write recall_<set>.csv (k, recall) per set to this folder"
    )
    evaluate.add_argument("--package", type=Path, help="model package folder written by train")
    evaluate.add_argument(
        "--backbone",
        default=None,
        help="timm model name when no --package is given (default: tf_efficientnet_lite0)",
    )
    evaluate.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (offline package or timm hub), timm, none, or a checkpoint path",
    )
    evaluate.add_argument("--pooling", default="avg", choices=["avg", "gem"])
    evaluate.set_defaults(handler=run_evaluate)

    train = sub.add_parser(
        "train",
        help="fine-tune an embedding model with a metric-learning loss",
        description="Fine-tune a timm backbone on the dataset's training classes with P x K "
        "batches, then evaluate on its disjoint test classes. Writes a model package "
        "(model.safetensors, config.json, metrics.json) to --out. Options not given on the "
        "command line come from the `train` section of --params, then from the defaults.",
    )
    _add_dataset_options(train)
    defaults = TrainConfig()
    train.add_argument("--out", type=Path, default=Path("artifacts/model"), help="package folder")
    train.add_argument("--params", type=Path, help="params.yaml whose `train` section to read")
    train.add_argument(
        "--loss", choices=["triplet", "contrastive", "eet", "eir"], help="metric-learning loss"
    )
    train.add_argument(
        "--loss-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a loss hyper-parameter, e.g. margin=0.2 or equidistributed_weight=0.1 (repeatable)",
    )
    train.add_argument("--backbone", help="timm model name (default: tf_efficientnet_lite0)")
    train.add_argument("--weights", help="imagenet, timm, none, or a checkpoint path")
    train.add_argument("--epochs", type=int, help=f"training epochs (default: {defaults.epochs})")
    train.add_argument("--lr", type=float, help=f"backbone learning rate (default: {defaults.lr})")
    train.add_argument(
        "--embed-dim", type=int, help="projection size (default, or 0: no projection)"
    )
    train.add_argument(
        "--classes-per-batch",
        type=int,
        help=f"P in P x K sampling (default: {defaults.classes_per_batch})",
    )
    train.add_argument(
        "--images-per-class",
        type=int,
        help=f"K in P x K sampling (default: {defaults.images_per_class})",
    )
    train.add_argument(
        "--train-image-size", type=int, help="training crop size (eval keeps the model's)"
    )
    train.add_argument("--freeze-stages", type=int, help="backbone stages kept frozen")
    train.add_argument(
        "--freeze-batchnorm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep BatchNorm statistics at their pretrained values (default: on)",
    )
    train.add_argument("--max-train-images", type=int, help="cap on training images (smoke runs)")
    train.add_argument("--seed", type=int, help=f"random seed (default: {defaults.seed})")
    train.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    train.add_argument(
        "--no-evaluate", action="store_true", help="skip the test-set evaluation after training"
    )
    train.set_defaults(handler=run_train)

    demo_catalog = sub.add_parser(
        "demo-catalog",
        help="generate a seeded demo catalogue (rendered products, with a few bad rows)",
        description="Render a catalogue for trying Vitrine without one of your own: distinct "
        "products (shape, colours, pattern, printed label), several photos each (viewpoint, "
        "scale, background, lighting, occlusion), seeded; plus one bad row of each kind "
        "validation catches (corrupt, missing, tiny, duplicate, path escape, decompression "
        "bomb, wrong format, bad price, no product id). Writes --out/manifest.csv and "
        "--out/images/.",
    )
    demo_catalog.add_argument("--out", type=Path, required=True, help="catalogue folder")
    demo_catalog.add_argument("--products", type=int, default=120, help="products (default: 120)")
    demo_catalog.add_argument(
        "--photos", type=int, default=6, help="photos per product (default: 6)"
    )
    demo_catalog.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo_catalog.add_argument(
        "--image-size", type=int, default=224, help="side of each photo (default: 224)"
    )
    demo_catalog.add_argument("--no-bad-rows", action="store_true", help="only good rows")
    demo_catalog.add_argument("--quiet", action="store_true", help="no progress bar")
    demo_catalog.set_defaults(handler=run_demo_catalog)

    limits = ImageLimits()
    validate = sub.add_parser(
        "validate",
        help="check a catalogue (GX manifest suite + image checks) and quarantine bad rows",
        description="Validate a catalogue manifest and its images. The Great Expectations "
        "suite checks the manifest (required columns, non-empty ids, unique image_path, "
        "price >= 0, ...); the image checks need the files (inside the catalogue root, exists, "
        "size, decodes, format, pixel limits, duplicate content). Every input row lands in "
        "exactly one of --out/validated.csv and --out/quarantine.csv (with every reason it "
        "failed); --out/summary.json counts them, --out/data_docs/index.html shows the suite. "
        "A bad row never stops the good ones; exit status 2 only when the manifest cannot be "
        "read at all. Options not given come from the `validate` section of --params.",
    )
    validate.add_argument(
        "catalogue", type=Path, help="manifest CSV/Parquet, or a folder holding manifest.csv"
    )
    validate.add_argument("--out", type=Path, required=True, help="folder for the outputs")
    validate.add_argument(
        "--root", type=Path, help="folder image paths are relative to (default: the manifest's)"
    )
    validate.add_argument(
        "--previous",
        type=Path,
        help="an earlier run's --out folder: images whose content hash it knows are not "
        "decoded again (incremental nightly runs)",
    )
    validate.add_argument(
        "--params", type=Path, help="params.yaml whose `validate` section to read"
    )
    validate.add_argument(
        "--formats", help=f"accepted formats, comma-separated (default: {','.join(limits.formats)})"
    )
    validate.add_argument(
        "--min-side", type=int, help=f"shortest side in pixels (default: {limits.min_side})"
    )
    validate.add_argument(
        "--max-pixels",
        type=int,
        help=f"width x height limit, checked before decoding (default: {limits.max_pixels})",
    )
    validate.add_argument(
        "--max-file-bytes",
        type=int,
        help=f"larger files are refused unread (default: {limits.max_file_bytes})",
    )
    validate.add_argument("--workers", type=int, help="image threads (default: one per core)")
    validate.add_argument(
        "--no-data-docs", action="store_true", help="skip rendering the GX data docs (HTML)"
    )
    validate.add_argument("--json", type=Path, help="also write the summary to this JSON file")
    validate.add_argument("--quiet", action="store_true", help="no progress bar")
    validate.set_defaults(handler=run_validate)

    index = sub.add_parser(
        "index",
        help="embed the validated catalogue into a new Milvus collection and serve it",
        description="Embed every image of a validated catalogue with a model package, insert "
        "them into a new collection (one per model and build), index it (DiskANN on a Milvus "
        "server, the best index Milvus Lite builds otherwise), verify the ANN top-10 against "
        "exact search on >= 200 catalogue queries, and only then move the alias the service "
        "reads. A failed build is dropped and the alias left alone. Older collections beyond "
        "--keep are removed; --rollback points the alias back at the previous one, --list shows "
        "them. Options not "
        "given come from the `index` section of --params.",
    )
    index.add_argument("manifest", type=Path, nargs="?", help="validated.csv from vitrine validate")
    index.add_argument("--package", type=Path, help="model package folder (from vitrine train)")
    index.add_argument(
        "--uri", help="Milvus Lite folder or http://host:19530 (default: artifacts/milvus)"
    )
    index.add_argument("--alias", help="alias the service reads (default: vitrine_products)")
    index.add_argument("--params", type=Path, help="params.yaml whose `index` section to read")
    index.add_argument("--index-type", help="auto, DISKANN, HNSW, IVF_FLAT, ... (default: auto)")
    index.add_argument("--verify-floor", type=float, help="lowest ANN recall@10 (default: 0.95)")
    index.add_argument("--keep", type=int, help="older collections kept for rollback (default: 2)")
    index.add_argument(
        "--max-unreadable",
        type=float,
        help="largest fraction of images that may fail to read; above it the build fails "
        "before touching Milvus (default: 0.05)",
    )
    index.add_argument("--device", help="auto, cpu or cuda (default: auto)")
    index.add_argument(
        "--rollback",
        nargs="?",
        const="",
        metavar="COLLECTION",
        help="point the alias back at the collection served before the current one (again: "
        "the one before that), or at COLLECTION; running services switch with vitrine rollout",
    )
    index.add_argument(
        "--list",
        action="store_true",
        help="list the collections kept: which one is served, where --rollback goes, model "
        "version, build time, index type, rows; 'unfinished' marks a killed build's, 'unknown' "
        "one another process holds without a finished build's record (a build still running)",
    )
    index.add_argument("--json", type=Path, help="also write the summary to this JSON file")
    index.add_argument("--quiet", action="store_true", help="no progress bars")
    index.set_defaults(handler=run_index)

    serve = sub.add_parser(
        "serve",
        help="run the search service (API + merchandiser page) on the served collection",
        description=textwrap.fill(
            "Start the FastAPI search service: the page at /, the API under /v1, /healthz, "
            "/readyz, /metrics, the API docs at /docs and the OpenAPI schema at "
            "/openapi.json. It serves the collection the "
            "alias points at with the model that built it. Settings come from the VITRINE_* "
            "environment variables listed below (or a .env file); the options override them. "
            "Admin endpoints (rollout, product changes) are on only when VITRINE_ADMIN_TOKEN "
            "is set.",
            80,
        ),
        epilog=_serve_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--uri", help="Milvus Lite folder or server URI (default: artifacts/milvus)")
    serve.add_argument(
        "--threads",
        type=int,
        help="torch threads per forward pass (default: 1 on the CPU, with one forward pass per "
        "core at once)",
    )
    serve.set_defaults(handler=run_serve)

    rollout = sub.add_parser(
        "rollout",
        help="switch a running service to the collection the alias points at (and its model)",
        description="Ask a running search service to load the model that built the aliased "
        "collection (or --collection), warm it, and switch model and collection together; "
        "requests in flight finish on the old pair. Needs the admin token "
        "(VITRINE_ADMIN_TOKEN or --token).",
    )
    rollout.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="service base URL (default: http://127.0.0.1:8000)",
    )
    rollout.add_argument("--token", help="admin token (default: $VITRINE_ADMIN_TOKEN)")
    rollout.add_argument("--collection", help="serve this collection instead of the alias target")
    rollout.set_defaults(handler=run_rollout)

    nightly = sub.add_parser(
        "nightly",
        help="one night: validate -> train -> evaluate -> gate -> index -> rollout -> smoke",
        description="Run the nightly flow in this process, the same step functions the Airflow "
        "DAG runs as tasks: skip the night when neither the catalogue nor the parameters "
        "changed since the last finished night; validate the catalogue (`nightly.catalogue`; "
        "a seeded demo catalogue when null); fine-tune a candidate; score it on the "
        "`evaluate` sets; gate it against the floors and the production model (the registry's "
        "`production` pointer moves only if it passes); index the catalogue with the "
        "production model and move the alias; roll out the service at `nightly.service_url` "
        "and query it. A refused gate ends the night with the old model and collection "
        "serving. Each step writes <work_dir>/runs/<run id>/<step>.json; rerunning a run id "
        "skips finished steps.",
    )
    add_config_options(nightly)
    nightly.add_argument("--run-id", help="resume or name a night (default: the UTC time)")
    nightly.add_argument("--json", type=Path, help="write every step's result to this JSON file")
    nightly.add_argument("--quiet", action="store_true", help="no progress bars")
    nightly.set_defaults(handler=run_nightly)

    registry = sub.add_parser(
        "registry",
        help="the model registry: versions, the production pointer, its history",
        description="Show the registry's versions and which one is in production "
        "(`show`), every registration, promotion and rejection with who and why "
        "(`history`), or point production at an earlier version by hand (`promote`; then "
        "`vitrine index` and `vitrine rollout` serve it).",
    )
    registry.add_argument(
        "action", choices=["show", "history", "promote"], help="what to do (default: show)"
    )
    registry.add_argument("version", nargs="?", help="the version for promote")
    registry.add_argument(
        "--root",
        default=None,
        help="registry folder or fsspec URI (default: nightly.registry of --params)",
    )
    registry.add_argument(
        "--params", type=Path, help="parameters (default: ./params.yaml when it exists)"
    )
    registry.set_defaults(handler=run_registry)

    add_pipeline_parser(sub)

    demo = sub.add_parser(
        "demo",
        help="the main job on embedded defaults: the nightly flow, then the live search page",
        description="Start the search service on --host:--port, then run one night on "
        "embedded defaults (the same steps as `vitrine nightly` and the Airflow DAG): "
        "generate a seeded demo catalogue with a few bad rows (unless --catalog is given), "
        "validate it (bad rows go to quarantine), fine-tune the default offline backbone on "
        "half of the valid products on the CPU, score it on the other half under the In-Shop "
        "and SOP protocols, gate it, index the catalogue in Milvus Lite (--milvus-uri), roll "
        "the service onto the new model and collection and query it. Prints what each step "
        "did and how long it took, then serves the page until Ctrl-C. Parameters come from "
        "--params (if present), with the options below winning; everything is written "
        "under --out.",
    )
    demo.add_argument("--out", type=Path, default=Path("artifacts/demo"), help="output folder")
    demo.add_argument("--catalog", type=Path, help="use this manifest instead of generating one")
    demo.add_argument("--products", type=int, default=80, help="demo products to render")
    demo.add_argument("--loss", default="eir", choices=["triplet", "contrastive", "eet", "eir"])
    demo.add_argument("--epochs", type=int, default=3)
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="parameters (default: params.yaml)"
    )
    demo.add_argument(
        "--milvus-uri",
        default="artifacts/milvus",
        help="where the demo index goes (default: artifacts/milvus, what `vitrine serve` reads)",
    )
    demo.add_argument("--host", default="127.0.0.1", help="search service interface")
    demo.add_argument("--port", type=int, default=8000, help="search service port (default 8000)")
    demo.add_argument(
        "--no-serve", action="store_true", help="stop the service and exit after the night"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=run_demo)
    return parser


def _load_dataset(args: argparse.Namespace):
    from model.datasets import load_dataset

    return load_dataset(args.dataset, args.root)


def _write_json(path: Path | None, payload: dict[str, Any] | list[Any]) -> None:
    if path is not None:
        from model.package import write_json

        write_json(path, payload)
        print(f"metrics written to {path}")


def _print_metrics(title: str, metrics: dict[str, Any]) -> None:
    shown = {k: v for k, v in metrics.items() if k.startswith(("recall@", "map@"))}
    print(title)
    for key, value in shown.items():
        print(f"  {key:<12} {100 * value:6.2f}")
    print(f"  queries      {metrics['num_queries']}  (skipped images: {metrics['skipped_images']})")


def run_evaluate(args: argparse.Namespace) -> int:
    """``vitrine evaluate``."""
    if args.catalog is not None or args.dataset is None:
        return run_evaluate_sets(args)
    if args.root is None:
        raise ValueError("vitrine evaluate needs --root with --dataset")
    from model.evaluate_dataset import evaluate_model
    from model.package import ModelConfig, build_model, load_package
    from model.train import resolve_device

    device = resolve_device(args.device)
    dataset = _load_dataset(args)
    if args.package:
        model, config = load_package(args.package, device)
        source = str(args.package)
    else:
        config = ModelConfig(weights=args.weights, pooling=args.pooling, embed_dim=None)
        if args.backbone:
            config.backbone = args.backbone
        model = build_model(config).to(device).eval()
        source = f"{config.backbone} ({args.weights} weights, {args.pooling} pooling, no training)"
    started = time.perf_counter()
    metrics = evaluate_model(
        model,
        dataset,
        config.data,
        batch_size=args.batch_size,
        device=device,
        progress=not args.quiet,
    )
    metrics["seconds"] = time.perf_counter() - started
    metrics["model"] = source
    metrics["dataset"] = args.dataset
    _print_metrics(f"{args.dataset} ({metrics['protocol']} protocol), model {source}", metrics)
    _write_json(args.json, metrics)
    return 0


def run_evaluate_sets(args: argparse.Namespace) -> int:
    """``vitrine evaluate --package P --catalog VALIDATED``: every configured evaluation set."""
    from components.evaluate import EvaluationConfig, evaluate_package, write_recall_curves

    if args.package is None or args.catalog is None:
        raise ValueError("vitrine evaluate needs --dataset and --root, or --package and --catalog")
    raw = _section_with_overrides(args.params, "evaluate", {"batch_size": args.batch_size})
    config = EvaluationConfig.from_dict(raw | {"device": args.device})
    metrics = evaluate_package(args.package, args.catalog, config, progress=not args.quiet)
    print(f"evaluated in {metrics.pop('seconds'):.1f} s")  # not a metric: DVC tracks the file
    for spec in config.sets:
        block = metrics[spec.name]
        _print_metrics(f"{spec.name} ({block['protocol']} protocol), model {args.package}", block)
    if args.plots:
        for path in write_recall_curves(metrics, args.plots):
            print(f"plot data: {path}")
    _write_json(args.json, metrics)
    return 0


def _section_with_overrides(
    params: Path | None, section: str, overrides: dict[str, Any]
) -> dict[str, Any]:
    """The ``section`` of ``params.yaml`` (if given), with each option set on the command line
    (not None) winning."""
    from model.config import load_params

    raw: dict[str, Any] = load_params(params, section) if params else {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return raw


def train_config_from_args(args: argparse.Namespace):
    """Merge defaults < params.yaml `train` section < command-line options."""
    import yaml

    from model.config import TrainConfig

    overrides = {
        "backbone": args.backbone,
        "weights": args.weights,
        "epochs": args.epochs,
        "lr": args.lr,
        "classes_per_batch": args.classes_per_batch,
        "images_per_class": args.images_per_class,
        "train_image_size": args.train_image_size,
        "freeze_stages": args.freeze_stages,
        "freeze_batchnorm": args.freeze_batchnorm,
        "max_train_images": args.max_train_images,
        "seed": args.seed,
    }
    from model.config import normalise_loss

    raw = normalise_loss(_section_with_overrides(args.params, "train", overrides))
    if args.embed_dim is not None:
        raw["embed_dim"] = args.embed_dim or None
    if args.loss:
        raw["loss"]["name"] = args.loss
    for item in args.loss_param:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--loss-param needs KEY=VALUE, got {item!r}")
        raw["loss"][key.strip()] = yaml.safe_load(value)
    raw["device"] = args.device
    return TrainConfig.from_dict(raw)


def run_train(args: argparse.Namespace) -> int:
    """``vitrine train``."""
    from components.train import LOSS_CURVE, write_loss_curve
    from model.evaluate_dataset import evaluate_model
    from model.package import METRICS_FILE, load_package, write_json
    from model.train import resolve_device, train

    config = train_config_from_args(args)
    dataset = _load_dataset(args)
    print(
        f"training {config.backbone} with the {config.loss.name} loss on {args.dataset} "
        f"({len(dataset.train)} training images) for {config.epochs} epochs -> {args.out}"
    )
    started = time.perf_counter()
    result = train(dataset, config, args.out, resume=args.resume, progress=not args.quiet)
    metrics: dict[str, Any] = {"loss": config.loss.name, "train": result.metrics}
    metrics["train_minutes"] = (time.perf_counter() - started) / 60
    if not args.no_evaluate:
        device = resolve_device(args.device)
        model, model_config = load_package(result.package_dir, device)
        test = evaluate_model(
            model,
            dataset,
            model_config.data,
            batch_size=args.batch_size,
            device=device,
            progress=not args.quiet,
        )
        metrics.update(test)
        _print_metrics(f"{args.dataset} test ({test['protocol']} protocol) after training", test)
    metrics["total_minutes"] = (time.perf_counter() - started) / 60
    write_json(result.package_dir / METRICS_FILE, metrics)
    write_loss_curve(result.metrics["history"], result.package_dir / LOSS_CURVE)
    print(f"model package: {result.package_dir} ({metrics['total_minutes']:.1f} min)")
    _write_json(args.json, metrics)
    return 0


def run_demo_catalog(args: argparse.Namespace) -> int:
    """``vitrine demo-catalog``."""
    from components.catalog.demo import generate_demo_catalog

    started = time.perf_counter()
    manifest = generate_demo_catalog(
        args.out,
        products=args.products,
        photos_per_product=args.photos,
        seed=args.seed,
        image_size=args.image_size,
        progress=not args.quiet,
        bad_rows=not args.no_bad_rows,
    )
    print(f"demo catalogue: {manifest} ({time.perf_counter() - started:.1f} s)")
    print(f"next: vitrine validate {args.out} --out {args.out}-validated")
    return 0


def validation_config_from_args(args: argparse.Namespace):
    """Merge defaults < params.yaml `validate` section < command-line options."""
    from components.catalog.config import ValidationConfig

    overrides = {
        "formats": args.formats.split(",") if args.formats else None,
        "min_side": args.min_side,
        "max_pixels": args.max_pixels,
        "max_file_bytes": args.max_file_bytes,
        "workers": args.workers,
        "data_docs": False if args.no_data_docs else None,
    }
    return ValidationConfig.from_dict(_section_with_overrides(args.params, "validate", overrides))


def print_validation(summary: dict[str, Any]) -> None:
    """The validation summary for people: counts, reasons, where the files are."""
    images = summary["images"]
    print(
        f"{summary['input_rows']} rows in: {summary['valid_rows']} valid "
        f"({summary['valid_products']} products), {summary['quarantined_rows']} quarantined"
    )
    for reason, count in summary["quarantined_by_reason"].items():
        print(f"  {reason:<22} {count}")
    reused = ""
    if images["previous"]:
        reused = f", {images['reused_from_previous']} known from --previous"
    print(f"images: {images['checked']} checked, {images['decoded']} decoded{reused}")
    outputs = summary["outputs"]
    print(f"validated manifest: {outputs['validated']}")
    print(f"quarantine:         {outputs['quarantine']}")
    if outputs["data_docs"]:
        print(f"data docs:          {outputs['data_docs']}")


def run_validate(args: argparse.Namespace) -> int:
    """``vitrine validate``."""
    from components.validate import validate_catalog

    summary = validate_catalog(
        args.catalogue,
        args.out,
        validation_config_from_args(args),
        root=args.root,
        previous=args.previous,
        progress=not args.quiet,
    )
    print_validation(summary)
    print(f"summary: {args.out / 'summary.json'} ({summary['seconds']['total']:.1f} s)")
    _write_json(args.json, summary)
    return 0


def index_config_from_args(args: argparse.Namespace):
    """Merge defaults < params.yaml `index` section < command-line options."""
    from components.index import IndexBuildConfig

    overrides = {
        "uri": args.uri,
        "alias": args.alias,
        "index_type": args.index_type,
        "verify_floor": args.verify_floor,
        "keep_collections": args.keep,
        "max_unreadable": args.max_unreadable,
        "device": args.device,
    }
    return IndexBuildConfig.from_dict(_section_with_overrides(args.params, "index", overrides))


def run_index(args: argparse.Namespace) -> int:
    """``vitrine index``."""
    from components.index import build_index, list_collections, rollback_index

    config = index_config_from_args(args)
    if args.list:
        listed = list_collections(config)
        print_collections(listed, config)
        _write_json(args.json, listed)
        return 0
    if args.rollback is not None:
        summary = rollback_index(config, to=args.rollback or None)
        print(f"alias {summary['alias']} -> {summary['collection']} (was {summary['previous']})")
        print("running services switch with: vitrine rollout")
    else:
        if args.manifest is None or args.package is None:
            raise ValueError("vitrine index needs MANIFEST and --package (or --rollback)")
        summary = build_index(args.manifest, args.package, config, progress=not args.quiet)
        check = summary["verification"]
        print(
            f"collection {summary['collection']}: {summary['rows']} images, "
            f"{summary['index']['index_type']} ({summary['index']['reason']})"
        )
        print(
            f"verified: ANN recall@{check['k']} {check['recall_at_k']:.3f} against exact search "
            f"on {check['queries']} queries (floor {check['floor']})"
        )
        was = summary["previous"] or "nothing: the first build"
        print(f"alias {summary['alias']} -> {summary['collection']} (was {was})")
        if summary["removed"]:
            print(f"removed old collections: {', '.join(summary['removed'])}")
    _write_json(args.json, summary)
    return 0


def print_collections(listed: list[dict], config) -> None:
    """``vitrine index --list``: one line per collection, oldest first."""
    if not listed:
        print(f"no collections in {config.uri}")
        return
    print(f"collections in {config.uri} (alias {config.alias}), oldest first:")
    for entry in listed:
        if entry["served"]:
            mark = "served"
        elif entry["rollback"]:
            mark = f"rollback {entry['rollback']}"
        elif entry["finished"] is None:  # open in another process without a card
            mark = "unknown"
        elif not entry["finished"]:
            mark = "unfinished"
        else:
            mark = ""
        facts = [
            f"model {entry['model_version']}" if entry["model_version"] else "",
            f"built {entry['built_at']}" if entry["built_at"] else "",
            entry["index_type"] or "",
            f"{entry['rows']} rows" if entry["rows"] is not None else "",
        ]
        print(f"  {mark:<11} {entry['collection']}  {'  '.join(f for f in facts if f)}")
    print(
        f"served: where alias {config.alias} points, what services load (a running service "
        "moves to it with `vitrine rollout`); rows: as built (admin changes since are not "
        "counted)"
    )


def _serve_settings_help() -> str:
    """``vitrine serve --help``'s list of settings, wrapped to the terminal."""
    from serving.settings import settings_help

    first, *rest = settings_help().splitlines()
    wrapped = [textwrap.fill(line, 88, subsequent_indent="      ") for line in rest]
    return "\n".join([first, *wrapped])


def run_serve(args: argparse.Namespace) -> int:
    """``vitrine serve``."""
    import uvicorn

    from serving.app import create_app
    from serving.settings import Settings
    from serving.store import check_uri

    overrides = {"milvus_uri": args.uri, "threads": args.threads}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    check_uri(settings.milvus_uri)  # here, not as a traceback from the service's start-up
    print(f"search page: http://{args.host}:{args.port}/  (API docs at /docs)")
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


def run_rollout(args: argparse.Namespace) -> int:
    """``vitrine rollout``: POST /v1/admin/rollout on a running service."""
    from components.rollout import rollout_service

    answer = rollout_service(args.url, token=args.token or None, collection=args.collection)
    serving = answer["serving"]
    print(f"serving model {serving['model_version']} on {serving['collection']}")
    return 0


def print_step(step: str, result: dict[str, Any]) -> None:
    """One line per nightly step, for people."""
    seconds = result.get("seconds", 0.0)
    if result.get("skipped"):
        what = f"skipped: {result['reason']}"
    elif step == "changed":
        what = result["reason"]
    elif step == "validate":
        what = (
            f"{result['input_rows']} rows: {result['valid_rows']} valid, "
            f"{result['quarantined_rows']} quarantined -> {result['validated']}"
        )
    elif step == "train":
        what = f"{result['loss']} loss -> {result['package']}"
    elif step == "evaluate":
        what = ", ".join(
            f"{name} recall@1 {block['recall@1']:.3f}"
            for name, block in result.items()
            if isinstance(block, dict) and "recall@1" in block
        )
    elif step == "gate":
        verdict = "promoted" if result["promote"] else "rejected"
        what = f"{verdict} {result['candidate']}: {'; '.join(result['reasons'])}"
    elif step == "index":
        what = (
            f"{result['rows']} images -> {result['collection']} ({result['index']['index_type']}"
            f", recall@10 vs exact {result['verification']['recall_at_k']:.3f})"
        )
    elif step == "rollout":
        what = f"serving {result['serving']['model_version']} on {result['serving']['collection']}"
    elif step == "smoke":
        what = f"product {result['product_id']} at rank {result['rank']} ({result['took_ms']} ms)"
    else:
        what = f"night {result.get('outcome', '?')}"
    print(f"[{step:>8}] {what} ({seconds:.1f} s)", flush=True)


def run_nightly(args: argparse.Namespace) -> int:
    """``vitrine nightly``."""
    from components.nightly import load_plan, params_file, parse_overrides, run_night

    plan = load_plan(params_file(args.params), parse_overrides(args.overrides))
    results = run_night(plan, args.run_id, progress=not args.quiet, on_step=print_step)
    print(f"run folder: {results['run_dir']}")
    _write_json(args.json, results)
    return 0 if results["finish"]["outcome"] != "rejected" else 1


def run_registry(args: argparse.Namespace) -> int:
    """``vitrine registry``."""
    from components.nightly import load_plan, params_file
    from components.registry import ModelRegistry

    root = args.root or load_plan(params_file(args.params)).nightly.registry
    registry = ModelRegistry(root)
    if args.action == "promote":
        if not args.version:
            raise ValueError("registry promote needs a VERSION (see `vitrine registry show`)")
        registry.promote(args.version, decision={"reasons": ["promoted by hand"]})
        print(f"production -> {args.version}; serve it with `vitrine index` then `vitrine rollout`")
        return 0
    if args.action == "history":
        for event in registry.history():
            extra = "; ".join(event.get("reasons", []))
            print(f"{event['at']}  {event['event']:<10} {event['version']}  {extra}".rstrip())
        return 0
    production = registry.production_version()
    print(f"registry {registry.uri}")
    for version in registry.versions():
        print(f"{'*' if version == production else ' '} {version}")
    if production is None:
        print("no production model yet")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``vitrine demo``: the nightly flow on embedded defaults, then the live search page."""
    from components.demo import run_demo as demo

    results = demo(args, print_step)
    return 0 if results["finish"]["outcome"] == "promoted" else 1


# Library errors that mean "bad input or setup", by the module that defines them.
_LIBRARY_ERRORS = {
    "model.datasets.records": "DatasetFormatError",
    "model.backbone": "BackboneError",
    "model.offline_weights": "OfflineWeightsError",
    "model.package": "ModelPackageError",
}


def _known_errors() -> tuple[type[BaseException], ...]:
    """The errors reported as one ``error:`` line. Only modules already imported are looked
    at (an error cannot come from a module that was never loaded), so a failing command does
    not pay for importing torch and timm just to name its error."""
    library = tuple(
        getattr(sys.modules[module], name)
        for module, name in _LIBRARY_ERRORS.items()
        if module in sys.modules
    )
    return (*library, FileNotFoundError, ValueError, RuntimeError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vitrine`` console script."""
    if argv is None:  # run as a script, not called from Python: tune the allocator first
        from components.runtime import reexec_with_tuned_allocator

        reexec_with_tuned_allocator()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # libraries that narrate their internals at INFO
        for noisy in ("great_expectations", "faiss", "milvus_lite", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose or not isinstance(exc, _known_errors()):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
