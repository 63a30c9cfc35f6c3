"""The image store: metadata stripped, deduplicated, atomic, refusals leave nothing."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image as PILImage
from PIL import PngImagePlugin

from db.engine import session_scope
from db.images import ImageError, ImageStore, get_or_create_image, remove_orphan_files
from tests.db_fixtures import HiveEnv, hive, hive_factory, png_bytes  # noqa: F401

GPS_IFD = 0x8825


def jpeg_with_gps() -> bytes:
    img = PILImage.new("RGB", (32, 24), (10, 120, 200))
    exif = PILImage.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0x0110] = "Model X"  # Model
    exif.get_ifd(GPS_IFD).update({1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)})
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_exif_and_gps_are_stripped(hive: HiveEnv) -> None:
    data = jpeg_with_gps()
    with PILImage.open(io.BytesIO(data)) as src:  # the fixture really carries GPS
        assert src.getexif().get_ifd(GPS_IFD)[1] == "N"
    with session_scope(hive.url) as s:
        row = get_or_create_image(s, hive.store, data)
    stored = hive.store.path_for(row.sha256).read_bytes()
    assert stored.startswith(b"\x89PNG")
    assert b"SecretCam" not in stored and b"Exif" not in stored and b"eXIf" not in stored
    with PILImage.open(io.BytesIO(stored)) as img:
        assert img.format == "PNG"
        assert len(img.getexif()) == 0
        assert not img.info  # no exif, icc_profile, dpi or text left
        assert img.size == (32, 24)
    assert row.sha256 == hashlib.sha256(stored).hexdigest()
    assert (row.width, row.height, row.size_bytes) == (32, 24, len(stored))
    assert row.path == f"images/{row.sha256[:2]}/{row.sha256}.png"


def test_png_text_chunks_are_stripped() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "home address: 1 Secret Lane")
    buf = io.BytesIO()
    PILImage.new("RGBA", (8, 8), (1, 2, 3, 128)).save(buf, format="PNG", pnginfo=info)
    png, w, h = ImageStore("/nonexistent").clean_png(buf.getvalue())
    assert b"Secret Lane" not in png
    with PILImage.open(io.BytesIO(png)) as img:
        assert img.mode == "RGBA" and not img.info


def test_exif_orientation_is_applied_before_stripping(hive: HiveEnv) -> None:
    img = PILImage.new("RGB", (40, 20), (0, 0, 0))
    exif = PILImage.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    info = hive.store.put_bytes(buf.getvalue())
    assert (info.width, info.height) == (20, 40)


def test_deduplicated_by_content(hive: HiveEnv) -> None:
    with session_scope(hive.url) as s:
        a = get_or_create_image(s, hive.store, png_bytes((1, 2, 3)))
        b = get_or_create_image(s, hive.store, png_bytes((1, 2, 3)))
        c = get_or_create_image(s, hive.store, PILImage.new("RGB", (16, 16), (1, 2, 3)))
        d = get_or_create_image(s, hive.store, png_bytes((3, 2, 1)))
    assert a.id == b.id == c.id != d.id
    assert hive.counts()["images"] == 2
    assert len(hive.files()) == 2
    assert not [f for f in hive.files() if ".tmp" in f]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty upload"),
        (b"this is not an image at all", "not a readable image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a readable image|could not decode"),
        ("a string", "expected image bytes"),
    ],
)
def test_non_images_refused_and_nothing_written(hive: HiveEnv, data: object, message: str) -> None:
    before = hive.snapshot()
    with pytest.raises(ImageError, match=message):
        with session_scope(hive.url) as s:
            get_or_create_image(s, hive.store, data)  # type: ignore[arg-type]
    assert hive.snapshot() == before


def test_truncated_image_refused(hive: HiveEnv) -> None:
    data = png_bytes(size=(64, 64))
    before = hive.snapshot()
    with pytest.raises(ImageError):
        with session_scope(hive.url) as s:
            get_or_create_image(s, hive.store, data[: len(data) // 2])
    assert hive.snapshot() == before


def test_huge_image_refused_and_nothing_written(hive: HiveEnv) -> None:
    buf = io.BytesIO()
    PILImage.new("1", (8000, 6000)).save(buf, format="PNG")  # 48 MP, a few KB on disk
    before = hive.snapshot()
    with pytest.raises(ImageError, match=r"image too large: 8000x6000 = 48000000 pixels exceeds the limit of 40000000"):
        with session_scope(hive.url) as s:
            get_or_create_image(s, hive.store, buf.getvalue())
    assert hive.snapshot() == before


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ab" * 31, "AB" * 32, "g" * 64, ""])
def test_paths_only_from_valid_hashes(hive: HiveEnv, bad: str) -> None:
    with pytest.raises(ImageError, match="not a sha256"):
        hive.store.path_for(bad)


def test_put_stored_checks_hash(hive: HiveEnv) -> None:
    png = png_bytes()
    with pytest.raises(ImageError, match="do not match their hash"):
        hive.store.put_stored(png, "0" * 64)
    assert hive.files() == []
    info = hive.store.put_stored(png, hashlib.sha256(png).hexdigest())
    assert hive.store.read_bytes(info.sha256) == png


def test_orphan_files_swept(hive: HiveEnv) -> None:
    with pytest.raises(RuntimeError):
        with session_scope(hive.url) as s:
            get_or_create_image(s, hive.store, png_bytes((7, 7, 7)))
            raise RuntimeError("request failed after the upload")
    assert hive.counts()["images"] == 0 and len(hive.files()) == 1  # file kept, row rolled back
    with session_scope(hive.url) as s:
        keep = get_or_create_image(s, hive.store, png_bytes((8, 8, 8)))
        assert remove_orphan_files(s, hive.store, min_age_s=3600) == 0  # too recent
        assert remove_orphan_files(s, hive.store, min_age_s=0) == 1
    assert hive.files() == [f"{keep.sha256[:2]}/{keep.sha256}.png"]
