"""Kept input images: content-addressed files in a folder or an object store, under a size cap.

An image is stored once, at ``<root>/<aa>/<sha256>.<ext>`` (``aa``: the hash's first two hex digits, so
no folder holds millions of files; ``ext`` from the image's format), whatever number of predictions
refer to it. Local folders are written atomically (temp file, then rename); any other fsspec URL
(``s3://bucket/prefix``, ``gs://…``) gets one ``pipe`` per image, which object stores make atomic.

The cap is counted here (``used_bytes``); the prediction store seeds it from its ``images`` table and
re-reads it every minute and after each retention pass, so several servers sharing one store share
the cap to within a minute's worth of images. Only the store's background thread writes: never a request.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
from pathlib import Path

import fsspec
from PIL import Image, UnidentifiedImageError

from visionloop.fsutil import atomic_write_bytes

# Pillow's format name -> the extension a kept file gets
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


def image_extension(data: bytes) -> str:
    """The file extension for an encoded image (from its header only), ``bin`` when Pillow cannot tell."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return "bin"
    return EXTENSIONS.get(fmt, fmt.lower() or "bin")


def image_key(data: bytes) -> str:
    """Where an image is kept, relative to the root: ``<aa>/<sha256>.<ext>``."""
    digest = hashlib.sha256(data).hexdigest()
    return f"{digest[:2]}/{digest}.{image_extension(data)}"


class ImageStore:
    """Content-addressed image files under ``url`` (a folder, ``file://…`` or any fsspec URL), at most ``max_bytes``."""

    def __init__(self, url: str, max_bytes: int) -> None:
        self.url = url
        self.max_bytes = int(max_bytes)
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.used_bytes = 0  # seeded by the owner (the prediction store's images table)
        self._lock = threading.Lock()

    def path(self, key: str) -> str:
        if ".." in key.split("/") or key.startswith("/"):
            raise ValueError(f"not an image key: {key!r}")
        return f"{self.root}/{key}"

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.path(key)))

    def put(self, data: bytes, key: str | None = None) -> tuple[str | None, str]:
        """Keep ``data``; returns (key or None, result) with result ``kept``, ``duplicate`` or ``over_cap``.

        A file already there is not rewritten (the same bytes have the same name). Errors raise.
        """
        key = key or image_key(data)
        with self._lock:  # the cap first: past it, no request to the object store at all
            if self.used_bytes + len(data) > self.max_bytes:
                return None, "over_cap"
        if self.exists(key):
            return key, "duplicate"
        with self._lock:
            self.used_bytes += len(data)
        try:
            if self.local:
                atomic_write_bytes(Path(self.path(key)), data)
            else:
                self.fs.pipe_file(self.path(key), data)
        except BaseException:
            with self._lock:
                self.used_bytes -= len(data)
            raise
        return key, "kept"

    def open(self, key: str) -> bytes:
        """The bytes of a kept image."""
        return self.fs.cat_file(self.path(key))

    def delete(self, keys: list[str]) -> None:
        """Remove kept images (missing ones are not an error)."""
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(key))
