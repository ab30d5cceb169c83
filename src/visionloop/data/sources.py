"""Ingest: turn any supported source into a local folder laid out as ``class_name/image_file``.

Sources:
- ``digits``: the 8x8 handwritten digits that scikit-learn ships, written out as real PNG files;
- ``synthetic``: our deterministic generator (see ``synthetic.py``);
- a local folder in the ``class_name/file.ext`` layout (used in place, not copied);
- a ``.zip`` / ``.tar`` / ``.tar.gz`` archive (recognised by content, not by name), extracted safely;
- any fsspec URL (``file://``, ``s3://``, ``gs://``, ``http(s)://``): a folder is copied, an archive
  is downloaded and extracted. s3fs ships with visionloop (endpoint and credentials from the usual
  AWS variables, e.g. AWS_ENDPOINT_URL for MinIO); other protocols need their driver (gcsfs, adlfs).

Everything fetched or generated lands under ``<home>/sources/`` through a temporary folder that is
renamed only when complete, keyed by content (for URLs: the URL plus the remote sizes and ETags or
mtimes), so a second ingest of the same input is free.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import zipfile
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from visionloop.data.synthetic import SyntheticSpec, generate
from visionloop.errors import DataError
from visionloop.fsutil import atomic_dir, atomic_write_json, sha256_file

MAX_EXTRACTED_BYTES = 20 * 1024**3  # refuse archives that would unpack to more than this
_IGNORED = {"__MACOSX", ".DS_Store", "Thumbs.db"}


class IngestResult(BaseModel):
    """What ingest hands on (a pydantic model, as every step output is: one serialiser for all)."""

    model_config = ConfigDict(frozen=True)

    root: Path  # folder whose sub-folders are the classes
    source: str  # what the user asked for
    kind: str  # digits | synthetic | folder | archive | url
    hflip_ok: bool  # may augmentation mirror these images?
    classes: list[str]
    num_files: int

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict) -> IngestResult:
        return cls.model_validate(data)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".") and path.name not in _IGNORED


def find_class_root(root: Path) -> Path:
    """Descend through single wrapper folders (``archive/data/<classes>``) to the class folders."""
    current = root
    for _ in range(8):
        entries = [p for p in current.iterdir() if _visible(p)]
        dirs = [p for p in entries if p.is_dir()]
        files = [p for p in entries if p.is_file()]
        if len(dirs) == 1 and not files and any(p.is_dir() for p in dirs[0].iterdir() if _visible(p)):
            current = dirs[0]
            continue
        return current
    return current


def _describe(root: Path, source: str, kind: str, hflip_ok: bool) -> IngestResult:
    class_root = find_class_root(root)
    classes = sorted(p.name for p in class_root.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise DataError(
            f"no class folders in {source}: expected <root>/<class_name>/<image files>, "
            f"found {'nothing' if not any(class_root.iterdir()) else 'only loose files'}"
        )
    num_files = sum(1 for c in classes for f in (class_root / c).rglob("*") if f.is_file() and _visible(f))
    if num_files == 0:
        raise DataError(f"the class folders in {source} hold no files")
    return IngestResult(
        root=class_root, source=source, kind=kind, hflip_ok=hflip_ok, classes=classes, num_files=num_files
    )


def write_digits(dest: Path) -> int:
    """scikit-learn's digits (16 grey levels, 8x8) as 8-bit greyscale PNGs, one folder per digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        folder = dest / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(folder / f"digit_{index:04d}.png", format="PNG", optimize=False)
    return len(pixels)


def _cached(home: Path, key: str, build: callable) -> Path:  # type: ignore[valid-type]
    """Return ``home/sources/key``, building it through a temporary folder if it is not there."""
    final = home / "sources" / key
    if (final / ".complete").is_file():
        return final
    with atomic_dir(final) as tmp:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
    return final


def _safe_extract(archive: Path, dest: Path) -> None:
    if zipfile.is_zipfile(archive):
        try:
            with zipfile.ZipFile(archive) as zf:
                total = sum(info.file_size for info in zf.infolist())
                if total > MAX_EXTRACTED_BYTES:
                    raise DataError(f"{archive} would unpack to {total} bytes, over the {MAX_EXTRACTED_BYTES} limit")
                for info in zf.infolist():
                    target = (dest / info.filename).resolve()
                    if not target.is_relative_to(dest.resolve()):
                        raise DataError(f"{archive} has an entry outside the archive root: {info.filename!r}")
                zf.extractall(dest)
        # a damaged central directory fails in ZipFile(), damaged deflate data raises zlib.error,
        # an encrypted or unsupported entry raises RuntimeError (NotImplementedError)
        except (zipfile.BadZipFile, zlib.error, RuntimeError, OSError, EOFError) as exc:
            raise DataError(f"{archive} is a damaged or unsupported zip archive: {exc}") from None
        return
    if tarfile.is_tarfile(archive):
        try:
            with tarfile.open(archive) as tf:
                total = sum(m.size for m in tf.getmembers())
                if total > MAX_EXTRACTED_BYTES:
                    raise DataError(f"{archive} would unpack to {total} bytes, over the limit")
                # tarfile stops quietly at a bad header after the first one; a whole archive ends in
                # zero blocks only (reading to the end also checks the gzip/bz2/xz stream's CRC)
                tf.fileobj.seek(tf.offset)
                while block := tf.fileobj.read(1 << 20):
                    if block.strip(b"\0"):
                        raise DataError(f"{archive} is a damaged tar archive: unreadable data after byte {tf.offset}")
                # the 'data' filter refuses absolute paths, '..', links out of the tree and devices
                tf.extractall(dest, filter="data")
        except tarfile.FilterError as exc:
            raise DataError(f"{archive} has an unsafe entry, refused: {exc}") from None
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{archive} is a damaged tar archive: {exc}") from None
        return
    raise DataError(f"{archive} is a file but not a zip or tar(.gz) archive")


def _fingerprint(fs: Any, path: str, is_dir: bool) -> str:
    """Size and version markers of a remote file or of every file under a remote folder."""

    def marker(info: dict) -> str:
        for field in ("ETag", "etag", "md5", "mtime", "LastModified", "last_modified", "updated"):
            if info.get(field):
                return str(info[field])
        return ""

    try:
        infos = fs.find(path, detail=True) if is_dir else {path: fs.info(path)}
    except Exception as exc:
        raise DataError(f"could not list {path}: {type(exc).__name__}: {exc}") from None
    return json.dumps(sorted((name, info.get("size"), marker(info)) for name, info in infos.items()), default=str)


def _fetch_url(url: str, home: Path, timeout: float) -> Path:
    import fsspec

    try:
        # a fresh filesystem each time: fsspec caches instances by arguments, and a cached one would keep
        # an endpoint or credentials from before a change of AWS_ENDPOINT_URL or the like
        options: dict[str, Any] = {"skip_instance_cache": True}
        if url.startswith("http"):
            options["timeout"] = timeout
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise DataError(f"no fsspec driver for {url}: {exc}") from None
    except ValueError as exc:
        raise DataError(f"unsupported URL {url}: {exc}") from None
    try:
        is_dir = fs.isdir(path)
        if not is_dir and not fs.exists(path):
            raise DataError(f"nothing found at {url}")
    except DataError:
        raise
    except Exception as exc:  # network errors come in many types across fsspec drivers
        raise DataError(f"could not reach {url}: {type(exc).__name__}: {exc}") from None
    # the cache key follows the remote content: a changed object (size, mtime, ETag) is fetched again
    key = "url-" + hashlib.sha256((url + _fingerprint(fs, path, is_dir)).encode()).hexdigest()[:16]

    def build(tmp: Path) -> None:
        try:
            if is_dir:
                fs.get(path.rstrip("/") + "/", str(tmp / "data") + "/", recursive=True)
            else:
                local = tmp / ("download" + (".zip" if path.endswith(".zip") else ".archive"))
                fs.get_file(path, str(local))
                _safe_extract(local, tmp / "data")
                local.unlink()
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"could not download {url}: {type(exc).__name__}: {exc}") from None

    return _cached(home, key, build) / "data"


def ingest(
    source: str,
    home: Path,
    synthetic: SyntheticSpec | None = None,
    hflip: bool | None = None,
    timeout: float = 30.0,
) -> IngestResult:
    """Materialise ``source`` as a local class-folder tree and describe it."""
    if not source:
        raise DataError("no data source given")
    if source == "digits":
        root = _cached(home, "digits-v1", write_digits)
        result = _describe(root, source, "digits", hflip_ok=False)
    elif source == "synthetic":
        spec = synthetic or SyntheticSpec()
        key = "synthetic-" + hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:16]
        root = _cached(home, key, lambda tmp: generate(spec, tmp))
        result = _describe(root, source, "synthetic", hflip_ok=True)
    elif "://" in source and not source.startswith("file://"):
        result = _describe(_fetch_url(source, home, timeout), source, "url", hflip_ok=False)
    else:
        local = Path(source.removeprefix("file://")).expanduser()
        if not local.exists():
            raise DataError(f"data source not found: {source}")
        if local.is_dir():
            if not any(_visible(p) for p in local.iterdir()):
                raise DataError(f"data source folder is empty: {source}")
            result = _describe(local.resolve(), source, "folder", hflip_ok=False)
        else:
            key = "archive-" + sha256_file(local)[:16]

            def build(tmp: Path) -> None:
                _safe_extract(local, tmp / "data")

            root = _cached(home, key, build) / "data"
            result = _describe(root, source, "archive", hflip_ok=False)
    if hflip is not None:
        result = result.model_copy(update={"hflip_ok": hflip})
    return result


def save_result(result: IngestResult, path: Path) -> None:
    atomic_write_json(path, result.to_dict())
