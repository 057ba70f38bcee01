"""Recall@K (SOP protocol, K = 1, 10, 100, 1000) over random embeddings: seconds and peak memory.

Baseline: the naive full-matrix evaluation (all similarities at once, then top-K per row),
run at a size where that matrix still fits, beside `model.evaluation.retrieval_metrics` on the
same data; both must give the same numbers. Then `retrieval_metrics` alone at 100K x 100K, where
the full matrix would need 40 GB. Each measurement runs in a fresh child process so its peak
resident memory is its own.

    python bench/bench_recall.py [--small 20000] [--large 100000] [--dim 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KS = (1, 10, 100, 1000)


def embeddings(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """SOP-like data: classes of about 5 images, points scattered around class centres."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) // 5
    centres = rng.normal(size=(labels.max() + 1, dim)).astype(np.float32)
    x = centres[labels] + 1.5 * rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def naive_full_matrix(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The straightforward version: one [N, N] similarity matrix, top-K by argpartition."""
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    depth = max(KS)
    top = np.argpartition(-sims, depth, axis=1)[:, :depth]
    order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
    top = np.take_along_axis(top, order, axis=1)
    hits = labels[top] == labels[:, None]
    return {f"recall@{k}": float(hits[:, :k].any(axis=1).mean()) for k in KS}


def child(mode: str, n: int, dim: int) -> None:
    from model.evaluation import retrieval_metrics

    x, labels = embeddings(n, dim)
    started = time.perf_counter()
    if mode == "naive":
        metrics = naive_full_matrix(x, labels)
    else:
        metrics = retrieval_metrics(x, labels, x, labels, KS, same_set=True)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    recalls = {k: v for k, v in metrics.items() if k.startswith("recall@")}
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb, "metrics": recalls}))


def measure(mode: str, n: int, dim: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--n", str(n), "--dim", str(dim)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=20_000, help="size for the side-by-side")
    parser.add_argument("--large", type=int, default=100_000, help="size for chunked alone")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.n, args.dim)
        return

    naive = measure("naive", args.small, args.dim)
    chunked = measure("chunked", args.small, args.dim)
    same = all(abs(naive["metrics"][k] - chunked["metrics"][k]) < 1e-9 for k in naive["metrics"])
    print(f"{args.small} x {args.small}, dim {args.dim}, SOP protocol, K = {KS}")
    print(f"  naive full matrix   {naive['seconds']:7.1f} s  peak {naive['peak_mb']:8.0f} MB")
    print(f"  chunked (vitrine)   {chunked['seconds']:7.1f} s  peak {chunked['peak_mb']:8.0f} MB")
    print(
        f"  ratio time chunked/naive = {chunked['seconds'] / naive['seconds']:.2f}, "
        f"peak memory chunked/naive = {chunked['peak_mb'] / naive['peak_mb']:.2f}, "
        f"identical recall: {same}"
    )
    large = measure("chunked", args.large, args.dim)
    full_gb = args.large**2 * 4 / 1e9
    print(
        f"{args.large} x {args.large}: chunked {large['seconds']:.1f} s, peak "
        f"{large['peak_mb']:.0f} MB (a full similarity matrix alone would be {full_gb:.1f} GB); "
        + ", ".join(f"{k} {v:.4f}" for k, v in large["metrics"].items())
    )


if __name__ == "__main__":
    main()
