"""A seeded demo catalogue: procedurally rendered products, several photos each.

Each product has its own shape, colour pair, pattern and printed label; each photo varies the
viewpoint (rotation, perspective), scale, position, background, lighting and occlusion, so a
model must learn the product rather than the photo. Output is a catalogue manifest
(``manifest.csv``: product_id, image_path, category, title, price) beside an ``images/`` folder,
readable by ``vitrine train --dataset catalog``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter
from tqdm.auto import tqdm

CATEGORIES = ("mugs", "bottles", "boxes", "bags", "toys", "lamps")
SINGULAR = {
    "mugs": "mug",
    "bottles": "bottle",
    "boxes": "box",
    "bags": "bag",
    "toys": "toy",
    "lamps": "lamp",
}
SHAPES = ("circle", "square", "triangle", "hexagon", "star", "diamond", "pill", "cross")
PATTERNS = ("plain", "stripes", "dots", "checks", "rings")
MANIFEST_COLUMNS = ("product_id", "image_path", "category", "title", "price")


@dataclass(frozen=True)
class Product:
    """What makes a product recognisable across its photos."""

    product_id: str
    category: str
    title: str
    price: float
    shape: str
    pattern: str
    body: tuple[int, int, int]
    accent: tuple[int, int, int]
    label: str


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    hue = rng.uniform(0, 1)
    sat, val = rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0)
    i = int(hue * 6) % 6
    f = hue * 6 - int(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    rgb = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]
    return tuple(int(255 * c) for c in rgb)  # type: ignore[return-value]


def make_products(count: int, seed: int = 0) -> list[Product]:
    """``count`` distinct products, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    products = []
    for index in range(count):
        category = CATEGORIES[index % len(CATEGORIES)]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
        label = "".join(chr(ord("A") + int(c)) for c in rng.integers(0, 26, size=3))
        products.append(
            Product(
                product_id=f"P{index:05d}",
                category=category,
                title=f"{label} {pattern} {shape} {SINGULAR[category]}",
                price=round(float(rng.uniform(2, 200)), 2),
                shape=shape,
                pattern=pattern,
                body=_colour(rng),
                accent=_colour(rng),
                label=label,
            )
        )
    return products


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    corners = {"triangle": 3, "square": 4, "diamond": 4, "hexagon": 6, "circle": 48, "pill": 48}
    if shape == "star":
        return [
            (
                cx + (r if k % 2 == 0 else r / 2.3) * math.cos(math.pi * k / 5 - math.pi / 2),
                cy + (r if k % 2 == 0 else r / 2.3) * math.sin(math.pi * k / 5 - math.pi / 2),
            )
            for k in range(10)
        ]
    if shape == "cross":
        w = r / 2.6
        return [
            (cx - w, cy - r),
            (cx + w, cy - r),
            (cx + w, cy - w),
            (cx + r, cy - w),
            (cx + r, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + r),
            (cx - w, cy + r),
            (cx - w, cy + w),
            (cx - r, cy + w),
            (cx - r, cy - w),
            (cx - w, cy - w),
        ]
    n = corners[shape]
    offset = math.pi / 4 if shape == "square" else -math.pi / 2
    stretch = 0.55 if shape == "pill" else 1.0
    return [
        (
            cx + r * math.cos(2 * math.pi * k / n + offset),
            cy + stretch * r * math.sin(2 * math.pi * k / n + offset),
        )
        for k in range(n)
    ]


def render_product(product: Product, size: int = 256) -> Image.Image:
    """The product itself on a transparent canvas: shape, pattern and printed label."""
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    mask = Image.new("L", (size, size), 0)
    outline = _polygon(product.shape, size / 2, size / 2, size * 0.42)
    ImageDraw.Draw(mask).polygon(outline, fill=255)
    art = Image.new("RGB", (size, size), product.body)
    draw = ImageDraw.Draw(art)
    step = size // 8
    if product.pattern == "stripes":
        for x in range(-size, size, step):
            draw.line([(x, 0), (x + size, size)], fill=product.accent, width=step // 3)
    elif product.pattern == "dots":
        for x in range(step // 2, size, step):
            for y in range(step // 2, size, step):
                draw.ellipse(
                    [x - step / 5, y - step / 5, x + step / 5, y + step / 5], fill=product.accent
                )
    elif product.pattern == "checks":
        for x in range(0, size, step):
            for y in range(0, size, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step, y + step], fill=product.accent)
    elif product.pattern == "rings":
        for radius in range(step, size, step):
            draw.ellipse(
                [size / 2 - radius, size / 2 - radius, size / 2 + radius, size / 2 + radius],
                outline=product.accent,
                width=step // 4,
            )
    draw.rectangle([size * 0.3, size * 0.43, size * 0.7, size * 0.57], fill=(250, 250, 245))
    draw.text((size * 0.36, size * 0.45), product.label, fill=(20, 20, 20), font_size=size // 10)
    canvas.paste(art, (0, 0), mask)
    return canvas


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = np.array(_colour(rng), dtype=np.float32) * rng.uniform(0.3, 0.9)
    gradient = np.linspace(rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0), size, dtype=np.float32)
    pixels = base[None, None, :] * gradient[:, None, None]
    pixels = pixels + rng.normal(0, 12, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def photograph(product_art: Image.Image, rng: np.random.Generator, size: int = 224) -> Image.Image:
    """One shop photo: viewpoint, scale, position, background, lighting, occlusion."""
    art = product_art.rotate(float(rng.uniform(-35, 35)), resample=Image.Resampling.BICUBIC)
    # Perspective: squeeze one axis as if seen at an angle.
    squeeze = rng.uniform(0.65, 1.0)
    w, h = art.size
    art = art.resize((int(w * squeeze), h) if rng.random() < 0.5 else (w, int(h * squeeze)))
    scale = rng.uniform(0.55, 0.95) * size / max(art.size)
    art = art.resize((max(8, int(art.width * scale)), max(8, int(art.height * scale))))
    photo = _background(rng, size)
    x = int(rng.integers(0, max(1, size - art.width)))
    y = int(rng.integers(0, max(1, size - art.height)))
    photo.paste(art, (x, y), art)
    photo = ImageEnhance.Brightness(photo).enhance(float(rng.uniform(0.6, 1.35)))
    photo = ImageEnhance.Color(photo).enhance(float(rng.uniform(0.7, 1.3)))
    if rng.random() < 0.4:  # something in front of the product
        draw = ImageDraw.Draw(photo)
        ox, oy = rng.integers(0, size, size=2)
        r = int(size * rng.uniform(0.08, 0.2))
        draw.ellipse([ox - r, oy - r, ox + r, oy + r], fill=_colour(rng))
    if rng.random() < 0.3:
        photo = photo.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    return photo


def generate_demo_catalog(
    out_dir: Path,
    products: int = 120,
    photos_per_product: int = 6,
    seed: int = 0,
    image_size: int = 224,
    progress: bool = True,
    bad_rows: bool = True,
) -> Path:
    """Write ``out_dir/manifest.csv`` and ``out_dir/images/`` and return the manifest path.

    Args:
        out_dir: folder to create (existing files are overwritten).
        products: number of distinct products.
        photos_per_product: photos rendered per product.
        seed: makes the catalogue reproducible.
        image_size: side of each square JPEG.
        progress: show a progress bar.
        bad_rows: append one deliberately bad row of each kind validation catches
            (corrupt, missing, tiny, duplicate, path escape, bomb, wrong format, bad price,
            no product id; see :mod:`components.catalog.bad_rows`).
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    catalogue = make_products(products, seed)
    for product in tqdm(
        catalogue, desc="rendering demo catalogue", unit="product", disable=not progress
    ):
        art = render_product(product)
        rng = np.random.default_rng([seed, int(product.product_id[1:])])
        for shot in range(photos_per_product):
            relative = f"images/{product.product_id}_{shot}.jpg"
            photograph(art, rng, image_size).save(out_dir / relative, quality=90)
            rows.append(
                {
                    "product_id": product.product_id,
                    "image_path": relative,
                    "category": product.category,
                    "title": product.title,
                    "price": f"{product.price:.2f}",
                }
            )
    if bad_rows:
        from components.catalog.bad_rows import demo_bad_rows

        rows.extend(demo_bad_rows(out_dir, rows))
    manifest = out_dir / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(MANIFEST_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return manifest
