"""The image store: content-addressed PNG files under ``HIVE_HOME/images``.

Every image is decoded and re-encoded to PNG from its pixels alone, which drops EXIF
(GPS included), ICC profiles, text chunks and anything else a file can smuggle. The
stored bytes are named by their sha256, so identical images are stored once, and a
path is only ever built from a validated hash, never from user input. Files are written
to a temporary name in the same folder, fsynced and renamed, so a reader sees either
no file or the whole file.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.config import hive_home
from db.models import Image

#: Largest accepted image, in pixels (a 40-megapixel photo); bigger ones are refused.
MAX_PIXELS = 40_000_000
#: Largest accepted upload, in bytes, checked before decoding anything.
MAX_BYTES = 64 * 1024 * 1024

_SHA256 = re.compile(r"[0-9a-f]{64}")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(ValueError):
    """The data is not an acceptable image; nothing was stored."""


@dataclass(frozen=True)
class ImageRecordInfo:
    """What the store knows about one stored image."""

    sha256: str
    width: int
    height: int
    size_bytes: int
    relpath: str  # relative to HIVE_HOME, e.g. "images/ab/ab12....png"
    path: Path  # absolute
    created: bool  # False when the same image was already stored


def check_sha256(sha: str) -> str:
    """Return ``sha`` if it is 64 lowercase hex digits, else raise: the only source of paths."""
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ImageError(f"not a sha256 hex digest: {sha!r}")
    return sha


class ImageStore:
    """Content-addressed, deduplicated, metadata-free PNG files under ``home/images``."""

    def __init__(self, home: Path | str | None = None, *, max_pixels: int = MAX_PIXELS) -> None:
        self.home = Path(home).resolve() if home is not None else hive_home()
        self.root = self.home / "images"
        self.max_pixels = max_pixels

    # -- paths -----------------------------------------------------------------------
    @staticmethod
    def relpath_for(sha: str) -> str:
        """The path of an image relative to HIVE_HOME."""
        check_sha256(sha)
        return f"images/{sha[:2]}/{sha}.png"

    def path_for(self, sha: str) -> Path:
        """The absolute path of the stored image with this hash (it may not exist)."""
        return self.home / self.relpath_for(sha)

    def exists(self, sha: str) -> bool:
        return self.path_for(sha).is_file()

    def iter_shas(self) -> Iterator[str]:
        """Hashes of all stored files (temporary files excluded)."""
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob("??/*.png")):
            if _SHA256.fullmatch(path.stem) and path.parent.name == path.stem[:2]:
                yield path.stem

    # -- writing ---------------------------------------------------------------------
    def clean_png(self, data: bytes | PILImage.Image) -> tuple[bytes, int, int]:
        """Validate an image and re-encode it as a metadata-free PNG: (png, width, height)."""
        if isinstance(data, PILImage.Image):
            img = data
        else:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ImageError(f"expected image bytes, got {type(data).__name__}")
            if len(data) == 0:
                raise ImageError("empty upload: no image data")
            if len(data) > MAX_BYTES:
                raise ImageError(f"upload of {len(data)} bytes exceeds the {MAX_BYTES}-byte limit")
            try:
                img = PILImage.open(io.BytesIO(bytes(data)))
            except PILImage.DecompressionBombError as exc:
                raise ImageError(f"image too large: {exc}") from None
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise ImageError(f"not a readable image: {exc}") from None
        width, height = img.size
        if width < 1 or height < 1:
            raise ImageError(f"image has no pixels ({width}x{height})")
        if width * height > self.max_pixels:
            raise ImageError(
                f"image too large: {width}x{height} = {width * height} pixels "
                f"exceeds the limit of {self.max_pixels}"
            )
        try:
            img.seek(0)  # animated formats: keep the first frame
        except (EOFError, AttributeError):
            pass
        try:
            img.load()
            img = ImageOps.exif_transpose(img)  # keep the photo upright once EXIF is gone
            has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
                img.mode == "P" and "transparency" in img.info
            )
            mode = "RGBA" if has_alpha else "RGB"
            if img.mode != mode:
                img = img.convert(mode)
            # A new image from raw pixels carries no info, EXIF, ICC or text chunks at all.
            bare = PILImage.frombytes(mode, img.size, img.tobytes())
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"could not decode image: {exc}") from None
        buf = io.BytesIO()
        bare.save(buf, format="PNG", compress_level=6)
        return buf.getvalue(), bare.width, bare.height

    def put_bytes(self, data: bytes) -> ImageRecordInfo:
        """Store an uploaded image (any format Pillow reads) as a clean PNG."""
        return self._put_png(*self.clean_png(data))

    def put_pil(self, img: PILImage.Image) -> ImageRecordInfo:
        """Store a Pillow image (e.g. an editor output) as a clean PNG."""
        return self._put_png(*self.clean_png(img))

    def put_stored(self, png: bytes, sha256: str) -> ImageRecordInfo:
        """Store PNG bytes exactly as given (imports): they must hash to ``sha256``."""
        check_sha256(sha256)
        if hashlib.sha256(png).hexdigest() != sha256:
            raise ImageError(f"image bytes do not match their hash {sha256}")
        if not png.startswith(_PNG_SIGNATURE):
            raise ImageError(f"image {sha256} is not a PNG")
        try:
            with PILImage.open(io.BytesIO(png)) as img:
                width, height = img.size
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageError(f"image {sha256} is not readable: {exc}") from None
        return self._put_png(png, width, height)

    def _put_png(self, png: bytes, width: int, height: int) -> ImageRecordInfo:
        sha = hashlib.sha256(png).hexdigest()
        path = self.path_for(sha)
        created = not path.is_file()
        if created:
            _write_atomic(path, png)
        return ImageRecordInfo(sha, width, height, len(png), self.relpath_for(sha), path, created)

    # -- reading and removing -------------------------------------------------------
    def read_bytes(self, sha: str) -> bytes:
        return self.path_for(sha).read_bytes()

    def open(self, sha: str) -> PILImage.Image:
        """The stored image, loaded (the file is closed on return)."""
        with PILImage.open(self.path_for(sha)) as img:
            img.load()
            return img

    def delete(self, sha: str) -> bool:
        """Remove a stored file; True if it was there."""
        try:
            self.path_for(sha).unlink()
            return True
        except FileNotFoundError:
            return False


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with suppress(OSError):  # make the rename itself durable (POSIX only)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def get_or_create_image(
    session: Session, store: ImageStore, data: bytes | PILImage.Image
) -> Image:
    """Store an image file (validated, cleaned) and return its row, creating it if new.

    The file is written before the row, so a row never points at a missing file; a
    rolled-back transaction can leave an unreferenced file, which
    :func:`remove_orphan_files` sweeps up.
    """
    info = store.put_pil(data) if isinstance(data, PILImage.Image) else store.put_bytes(data)
    return _image_row(session, info)


def image_row_for_stored(session: Session, store: ImageStore, png: bytes, sha256: str) -> Image:
    """Like :func:`get_or_create_image` for exact PNG bytes of a known hash (imports)."""
    return _image_row(session, store.put_stored(png, sha256))


def _image_row(session: Session, info: ImageRecordInfo) -> Image:
    row = session.scalar(select(Image).where(Image.sha256 == info.sha256))
    if row is not None:
        return row
    row = Image(
        sha256=info.sha256,
        width=info.width,
        height=info.height,
        size_bytes=info.size_bytes,
        path=info.relpath,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # another transaction stored the same image first
        row = session.scalars(select(Image).where(Image.sha256 == info.sha256)).one()
    return row


def remove_orphan_files(session: Session, store: ImageStore, *, min_age_s: float = 3600) -> int:
    """Delete stored files that no ``images`` row names and that are older than ``min_age_s``.

    The age guard leaves alone files whose row is still being committed.
    """
    known = set(session.scalars(select(Image.sha256)))
    now = time.time()
    removed = 0
    for sha in list(store.iter_shas()):
        path = store.path_for(sha)
        if sha not in known and now - path.stat().st_mtime >= min_age_s:
            removed += store.delete(sha)
    return removed
