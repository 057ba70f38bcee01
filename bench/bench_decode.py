"""Decoding large JPEGs scaled down (libjpeg's DCT scaling) against decoding them full size.

What a query upload, a catalogue photo at indexing time and an evaluation photo go through
before the forward: decode, then the model's preprocessing (resize the short side, centre
crop; `Embedder.prepare`). `model.image_format.decode_scaled` lets a JPEG decode at 1/2, 1/4 or
1/8 of its size while both sides stay at least the side the preprocessing resizes to. This
bench times decode + prepare both ways on the same photos, alternating in one process, at
phone (4032x3024), web (1600x1200) and small (800x600) sizes made from real Grocery photos
(or rendered demo products when the Grocery folder is absent), and checks what it costs in
the embedding: the cosine between the two ways' embeddings of each photo (pretrained Lite0,
the default backbone, untrained head).

    python bench/bench_decode.py [--photos 40] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import GROCERY_ROOT

SIZES = ((4032, 3024), (1600, 1200), (800, 600))


def source_photos(count: int) -> tuple[str, list[Image.Image]]:
    """``count`` real product photos (Grocery), or rendered demo products without them."""
    files = sorted(glob.glob(str(GROCERY_ROOT / "**" / "*.jpg"), recursive=True))
    if files:
        step = max(1, len(files) // count)
        return "grocery", [Image.open(f).convert("RGB") for f in files[::step][:count]]
    from components.catalog.demo import make_products, photograph, render_product

    rng = np.random.default_rng(0)
    shots = [photograph(render_product(p), rng, 400) for p in make_products(count)]
    return "demo products", shots


def jpegs(photos: list[Image.Image], size: tuple[int, int]) -> list[bytes]:
    """The photos enlarged to ``size`` and saved as a camera would (JPEG, quality 90)."""
    out = []
    for photo in photos:
        buffer = io.BytesIO()
        photo.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def prepare_all(embedder: Any, data: list[bytes], decode_side: int | None) -> list[Any]:
    """Decode (scaled when ``decode_side``) and prepare every photo, as the service does."""
    from serving.uploads import UploadLimits, decode_upload

    limits = UploadLimits(max_bytes=64_000_000, max_pixels=64_000_000)
    return [embedder.prepare(decode_upload(d, "image/jpeg", limits, decode_side)) for d in data]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from model.package import ModelConfig, build_model, save_package
    from serving.embedder import Embedder

    source, photos = source_photos(args.photos)
    with tempfile.TemporaryDirectory(prefix="vitrine-bench-decode-") as tmp:
        config = ModelConfig(embed_dim=None)  # pretrained backbone + pooling, no training
        package = save_package(build_model(config), config, Path(tmp) / "package")
        embedder = Embedder(package, "cpu", threads=1)
    side = embedder.decode_side
    print(f"{len(photos)} {source} photos; the model resizes the short side to {side} px")
    rows = []
    for size in SIZES:
        data = jpegs(photos, size)
        prepare_all(embedder, data[:2], None)  # warm both paths
        prepare_all(embedder, data[:2], side)
        seconds = {"full": 0.0, "scaled": 0.0}
        for _ in range(args.rounds):  # alternating, so machine noise weighs on both
            for name, decode_side in (("full", None), ("scaled", side)):
                tick = time.perf_counter()
                prepared = prepare_all(embedder, data, decode_side)
                seconds[name] += time.perf_counter() - tick
                if name == "full":
                    full = prepared
                else:
                    scaled = prepared
        cosine = (embedder.embed_prepared(full) * embedder.embed_prepared(scaled)).sum(1)
        per_photo = {k: 1000 * v / (args.rounds * len(data)) for k, v in seconds.items()}
        row = {
            "size": f"{size[0]}x{size[1]}",
            "jpeg_kb": round(np.mean([len(d) for d in data]) / 1024),
            "full_ms": per_photo["full"],
            "scaled_ms": per_photo["scaled"],
            "speedup": per_photo["full"] / per_photo["scaled"],
            "cosine_min": float(cosine.min()),
            "cosine_mean": float(cosine.mean()),
        }
        rows.append(row)
        print(
            f"  {row['size']:>9} ({row['jpeg_kb']} kB): decode + prepare {row['full_ms']:.1f} ms "
            f"full vs {row['scaled_ms']:.1f} ms scaled = {row['speedup']:.1f}x; embedding "
            f"cosine scaled vs full: min {row['cosine_min']:.4f}, mean {row['cosine_mean']:.4f}"
        )
    return {"source": source, "photos": len(photos), "decode_side": side, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=40, help="photos per size (default 40)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
