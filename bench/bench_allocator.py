"""CPU training steps with glibc's default allocator settings against the ones `vitrine` sets.

Each side runs in its own child process (glibc reads the settings at start-up), alternating
A, B, A, B; the same model, batch and steps. Prints images/s, the share of CPU time spent in
the kernel, and the ratio tuned / default.

    python bench/bench_allocator.py [--steps 6] [--rounds 2] [--batch 32] [--image-size 192]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.runtime import ALLOCATOR_ENV


def child(steps: int, batch: int, size: int) -> None:
    import torch

    from model.package import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=512)).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(x).sum().backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    system = after.ru_stime - before.ru_stime
    user = after.ru_utime - before.ru_utime
    print(json.dumps({"rate": steps * batch / seconds, "kernel_share": system / (system + user)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.steps, args.batch, args.image_size)
        return
    base_env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    sides = {"glibc defaults": base_env, "vitrine allocator": {**base_env, **ALLOCATOR_ENV}}
    results: dict[str, list[dict]] = {name: [] for name in sides}
    command = [
        sys.executable,
        __file__,
        "--child",
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--image-size",
        str(args.image_size),
    ]
    for _ in range(args.rounds):
        for name, env in sides.items():
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"lite0 training steps, batch {args.batch} at {args.image_size} px, CPU")
    rates = {}
    for name, runs in results.items():
        rates[name] = sum(r["rate"] for r in runs) / len(runs)
        share = sum(r["kernel_share"] for r in runs) / len(runs)
        print(f"  {name:<18} {rates[name]:6.1f} images/s, kernel time {100 * share:4.1f}% of CPU")
    ratio = rates["vitrine allocator"] / rates["glibc defaults"]
    print(f"ratio vitrine / glibc defaults = {ratio:.2f}")


if __name__ == "__main__":
    main()
