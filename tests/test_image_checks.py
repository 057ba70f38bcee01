"""Image checks: path containment, reading limits, header-first refusal, decoding, facts."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from components.catalog.bad_rows import write_png_bomb
from components.catalog.config import ImageLimits, ValidationConfig
from components.catalog.image_checks import check_image, check_images, inspect_bytes, locate

LIMITS = ImageLimits()


def _jpeg(size: tuple[int, int] = (96, 80), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


def test_locate_keeps_paths_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "catalogue"
    (root / "images").mkdir(parents=True)
    (tmp_path / "outside.jpg").write_bytes(_jpeg())
    (root / "images" / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    inside = str((root / "images" / "a.jpg").resolve())
    assert locate("images/a.jpg", root) == (inside, "")
    assert locate(inside, root) == (inside, "")  # absolute but inside
    assert locate(f"file://{inside}", root) == (inside, "")
    assert locate("images/../images/a.jpg", root) == (inside, "")
    for escaping in ("../outside.jpg", str(tmp_path / "outside.jpg"), "images/link.jpg", "/etc"):
        assert locate(escaping, root) == ("", "path_escape"), escaping
    assert locate("nosuchscheme://bucket/a.jpg", root) == ("", "unsupported_uri")
    assert locate("memory://bucket/a.jpg", root) == ("memory://bucket/a.jpg", "")


def test_good_image_facts() -> None:
    facts = inspect_bytes(_jpeg(), LIMITS)
    assert (facts.format, facts.width, facts.height, facts.decoded, facts.error) == (
        "JPEG",
        96,
        80,
        True,
        "",
    )
    assert len(facts.sha256) == 64 and facts.reusable


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_jpeg()[:300], "corrupt_image"),
        (b"<html>404</html>", "not_an_image"),
        (b"", "not_an_image"),
        (_jpeg((40, 200)), "too_small"),
    ],
)
def test_bad_bytes_get_their_reason(data: bytes, reason: str) -> None:
    facts = inspect_bytes(data, LIMITS)
    from components.catalog.image_checks import image_reasons

    assert [r for r, _ in image_reasons(facts, LIMITS)] == [reason]


def test_bombs_are_refused_from_the_header_without_decoding(tmp_path: Path) -> None:
    from components.catalog.image_checks import image_reasons

    ours = inspect_bytes(write_png_bomb(tmp_path / "b1.png", 8000, 8000).read_bytes(), LIMITS)
    assert (ours.width, ours.height, ours.decoded) == (8000, 8000, False)
    assert [r for r, _ in image_reasons(ours, LIMITS)] == ["too_many_pixels"]
    # Above twice Pillow's own limit, Pillow refuses to open it at all.
    pillows = inspect_bytes(write_png_bomb(tmp_path / "b2.png", 20000, 20000).read_bytes(), LIMITS)
    assert (pillows.decoded, pillows.error) == (False, "too_many_pixels") and pillows.reusable
    assert [r for r, _ in image_reasons(pillows, LIMITS)] == ["too_many_pixels"]
    assert (tmp_path / "b2.png").stat().st_size < 1_000_000


def test_formats_are_judged_by_content(tmp_path: Path) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "really_a_gif.jpg", "GIF")
    check = check_image("really_a_gif.jpg", tmp_path, LIMITS, {})
    assert check.reasons == ("format_not_allowed",) and not check.decoded
    Image.new("RGB", (100, 100)).save(tmp_path / "ok.webp", "WEBP")
    assert check_image("ok.webp", tmp_path, LIMITS, {}).reasons == ()
    gif_ok = ImageLimits(formats=("gif", "jpeg"))
    assert check_image("really_a_gif.jpg", tmp_path, gif_ok, {}).reasons == ()


def test_missing_large_and_directory_paths(tmp_path: Path) -> None:
    (tmp_path / "big.jpg").write_bytes(_jpeg((400, 400)))
    (tmp_path / "folder.jpg").mkdir()
    small_files = ImageLimits(max_file_bytes=500)
    assert check_image("nothing.jpg", tmp_path, LIMITS, {}).reasons == ("file_missing",)
    assert check_image("folder.jpg", tmp_path, LIMITS, {}).reasons == ("file_missing",)
    large = check_image("big.jpg", tmp_path, small_files, {})
    assert large.reasons == ("file_too_large",) and large.facts is None


def test_known_hashes_are_not_decoded_again(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(_jpeg())
    first = check_image("a.jpg", tmp_path, LIMITS, {})
    assert first.decoded and first.facts is not None
    again = check_image("a.jpg", tmp_path, LIMITS, {first.facts.sha256: first.facts})
    assert not again.decoded and again.facts == first.facts and again.reasons == ()
    # Facts of a file refused on its header alone are not trusted once the limits change.
    (tmp_path / "small.jpg").write_bytes(_jpeg((50, 50)))
    small = check_image("small.jpg", tmp_path, LIMITS, {})
    assert small.reasons == ("too_small",) and small.facts is not None
    assert not small.facts.reusable
    relaxed = ImageLimits(min_side=32)
    redo = check_image("small.jpg", tmp_path, relaxed, {small.facts.sha256: small.facts})
    assert redo.decoded and redo.reasons == ()


def test_check_images_keeps_order_on_threads(tmp_path: Path) -> None:
    names = []
    for i in range(40):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(colour=(i * 6, 0, 0)) if i % 7 else b"junk")
        names.append(f"{i}.jpg")
    checks = check_images(names, tmp_path, LIMITS, workers=4, progress=False)
    assert [c.location for c in checks] == [str((tmp_path / n).resolve()) for n in names]
    assert [bool(c.reasons) for c in checks] == [i % 7 == 0 for i in range(40)]


def test_config_from_params_flat_or_nested() -> None:
    flat = ValidationConfig.from_dict({"min_side": 32, "formats": ["jpeg"], "max_price": 50})
    nested = ValidationConfig.from_dict({"images": {"min_side": 32, "formats": ["JPEG"]}})
    assert flat.images == nested.images == ImageLimits(min_side=32, formats=("JPEG",))
    assert flat.max_price == 50
    with pytest.raises(ValueError, match=r"unknown validation option.*min_sides"):
        ValidationConfig.from_dict({"min_sides": 3})
    with pytest.raises(ValueError, match="positive"):
        ImageLimits(max_pixels=0)


def test_fsspec_uris_are_read_through_fsspec(tmp_path: Path) -> None:
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe("/vitrine-test/a.jpg", _jpeg())
    check = check_image("memory://vitrine-test/a.jpg", tmp_path, LIMITS, {})
    assert check.reasons == () and check.facts is not None and check.facts.format == "JPEG"
    missing = check_image("memory://vitrine-test/none.jpg", tmp_path, LIMITS, {})
    assert missing.reasons == ("file_missing",)
    large = check_image("memory://vitrine-test/a.jpg", tmp_path, ImageLimits(max_file_bytes=10), {})
    assert large.reasons == ("file_too_large",)
    memory.rm("/vitrine-test", recursive=True)


def test_http_uris_against_a_local_server(tmp_path: Path) -> None:
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    (tmp_path / "a.jpg").write_bytes(_jpeg())
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        checks = check_images(
            [f"{base}/a.jpg", f"{base}/none.jpg"], tmp_path, LIMITS, progress=False
        )
        assert [c.reasons for c in checks] == [(), ("file_missing",)]
        assert checks[0].facts is not None and checks[0].facts.width == 96
    finally:
        server.shutdown()
        server.server_close()


def test_a_container_cpu_quota_caps_the_cpu_count(tmp_path: Path) -> None:
    from components.catalog.image_checks import _cgroup_cpu_quota

    assert _cgroup_cpu_quota(tmp_path) is None  # no cgroup files: no quota
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker --cpus=1.5
    assert _cgroup_cpu_quota(tmp_path) == 1.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpu_quota(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cgroup_cpu_quota(v1) is None
