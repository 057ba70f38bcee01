"""Training images/s of the real training path against a bare forward+backward.

Both sides use the same backbone, head, batch size, image size, optimizer and memory format.
The bare side trains on one pre-made tensor (no data work at all); the real side draws P x K
batches from the decoded-image cache, augments them, and computes the metric loss, exactly as
`model.train.train` does (it calls the same `make_batch` and `train_step`). The ratio says how
much the data path and the loss cost: the goal is >= 0.85. Like the `vitrine` script, it runs
with the tuned allocator settings (components/runtime.py).

    python bench/bench_train_throughput.py [--steps 4] [--rounds 3] [--image-size 192]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import interleaved, training_records
from components.runtime import reexec_with_tuned_allocator
from model.config import TrainConfig
from model.losses import build_loss
from model.package import ModelConfig, build_model
from model.samplers import PKSampler
from model.train import decode_all, freeze_batchnorm_statistics, make_batch, train_step
from model.transforms import TrainAugment


def main() -> None:
    reexec_with_tuned_allocator()  # measure what `vitrine train` runs with
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps per block")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--loss", default="eir")
    args = parser.parse_args()

    config = TrainConfig()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_config = ModelConfig(embed_dim=config.embed_dim)
    model = build_model(model_config).to(device).to(memory_format=torch.channels_last).train()
    if config.freeze_batchnorm:
        freeze_batchnorm_statistics(model)  # as train() does with the default config
    data = dict(model_config.data)
    train_data = dict(data, input_size=[3, args.image_size, args.image_size])
    source, records = training_records(640)
    images, labels, _ = decode_all(records, data, threads=2, desc="decode", progress=False)
    sampler = PKSampler(labels, config.classes_per_batch, config.images_per_class, seed=0)
    batch_size = sampler.P * sampler.K
    augment = TrainAugment(train_data)
    loss_fn = build_loss(args.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    amp = torch.bfloat16 if device.type == "cuda" else None
    batches = iter(())

    def next_indices() -> list[int]:
        nonlocal batches
        for indices in batches:
            return indices
        batches = iter(sampler)
        return next(batches)

    bare_images = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device)
    bare_images = bare_images.contiguous(memory_format=torch.channels_last)

    def bare() -> int:
        for _ in range(args.steps):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = model(bare_images)
            out.float().sum().backward()
            optimizer.step()
        return args.steps * batch_size

    def real() -> int:
        for _ in range(args.steps):
            batch, batch_labels = make_batch(images, labels, next_indices(), augment, device)
            train_step(model, batch, batch_labels, loss_fn, optimizer, scaler, amp)
        return args.steps * batch_size

    bare(), real()  # warm-up: allocator, oneDNN kernels
    rates = interleaved({"bare forward+backward": bare, "training path": real}, args.rounds)
    print(
        f"backbone {model_config.backbone}, batch {batch_size} at {args.image_size} px, "
        f"{args.loss} loss, {device}, {torch.get_num_threads()} threads, images: {source}"
    )
    for name, rate in rates.items():
        print(f"  {name:<22} {rate:7.1f} images/s")
    ratio = rates["training path"] / rates["bare forward+backward"]
    print(f"ratio training path / bare = {ratio:.3f}  (goal >= 0.85)")


if __name__ == "__main__":
    main()
