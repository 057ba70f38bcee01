"""Fine-tune an embedding model with a deep-metric-learning loss, on CPU or CUDA.

One function, :func:`train`, used by the CLI, DVC, Kubeflow and Airflow alike. It decodes the
training images once into memory (JPEG decoding is not repeated every epoch), samples P x K
batches, uses AdamW with linear warm-up and a cosine schedule, AMP and channels-last on CUDA,
saves a checkpoint every epoch (``resume=True`` continues from it), reports Recall@K on held-out
training classes after each epoch, and writes a model package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from model.config import TrainConfig
from model.datasets.images import ImageFileDataset, report_skipped
from model.datasets.records import ImageRecord, RetrievalDataset
from model.evaluation import retrieval_metrics
from model.head import EmbeddingModel
from model.losses import build_loss
from model.package import ModelConfig, build_model, save_package, write_json
from model.samplers import PKSampler
from model.transforms import TrainAugment, decode_for_training

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
VAL_KS = (1, 10)


@dataclass
class TrainResult:
    """Where the package went and what the run measured."""

    package_dir: Path
    metrics: dict[str, Any]


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is available")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def data_hash(records: Sequence[ImageRecord], root: Path) -> str:
    """Hash of the training set: relative paths, classes and file sizes (cheap, order-free)."""
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: str(r.path)):
        try:
            rel = record.path.relative_to(root)
        except ValueError:
            rel = record.path
        size = record.path.stat().st_size if record.path.exists() else -1
        digest.update(f"{rel}\t{record.class_key}\t{size}\n".encode())
    return digest.hexdigest()


def split_validation_classes(
    records: Sequence[ImageRecord], fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hold out a fraction of the training *classes* (disjoint, as the benchmarks are)."""
    classes = sorted({r.class_key for r in records})
    n_val = round(len(classes) * fraction) if fraction > 0 else 0
    if n_val and len(classes) - n_val < 2:
        n_val = 0
    rng = random.Random(seed)
    val_classes = set(rng.sample(classes, n_val))
    train = [r for r in records if r.class_key not in val_classes]
    val = [r for r in records if r.class_key in val_classes]
    return train, val


def decode_all(
    records: Sequence[ImageRecord],
    data: dict[str, Any],
    threads: int,
    desc: str,
    progress: bool = True,
) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """Decode every image once (in threads); returns tensors, their labels, skipped indices."""
    dataset = ImageFileDataset(records, partial(decode_for_training, data=data))
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        decoded = list(
            tqdm(
                pool.map(dataset.__getitem__, range(len(dataset))),
                total=len(dataset),
                desc=desc,
                unit="img",
                disable=not progress,
            )
        )
    images = [item[0] for item in decoded if item is not None]
    labels = [item[1] for item in decoded if item is not None]
    skipped = [index for index, item in enumerate(decoded) if item is None]
    if skipped:
        report_skipped(records, skipped, log)
    return images, labels, skipped


def _freeze(backbone: torch.nn.Module, stages: int) -> list[torch.nn.Module]:
    """Freeze the stem and the first ``stages`` stages; returns the frozen modules."""
    if stages <= 0:
        return []
    frozen: list[torch.nn.Module] = []
    for name in ("conv_stem", "bn1", "stem"):
        if hasattr(backbone, name):
            frozen.append(getattr(backbone, name))
    blocks = getattr(backbone, "blocks", None) or getattr(backbone, "stages", None)
    if blocks is None:
        raise ValueError("freeze_stages needs a backbone with .blocks or .stages (timm)")
    frozen.extend(list(blocks)[:stages])
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def freeze_batchnorm_statistics(model: torch.nn.Module) -> None:
    """Put every BatchNorm in eval mode: its running statistics stay as pretrained, while its
    affine parameters still learn. P x K batches hold few, highly correlated classes, so their
    statistics are a poor estimate of the catalogue's."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_batch(
    images: Sequence[torch.Tensor],
    labels: Sequence[int],
    indices: Sequence[int],
    augment: TrainAugment,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment the cached images at ``indices`` into a channels-last batch on ``device``."""
    batch = torch.stack([augment(images[i]) for i in indices])
    batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return batch, torch.tensor([labels[i] for i in indices], device=device)


def train_step(
    model: EmbeddingModel,
    batch: torch.Tensor,
    batch_labels: torch.Tensor,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
) -> float:
    """One optimisation step (autocast when ``amp_dtype`` is set); returns the loss value."""
    device_type = batch.device.type
    with torch.autocast(device_type=device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        embeddings = model(batch)
    loss = loss_fn(embeddings.float(), batch_labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


@torch.inference_mode()
def _validate(
    model: EmbeddingModel,
    images: list[torch.Tensor],
    labels: list[int],
    data: dict[str, Any],
    device: torch.device,
    batch_size: int,
) -> dict[str, float]:
    """Recall@K on held-out classes, SOP protocol, centre crops of the cached images."""
    model.eval()
    size = data["input_size"][-1]
    mean = torch.tensor(data["mean"]).view(3, 1, 1)
    std = torch.tensor(data["std"]).view(3, 1, 1)
    vectors = []
    for start in range(0, len(images), batch_size):
        batch = []
        for image in images[start : start + batch_size]:
            _, h, w = image.shape
            top, left = (h - size) // 2, (w - size) // 2
            crop = image[:, top : top + size, left : left + size].float() / 255.0
            batch.append((crop - mean) / std)
        batch_t = torch.stack(batch).to(device).contiguous(memory_format=torch.channels_last)
        vectors.append(model(batch_t).float().cpu().numpy())
    emb = np.concatenate(vectors)
    lab = np.asarray(labels)
    return retrieval_metrics(emb, lab, emb, lab, VAL_KS, same_set=True)


def train(
    dataset: RetrievalDataset,
    config: TrainConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fine-tune on ``dataset.train`` and write a model package to ``out_dir``.

    Args:
        dataset: a retrieval dataset; only its ``train`` split is used.
        config: hyper-parameters (see :class:`~model.config.TrainConfig`).
        out_dir: receives ``config.json``, ``model.safetensors``, ``metrics.json`` and
            ``checkpoint.pt``.
        resume: continue from ``out_dir/checkpoint.pt`` if it exists.
        progress: show progress bars.
        on_epoch_end: called with (epoch, epoch metrics) after each epoch.

    Returns:
        The package directory and the run's metrics (history per epoch, timing, throughput).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    device = resolve_device(config.device)

    model_config = ModelConfig(
        backbone=config.backbone,
        weights=config.weights,
        pooling=config.pooling,
        embed_dim=config.embed_dim,
    )
    model = build_model(model_config)
    data = dict(model_config.data)
    train_data = dict(data)
    if config.train_image_size:
        size = config.train_image_size
        train_data["input_size"] = [3, size, size]

    records = list(dataset.train)
    if config.max_train_images and len(records) > config.max_train_images:
        records = random.Random(config.seed).sample(records, config.max_train_images)
    train_records, val_records = split_validation_classes(records, config.val_fraction, config.seed)
    started = time.perf_counter()
    images, labels, skipped = decode_all(
        train_records, data, config.decode_threads, "decode train", progress
    )
    val_images, val_labels, val_skipped = (
        decode_all(val_records, data, config.decode_threads, "decode val", progress)
        if val_records
        else ([], [], [])
    )
    decode_seconds = time.perf_counter() - started

    frozen = _freeze(model.backbone, config.freeze_stages)
    # Channels-last is faster on CUDA and on oneDNN CPUs alike (about 1.8x here on 2 cores).
    model.to(device).to(memory_format=torch.channels_last)
    loss_fn = build_loss(config.loss.name, **config.loss.kwargs()).to(device)
    head_params = [p for p in model.head.parameters() if p.requires_grad]
    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": backbone_params, "lr": config.lr},
            {"params": head_params, "lr": config.lr * config.head_lr_multiplier},
        ],
        weight_decay=config.weight_decay,
    )
    sampler = PKSampler(labels, config.classes_per_batch, config.images_per_class, config.seed)
    total_steps = config.epochs * len(sampler)
    warmup_steps = max(1, round(config.warmup_epochs * len(sampler)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup_steps))
    use_amp = config.amp and device.type == "cuda"
    amp_dtype = (
        (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if use_amp else None
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    augment = TrainAugment(train_data)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    checkpoint_path = out_dir / CHECKPOINT_FILE
    if resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history = state["history"]
        start_epoch = state["epoch"] + 1
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from %s at epoch %d", checkpoint_path, start_epoch + 1)

    train_seconds = 0.0
    images_seen = 0
    for epoch in range(start_epoch, config.epochs):
        model.train()
        for module in frozen:
            module.eval()  # frozen BatchNorm keeps its ImageNet statistics
        if config.freeze_batchnorm:
            freeze_batchnorm_statistics(model)
        sampler.set_epoch(epoch)
        epoch_start = time.perf_counter()
        losses = []
        bar = tqdm(
            sampler, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", disable=not progress
        )
        for batch_indices in bar:
            batch, batch_labels = make_batch(images, labels, batch_indices, augment, device)
            loss = train_step(model, batch, batch_labels, loss_fn, optimizer, scaler, amp_dtype)
            scheduler.step()
            losses.append(loss)
            images_seen += len(batch_indices)
            bar.set_postfix(
                loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}"
            )
        seconds = time.perf_counter() - epoch_start
        train_seconds += seconds
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "seconds": seconds,
            "images_per_second": len(losses) * sampler.P * sampler.K / seconds,
        }
        if val_images:
            val = _validate(model, val_images, val_labels, data, device, config.eval_batch_size)
            record.update(
                {f"val_{k}": v for k, v in val.items() if k.startswith(("recall", "map"))}
            )
        history.append(record)
        # One line per epoch: a readable one beside the progress bars, else a JSON log record.
        log.log(logging.DEBUG if progress else logging.INFO, "epoch %s", json.dumps(record))
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}: loss {record['loss']:.4f}"
                + (
                    f", val recall@1 {record['val_recall@1']:.4f}"
                    if "val_recall@1" in record
                    else ""
                )
                + f", {record['images_per_second']:.1f} img/s"
            )
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "history": history,
                "epoch": epoch,
                "torch_rng": torch.get_rng_state(),
                "config": config.to_dict(),
            },
            checkpoint_path,
        )
        if on_epoch_end:
            on_epoch_end(epoch + 1, record)

    model_config.provenance = {
        "loss": config.loss.name,
        "train_config": config.to_dict(),
        "dataset": dataset.name,
        "training_data_hash": data_hash(records, dataset.root),
        "train_images": len(images),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    metrics = {
        "history": history,
        "train_images": len(images),
        "val_images": len(val_images),
        "skipped_images": len(skipped) + len(val_skipped),
        "decode_seconds": decode_seconds,
        "train_seconds": train_seconds,
        "train_images_per_second": images_seen / train_seconds if train_seconds else None,
        "device": str(device),
        "amp": use_amp,
    }
    model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    save_package(model, model_config, out_dir)
    write_json(out_dir / "train_metrics.json", metrics)
    return TrainResult(package_dir=out_dir, metrics=metrics)
