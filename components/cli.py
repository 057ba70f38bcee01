"""The ``vitrine`` command line: a thin edge over the step functions.

Each sub-command parses its options into typed config, calls one library function, prints a
short human summary, and writes every metric it computed as JSON when ``--json`` is given.
Library errors become a one-line ``error:`` message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DATASET_HELP = (
    "sop: Stanford Online Products (Ebay_train.txt/Ebay_test.txt in --root); "
    "inshop: DeepFashion In-Shop (list_eval_partition.txt in --root); "
    "catalog: a Vitrine catalogue manifest (--root is the manifest CSV/Parquet or its folder)"
)


def _add_dataset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", required=True, choices=["sop", "inshop", "catalog"], help=DATASET_HELP
    )
    parser.add_argument("--root", required=True, type=Path, help="dataset folder (or manifest)")
    parser.add_argument("--json", type=Path, help="write every metric to this JSON file")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu or cuda (default: auto)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every ``vitrine`` sub-command."""
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
        "pretrained backbone with average pooling and no training.",
    )
    _add_dataset_options(evaluate)
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

    demo = sub.add_parser(
        "demo",
        help="the main job on embedded defaults: demo catalogue -> fine-tune -> evaluate",
        description="Generate a seeded demo catalogue of rendered products (unless --catalog "
        "is given), fine-tune the default offline backbone on half of its products on the CPU, "
        "and report Recall@K on the other half before and after training. Prints what each "
        "step did and how long it took; writes everything under --out.",
    )
    demo.add_argument("--out", type=Path, default=Path("artifacts/demo"), help="output folder")
    demo.add_argument("--catalog", type=Path, help="use this manifest instead of generating one")
    demo.add_argument("--products", type=int, default=80, help="demo products to render")
    demo.add_argument("--photos", type=int, default=6, help="photos per demo product")
    demo.add_argument("--loss", default="eir", choices=["triplet", "contrastive", "eet", "eir"])
    demo.add_argument("--epochs", type=int, default=3)
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=run_demo)
    return parser


def _load_dataset(args: argparse.Namespace):
    from model.datasets import load_dataset

    return load_dataset(args.dataset, args.root)


def _write_json(path: Path | None, payload: dict[str, Any]) -> None:
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


def train_config_from_args(args: argparse.Namespace):
    """Merge defaults < params.yaml `train` section < command-line options."""
    import yaml

    from model.config import TrainConfig, load_params

    raw: dict[str, Any] = load_params(args.params, "train") if args.params else {}
    loss = raw.get("loss", {})
    raw["loss"] = {"name": loss} if isinstance(loss, str) else dict(loss)
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
    raw.update({k: v for k, v in overrides.items() if v is not None})
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
    print(f"model package: {result.package_dir} ({metrics['total_minutes']:.1f} min)")
    _write_json(args.json, metrics)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``vitrine demo``: every step on embedded defaults, timed."""
    from components.catalog.demo import generate_demo_catalog
    from model.config import LossConfig, TrainConfig
    from model.datasets import load_dataset
    from model.evaluate_dataset import evaluate_model
    from model.package import ModelConfig, build_model, load_package, write_json
    from model.train import resolve_device, train

    device = resolve_device(args.device)
    progress = not args.quiet
    timings: dict[str, float] = {}

    def step(name: str, started: float, what: str) -> None:
        timings[name] = time.perf_counter() - started
        print(f"[{name:>8}] {what} ({timings[name]:.1f} s)")

    started = time.perf_counter()
    manifest = args.catalog or generate_demo_catalog(
        args.out / "catalog", args.products, args.photos, progress=progress
    )
    dataset = load_dataset("catalog", manifest)
    step(
        "catalog",
        started,
        f"{manifest}: {len(dataset.train)} training images, "
        f"{len(dataset.query)} evaluation images of other products",
    )

    started = time.perf_counter()
    base_config = ModelConfig(embed_dim=None)
    base = evaluate_model(
        build_model(base_config), dataset, base_config.data, device=device, progress=progress
    )
    step("baseline", started, f"pretrained backbone, no training: recall@1 {base['recall@1']:.3f}")

    started = time.perf_counter()
    config = TrainConfig(
        loss=LossConfig(name=args.loss),
        epochs=args.epochs,
        train_image_size=160,
        classes_per_batch=8,
        images_per_class=4,
        device=str(device),
    )
    result = train(dataset, config, args.out / "model", progress=progress)
    step("train", started, f"{args.loss} loss, {args.epochs} epochs -> {result.package_dir}")

    started = time.perf_counter()
    model, model_config = load_package(result.package_dir, device)
    tuned = evaluate_model(model, dataset, model_config.data, device=device, progress=progress)
    step(
        "evaluate",
        started,
        f"fine-tuned: recall@1 {tuned['recall@1']:.3f} (baseline {base['recall@1']:.3f})",
    )
    summary = {"baseline": base, "fine_tuned": tuned, "seconds": timings}
    write_json(args.out / "metrics.json", summary)
    print(f"metrics written to {args.out / 'metrics.json'}")
    return 0


def _known_errors() -> tuple[type[BaseException], ...]:
    from model.backbone import BackboneError
    from model.datasets.records import DatasetFormatError
    from model.offline_weights import OfflineWeightsError
    from model.package import ModelPackageError

    return (
        DatasetFormatError,
        BackboneError,
        OfflineWeightsError,
        ModelPackageError,
        FileNotFoundError,
        ValueError,
        RuntimeError,
    )


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
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _known_errors() as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
