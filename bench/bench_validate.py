"""Catalogue validation over the real Grocery photos against a bare Pillow decode loop.

The bare side opens and decodes every photo (`Image.open` + `load`), once on one thread and
once on as many threads as validation uses. The validation side is the whole
`validate_catalog` step (GX manifest suite, data docs, image checks, outputs) with the default
config, and `check_images` alone. Validation also reads and hashes (SHA-256) every file. The
contenders alternate in one process, after a warm-up that imports Great Expectations (a one-off
per process, reported apart) and reads every file once (so all of them run on a warm page
cache). Goal: validation <= 1.5x the bare decode. Then the incremental case: 5% of the photos
re-encoded, validated with `previous=` an earlier run's output against validating from scratch.

    python bench/bench_validate.py [--rounds 3] [--changed 0.05] [--json PATH]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import GROCERY_ROOT, interleaved
from components.catalog.config import ValidationConfig
from components.catalog.image_checks import check_images
from components.validate import validate_catalog

GOAL = 1.5


def grocery_paths(root: Path) -> list[tuple[str, str, str]]:
    """(class_id, super_class_id, path) for every photo listed in Ebay_train/test.txt."""
    rows = []
    for name in ("Ebay_train.txt", "Ebay_test.txt"):
        for line in (root / name).read_text().splitlines()[1:]:
            if line.strip():
                _, class_id, super_class_id, path = line.split()
                rows.append((class_id, super_class_id, path))
    return rows


def write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A catalogue manifest of these rows (one product per Grocery class)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["product_id", "image_path", "category", "title", "price"])
        for class_id, super_class_id, image in rows:
            writer.writerow([class_id, image, super_class_id, f"product {class_id}", "1.00"])
    return path


def link_tree(source: Path, target: Path, paths: list[str]) -> str:
    """Mirror `paths` under `target` as hard links (no space); copies if links are refused."""
    how = "hard links"
    for rel in paths:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source / rel, target / rel)
        except OSError:
            if how == "hard links":
                print(f"warning: cannot hard-link into {target}; copying the photos instead")
            how = "copies"
            shutil.copyfile(source / rel, target / rel)
    return how


def reencode(path: Path) -> None:
    """Replace the file by a re-encoded JPEG; a new inode, so a hard-linked original is kept."""
    fresh = path.with_name(path.name + ".new")
    with Image.open(path) as image:
        image.convert("RGB").save(fresh, "JPEG", quality=83)
    os.replace(fresh, path)


def timed(blocks: dict[str, Callable[[], int]], rounds: int, n: int) -> dict[str, dict]:
    """`interleaved` rates, with the mean seconds of one pass, printed as table rows."""
    table = {
        name: {"images_per_s": r, "seconds": n / r}
        for name, r in interleaved(blocks, rounds).items()
    }
    for name, row in table.items():
        print(f"  {name:<26} {row['images_per_s']:8.0f} images/s  {row['seconds']:6.2f} s")
    return table


def steady(manifest: Path, images: list[str], rounds: int, threads: int) -> dict[str, Any]:
    """Bare decode (1 and `threads` threads), validate_catalog and check_images, alternating."""
    paths = [GROCERY_ROOT / image for image in images]
    limits, summaries = ValidationConfig().images, []

    def decode(path: Path) -> None:
        with Image.open(path) as image:
            image.load()

    def bare_serial() -> int:
        for path in paths:
            decode(path)
        return len(paths)

    def bare_threads() -> int:
        with ThreadPoolExecutor(threads) as pool:
            return len(list(pool.map(decode, paths)))

    def validate() -> int:
        out = manifest.parent / "out"
        summaries.append(validate_catalog(manifest, out, root=GROCERY_ROOT, progress=False))
        return len(paths)

    def checks() -> int:
        return len(check_images(images, GROCERY_ROOT, limits, progress=False))

    bare_n = f"bare decode, {threads} threads"
    blocks = {"bare decode, 1 thread": bare_serial, bare_n: bare_threads}
    table = timed(
        blocks | {"validate_catalog": validate, "check_images alone": checks}, rounds, len(paths)
    )
    split = {k: sum(s["seconds"][k] for s in summaries) / rounds for k in summaries[0]["seconds"]}
    print("  validate_catalog split: " + ", ".join(f"{k} {v:.2f} s" for k, v in split.items()))
    seconds = {name: row["seconds"] for name, row in table.items()}
    speedup = seconds["bare decode, 1 thread"] / seconds[bare_n]
    print(
        f"  valid rows {summaries[-1]['valid_rows']} of {len(paths)}; bare decode on {threads} "
        f"threads runs at {speedup:.2f}x its 1-thread rate on this machine"
    )
    return {
        "table": table,
        "validate_split_seconds": split,
        "valid_rows": summaries[-1]["valid_rows"],
        "ratio_over_bare_1_thread": seconds["validate_catalog"] / seconds["bare decode, 1 thread"],
        "ratio_over_bare_threads": seconds["validate_catalog"] / seconds[bare_n],
    }


def incremental(manifest: Path, images: list[str], rounds: int, fraction: float) -> dict[str, Any]:
    """Re-encode `fraction` of the photos; validate with `previous=` against from scratch."""
    tmp, runs = manifest.parent, {}
    root = tmp / "root"
    how = link_tree(GROCERY_ROOT, root, images)
    first = validate_catalog(manifest, tmp / "night1", root=root, progress=False)
    changed = random.Random(0).sample(images, round(fraction * len(images)))
    for image in changed:
        reencode(root / image)

    def night2(name: str, previous: Path | None) -> int:
        out = tmp / name.replace(" ", "_")
        runs[name] = validate_catalog(manifest, out, root=root, previous=previous, progress=False)
        return len(images)

    print(
        f"incremental: {len(changed)} photos re-encoded (catalogue root of {how}); first run "
        f"{first['seconds']['total']:.2f} s; next run with previous= it, against from scratch:"
    )
    blocks = {
        "from scratch": lambda: night2("from scratch", None),
        "incremental": lambda: night2("incremental", tmp / "night1"),
    }
    table = timed(blocks, rounds, len(images))
    counts = runs["incremental"]["images"]
    print(
        f"  incremental decoded {counts['decoded']} (expected {len(changed)}), reused "
        f"{counts['reused_from_previous']}"
    )
    return {
        "changed": len(changed),
        "root": how,
        "first_run_seconds": first["seconds"]["total"],
        "images": counts,
        "table": table,
        "ratio": table["incremental"]["seconds"] / table["from scratch"]["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--changed", type=float, default=0.05, help="fraction re-encoded")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args()
    if not (GROCERY_ROOT / "Ebay_train.txt").is_file():
        print(f"skipped: no Grocery data at {GROCERY_ROOT} (set VITRINE_GROCERY_ROOT)")
        return

    rows = grocery_paths(GROCERY_ROOT)
    images = [image for _, _, image in rows]
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="vitrine-bench-validate-") as folder:
        tmp = Path(folder)
        started = time.perf_counter()
        import great_expectations  # noqa: F401  (a one-off per process: not in the timings)

        import_seconds = time.perf_counter() - started
        warmup = write_manifest(tmp / "warmup" / "manifest.csv", rows[:20])
        validate_catalog(warmup, tmp / "warmup" / "out", root=GROCERY_ROOT, progress=False)
        for image in images:  # a warm page cache for every contender
            (GROCERY_ROOT / image).read_bytes()
        manifest = write_manifest(tmp / "manifest.csv", rows)
        print(
            f"{len(rows)} Grocery photos ({GROCERY_ROOT}), {args.rounds} rounds, {threads} CPU "
            f"threads; great_expectations import {import_seconds:.1f} s, paid once before timing"
        )
        results = {
            "photos": len(rows),
            "rounds": args.rounds,
            "threads": threads,
            "gx_import_seconds": import_seconds,
            "goal": GOAL,
            **steady(manifest, images, args.rounds, threads),
            "incremental": incremental(manifest, images, args.rounds, args.changed),
        }
    print(
        f"ratio validate / bare decode: {results['ratio_over_bare_1_thread']:.2f} against 1 "
        f"thread, {results['ratio_over_bare_threads']:.2f} against {threads} threads "
        f"(goal <= {GOAL}); incremental / from scratch: {results['incremental']['ratio']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
