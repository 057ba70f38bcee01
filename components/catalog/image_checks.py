"""Image checks the manifest suite cannot do, run in parallel threads.

For each row: the path must stay inside the catalogue root (no ``..`` or symlink escapes),
the file must exist and be at most ``max_file_bytes``; its bytes are hashed (SHA-256) and,
unless the previous snapshot already knows that hash, opened with Pillow: the format must be
allowed, width x height at most ``max_pixels`` (checked from the header, before any pixel is
decoded), the shortest side at least ``min_side``, and the pixels must decode. Pillow releases
the GIL while it decodes and hashlib while it hashes, so threads scale without pickling.

What was measured about a file (:class:`ImageFacts`) is kept apart from what the limits say
about it (:func:`image_reasons`), so a snapshot of facts stays valid when limits change.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import re
import stat
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from components.catalog.config import ImageLimits
from model.image_format import canonical_format, signature

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
# Header-level problems that no change of limits can cure: reusable from a snapshot as they are.
_FINAL_ERRORS = ("not_an_image", "too_many_pixels", "corrupt_image")


@dataclass(frozen=True)
class ImageFacts:
    """What reading one file found, independent of any limit.

    Attributes:
        sha256: Hex digest of the file's bytes.
        size_bytes: File size.
        format: Pillow's format name (``"JPEG"``), or ``""`` when Pillow cannot identify it.
        width: Width in pixels from the header (0 when unknown).
        height: Height in pixels from the header (0 when unknown).
        decoded: Whether the pixels were decoded (header-only checks can refuse a file first).
        error: ``""``, ``"not_an_image"``, ``"too_many_pixels"`` (Pillow itself refused the
            header as a decompression bomb) or ``"corrupt_image"`` (an image signature whose
            header does not parse, or pixels that do not decode).
        message: What went wrong, for people.
    """

    sha256: str
    size_bytes: int
    format: str
    width: int
    height: int
    decoded: bool
    error: str = ""
    message: str = ""

    @property
    def reusable(self) -> bool:
        """Whether a later run may trust these facts instead of decoding the same bytes."""
        return self.decoded or self.error in _FINAL_ERRORS


@dataclass(frozen=True)
class ImageCheck:
    """The outcome of the image checks for one manifest row.

    Attributes:
        location: The absolute path or URI that was read ("" when the path was refused).
        facts: What was found in the file; None when it could not be read.
        problems: ``(reason code, human detail)`` pairs, empty when the image is fine.
        decoded: Whether this run decoded the pixels (False when reused or refused early).
    """

    location: str
    facts: ImageFacts | None
    problems: tuple[tuple[str, str], ...]
    decoded: bool = False

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(reason for reason, _ in self.problems)


def locate(image_path: str, root: Path) -> tuple[str, str]:
    """Resolve a manifest ``image_path`` against the catalogue root.

    Returns:
        ``(location, "")`` with an absolute local path or a remote URI, or ``("", reason)``
        where reason is ``path_escape`` (outside the root) or ``unsupported_uri``.
    """
    if _URI.match(image_path):
        scheme = image_path.split("://", 1)[0].lower()
        if scheme != "file":
            import fsspec

            if scheme not in fsspec.available_protocols():
                return "", "unsupported_uri"
            return image_path, ""
        image_path = image_path[len("file://") :]
    root = _real_folder(str(root))
    # An absolute image_path replaces the root. Lexical ``..`` first, then the folder's real
    # path (cached: a catalogue has far fewer folders than images), then the file's own link.
    folder, name = os.path.split(os.path.normpath(os.path.join(root, image_path)))
    real = os.path.join(_real_folder(folder), name)
    if os.path.islink(real):
        real = os.path.realpath(real)
    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
        return "", "path_escape"
    return real, ""


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    """A folder's path with symlinks resolved; cached per run (see :func:`check_images`)."""
    return os.path.realpath(folder)


def inspect_bytes(data: bytes, limits: ImageLimits, digest: str = "") -> ImageFacts:
    """Open one image and decode its pixels only if its header passes every limit.

    ``digest`` is the SHA-256 of ``data`` when the caller has it already.
    """
    digest = digest or hashlib.sha256(data).hexdigest()
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        return ImageFacts(digest, len(data), "", 0, 0, False, "too_many_pixels", str(err))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        announced = signature(data)
        if announced:  # an image file whose header is cut or broken
            message = f"a {announced} file whose header does not parse ({err})"
            return ImageFacts(digest, len(data), "", 0, 0, False, "corrupt_image", message)
        message = "no image format Pillow knows starts these bytes"
        return ImageFacts(digest, len(data), "", 0, 0, False, "not_an_image", message)
    with image:
        fmt, (width, height) = canonical_format(image.format), image.size
        header_ok = (
            fmt in limits.formats
            and width * height <= limits.max_pixels
            and min(width, height) >= limits.min_side
        )
        if not header_ok:
            return ImageFacts(digest, len(data), fmt, width, height, False)
        try:
            image.load()
        except Exception as err:  # Pillow's decoders raise OSError, SyntaxError, ValueError...
            return ImageFacts(
                digest, len(data), fmt, width, height, True, "corrupt_image", str(err)
            )
    return ImageFacts(digest, len(data), fmt, width, height, True)


def image_reasons(facts: ImageFacts, limits: ImageLimits) -> list[tuple[str, str]]:
    """The ``(reason, detail)`` pairs the limits give for these facts; empty when fine."""
    if not facts.format:  # Pillow could not read the header at all
        return [(facts.error, f"Pillow refused the file: {facts.message}")]
    found: list[tuple[str, str]] = []
    if facts.format not in limits.formats:
        found.append(
            (
                "format_not_allowed",
                f"format {facts.format} is not one of {', '.join(limits.formats)}",
            )
        )
    if facts.width * facts.height > limits.max_pixels:
        found.append(
            (
                "too_many_pixels",
                f"{facts.width}x{facts.height} is over {limits.max_pixels} pixels",
            )
        )
    if min(facts.width, facts.height) < limits.min_side:
        found.append(
            (
                "too_small",
                f"{facts.width}x{facts.height} has a side under {limits.min_side} px",
            )
        )
    if facts.error == "corrupt_image":
        found.append(("corrupt_image", f"the pixels do not decode: {facts.message}"))
    return found


def _read(location: str, limits: ImageLimits) -> tuple[bytes | None, list[tuple[str, str]]]:
    """The file's bytes, or the reason it cannot be read (missing, too large, unreadable)."""
    try:
        if _URI.match(location):
            import fsspec

            with fsspec.open(location, "rb") as handle:
                size = getattr(handle, "size", None)
                if size is not None and size > limits.max_file_bytes:
                    return None, [_too_large(size, limits)]
                data = handle.read(limits.max_file_bytes + 1)
        else:
            info = os.stat(location)
            size = info.st_size
            if not stat.S_ISREG(info.st_mode):
                return None, [("file_missing", f"{location} is a folder or device, not a file")]
            if size > limits.max_file_bytes:
                return None, [_too_large(size, limits)]
            with open(location, "rb") as handle:
                data = handle.read(limits.max_file_bytes + 1)
    except FileNotFoundError:
        return None, [("file_missing", f"no file at {location}")]
    except OSError as err:
        return None, [("unreadable_file", f"cannot read {location}: {err}")]
    except ImportError as err:  # fsspec knows the scheme but its driver is not installed
        return None, [("unreadable_file", f"cannot read {location}: {err}")]
    if len(data) > limits.max_file_bytes:  # grew while we read it, or the size was unknown
        return None, [_too_large(len(data), limits)]
    return data, []


def _too_large(size: int, limits: ImageLimits) -> tuple[str, str]:
    return "file_too_large", f"{size} bytes is over the {limits.max_file_bytes}-byte limit"


def check_image(
    image_path: str, root: Path, limits: ImageLimits, known: Mapping[str, ImageFacts]
) -> ImageCheck:
    """Run every image check on one manifest ``image_path``.

    Args:
        image_path: As written in the manifest (relative to ``root``, absolute, or a URI).
        root: The catalogue root that relative paths live in and may not leave.
        limits: The image limits.
        known: Facts from the previous snapshot by SHA-256; a hit is not decoded again.
    """
    location, refused = locate(image_path, root)
    if refused:
        detail = {
            "path_escape": f"{image_path!r} points outside the catalogue root {root}",
            "unsupported_uri": f"{image_path!r} uses a URI scheme fsspec does not know",
        }[refused]
        return ImageCheck("", None, ((refused, detail),))
    data, problems = _read(location, limits)
    if data is None:
        return ImageCheck(location, None, tuple(problems))
    digest = hashlib.sha256(data).hexdigest()
    facts = known.get(digest)
    decoded = False
    if facts is None or not facts.reusable:
        facts = inspect_bytes(data, limits, digest)
        decoded = facts.decoded
    return ImageCheck(location, facts, tuple(image_reasons(facts, limits)), decoded)


def available_cpus() -> int:
    """CPUs this process may run on (affinity and container limits), not the host's count.

    A container's CPU quota (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``) caps the
    count: ``docker --cpus=2`` on a 32-core host gives 2, where affinity alone says 32.
    """
    try:
        cpus = len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup quota allows, or None without a quota."""
    candidates = [
        (root / "cpu.max", None),  # v2: "max 100000" or "200000 100000"
        (root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"),  # v1
        (root / "cpu,cpuacct" / "cpu.cfs_quota_us", root / "cpu,cpuacct" / "cpu.cfs_period_us"),
    ]
    for quota_file, period_file in candidates:
        try:
            if period_file is None:
                quota, period = quota_file.read_text().split()[:2]
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
        except (OSError, ValueError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            return int(quota) / int(period) if int(quota) > 0 and int(period) > 0 else None
        except ValueError:
            return None
    return None


def check_images(
    image_paths: Sequence[str],
    root: Path,
    limits: ImageLimits,
    known: Mapping[str, ImageFacts] | None = None,
    workers: int = 0,
    progress: bool = True,
) -> list[ImageCheck]:
    """:func:`check_image` for every path, in order, on ``workers`` threads (0: one per core)."""
    known = known or {}
    workers = workers or available_cpus()
    _real_folder.cache_clear()  # folders may have been re-linked since the last run
    with (
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-check") as pool,
        tqdm(
            total=len(image_paths), desc="checking images", unit="img", disable=not progress
        ) as bar,
    ):

        def one(path: str) -> ImageCheck:
            result = check_image(path, root, limits, known)
            bar.update()
            return result

        return list(pool.map(one, image_paths))
