"""The allocators `vitrine` can run with, on CPU training steps and on a service's lone forward.

Three contenders, each in its own child process (an allocator is chosen at start-up): glibc's
malloc with its defaults, glibc's malloc with the settings `vitrine` sets
(components/runtime.py), and jemalloc preloaded (what `vitrine` runs with where it is
installed). They alternate, round after round, on two workloads:

- training: steps of Lite0 at batch 32, 192 px (images/s, and the kernel's share of the CPU:
  page faults and zeroing when large buffers go back to the system after each step);
- serving: the service's frozen TorchScript model at one torch thread on two model threads, as
  `vitrine serve` runs it on two cores: one photo's forward (median ms) when the process is
  fresh, then after a burst of forwards of random batch sizes (1-16) on both threads at once,
  which is what a service sees after a busy minute.

Prints each contender's figures and the ratios against glibc's defaults and tuned glibc.

    python bench/bench_allocator.py [--rounds 2] [--steps 6] [--burst-s 6]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.runtime import (
    ALLOCATOR_CHOICE,
    ALLOCATOR_ENV,
    find_jemalloc,
    tuned_environment,
)


def training(steps: int, batch: int, size: int) -> dict[str, float]:
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
    return {"rate": steps * batch / seconds, "kernel_share": system / (system + user)}


def serving(burst_s: float, lone: int = 40) -> dict[str, float]:
    import concurrent.futures

    import torch

    from model.package import ModelConfig, build_model, save_package
    from serving.embedder import Embedder

    torch.manual_seed(0)
    threads = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="embed")
    with tempfile.TemporaryDirectory() as folder:
        config = ModelConfig(embed_dim=None)
        package = save_package(build_model(config), config, Path(folder) / "package")
        embedder = threads.submit(Embedder, package, "cpu", 1, True).result()
    threads.submit(embedder.warm_up, (1, 4, 16)).result()
    channels, height, width = embedder.data_config["input_size"]
    one = torch.rand(1, channels, height, width)

    def forward(batch: torch.Tensor) -> float:
        tick = time.perf_counter()
        embedder.embed_prepared([batch[0]] if len(batch) == 1 else list(batch))
        return time.perf_counter() - tick

    def lone_ms() -> float:
        return 1000 * statistics.median(threads.submit(forward, one).result() for _ in range(lone))

    fresh = lone_ms()
    rng = random.Random(0)
    end = time.perf_counter() + burst_s
    while time.perf_counter() < end:
        sizes = [rng.randint(1, 16) for _ in range(2)]
        jobs = [threads.submit(forward, torch.rand(n, channels, height, width)) for n in sizes]
        for job in jobs:
            job.result()
    after = lone_ms()
    threads.shutdown()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"fresh_ms": fresh, "after_burst_ms": after, "max_rss_mb": rss}


def contenders() -> dict[str, dict[str, str]]:
    """Each contender's environment (jemalloc only where it is installed)."""
    base = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    base.pop("LD_PRELOAD", None)
    base.pop("VITRINE_ALLOCATOR_TUNED", None)
    base.pop(ALLOCATOR_CHOICE, None)
    sides = {
        "glibc defaults": {**base, "VITRINE_ALLOCATOR_TUNED": "0"},
        "glibc tuned": tuned_environment({**base, ALLOCATOR_CHOICE: "glibc"}, None)[0],
    }
    jemalloc = find_jemalloc()
    if jemalloc is not None:
        sides["jemalloc"] = tuned_environment(base, jemalloc)[0]
    return sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="training steps per run")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--burst-s", type=float, default=6.0, help="seconds of mixed batches")
    parser.add_argument("--child", choices=("training", "serving"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "training":
        print(json.dumps(training(args.steps, args.batch, args.image_size)))
        return
    if args.child == "serving":
        print(json.dumps(serving(args.burst_s)))
        return
    sides = contenders()
    if "jemalloc" not in sides:
        print("jemalloc is not installed (Debian: libjemalloc2): it is left out")
    common = ["--steps", str(args.steps), "--batch", str(args.batch)]
    common += ["--image-size", str(args.image_size), "--burst-s", str(args.burst_s)]
    workloads = ("training", "serving")
    results: dict[str, dict[str, list[dict]]] = {w: {n: [] for n in sides} for w in workloads}
    for round_ in range(args.rounds):
        for workload in results:
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for name in order:
                command = [sys.executable, __file__, "--child", workload, *common]
                out = subprocess.run(
                    command, env=sides[name], capture_output=True, text=True, check=True
                )
                results[workload][name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  round {round_ + 1}/{args.rounds} done", flush=True)

    def mean(runs: list[dict], key: str) -> float:
        return statistics.fmean(r[key] for r in runs)

    print(f"training: Lite0, batch {args.batch} at {args.image_size} px, {args.steps} steps, CPU")
    rates = {}
    for name, runs in results["training"].items():
        rates[name] = mean(runs, "rate")
        share = 100 * mean(runs, "kernel_share")
        print(f"  {name:<15} {rates[name]:6.1f} images/s, kernel time {share:4.1f}% of CPU")
    print(
        "serving: one photo's forward (median ms) on one of two model threads at one torch "
        f"thread, fresh and after {args.burst_s:.0f} s of mixed batches (1-16) on both"
    )
    after = {}
    for name, runs in results["serving"].items():
        after[name] = mean(runs, "after_burst_ms")
        fresh = [round(r["fresh_ms"], 2) for r in runs]
        burst = [round(r["after_burst_ms"], 2) for r in runs]
        rss = mean(runs, "max_rss_mb")
        print(f"  {name:<15} fresh {fresh} ms, after the burst {burst} ms, peak RSS {rss:.0f} MB")
    for name in sides:
        if name == "glibc defaults":
            continue
        for base in ("glibc defaults", "glibc tuned"):
            if base == name:
                continue
            print(
                f"ratio {name} / {base}: training {rates[name] / rates[base]:.2f}x images/s; "
                f"lone forward after the burst {after[base] / after[name]:.2f}x as fast"
            )


if __name__ == "__main__":
    main()
