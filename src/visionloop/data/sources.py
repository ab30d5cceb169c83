"""Ingest: turn any supported source into a local folder laid out as ``class_name/image_file``.

Sources:
- ``digits``: the 8x8 handwritten digits that scikit-learn ships, written out as real PNG files;
- ``synthetic``: our deterministic generator (see ``synthetic.py``);
- a local folder in the ``class_name/file.ext`` layout (used in place, not copied);
- a ``.zip`` / ``.tar`` / ``.tar.gz`` (``.bz2``, ``.xz``) archive, recognised by its first bytes, not by
  its name, and extracted within the caps of ``archives.py`` (bytes, compression ratio, entries);
- any fsspec URL (``file://``, ``s3://``, ``gs://``, ``http(s)://``): a folder is copied, an archive
  is downloaded and extracted. s3fs ships with visionloop (endpoint and credentials from the usual
  AWS variables, e.g. AWS_ENDPOINT_URL for MinIO); other protocols need their driver (gcsfs, adlfs).
  Bytes are streamed and counted against ``data.max_download_mb``, with a per-read timeout.

Only regular files and folders are sources: a device or fifo (``/dev/zero``) would be read for ever.

Everything fetched or generated lands under ``<home>/sources/`` through a temporary folder that is
renamed only when complete, keyed by content (for URLs: the URL plus the remote sizes and ETags or
mtimes), so a second ingest of the same input is free.
"""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from visionloop.config import DataSettings
from visionloop.data.archives import CHUNK, MIB, ExtractLimits, extract, require_archive
from visionloop.data.synthetic import SyntheticSpec, generate
from visionloop.errors import DataError
from visionloop.fsutil import atomic_dir, atomic_write_json, printable_name, sha256_file, utf8_name

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
    if not root.is_dir():  # a cache entry from a version that cached an empty archive
        raise DataError(f"{source} holds no files: expected <root>/<class_name>/<image files>")
    class_root = find_class_root(root)
    # a class name becomes a label in the model, its metadata and every JSON answer: it must be text
    classes = sorted(p.name for p in class_root.iterdir() if p.is_dir() and _visible(p) and utf8_name(p.name))
    if not classes:
        raise DataError(
            f"no class folders in {source}: expected <root>/<class_name>/<image files>, "
            f"found {'nothing' if not any(class_root.iterdir()) else 'only loose files'}"
        )
    num_files = sum(
        1 for c in classes for f in (class_root / c).rglob("*") if f.is_file() and _visible(f) and utf8_name(f.name)
    )
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


def _listing(fs: Any, path: str, is_dir: bool) -> dict[str, dict]:
    """Every remote file to fetch (one, or every file under a folder) with what the store says of it."""
    try:
        infos = fs.find(path, detail=True) if is_dir else {path: fs.info(path)}
    except Exception as exc:
        raise DataError(f"could not list {path}: {type(exc).__name__}: {exc}") from None
    return {name: info for name, info in infos.items() if not name.endswith("/")}  # not folder markers


def _fingerprint(infos: dict[str, dict]) -> str:
    """Size and version markers of the remote files: a changed object is fetched again."""

    def marker(info: dict) -> str:
        for field in ("ETag", "etag", "md5", "mtime", "LastModified", "last_modified", "updated"):
            if info.get(field):
                return str(info[field])
        return ""

    return json.dumps(sorted((name, info.get("size"), marker(info)) for name, info in infos.items()), default=str)


def _is_http_listing(fs: Any, path: str) -> bool:
    """Whether an http(s) URL is a folder listing (an HTML index page of links) rather than a file.

    fsspec's own ``isdir`` reads the whole body into memory to look for links, so it is asked only
    when the server says (HEAD) the URL is an HTML page: an archive, or a hostile endless stream with
    no Content-Type, is treated as a file and streamed under ``data.max_download_mb``.
    """
    import aiohttp

    try:
        info = fs.info(path)
    except FileNotFoundError as exc:
        if exc.__cause__ is None or isinstance(exc.__cause__, aiohttp.ClientResponseError):
            return False  # an HTTP error status (404 …): the caller says nothing is there
        raise exc.__cause__ from None  # unreachable, timed out: the caller says it could not reach it
    return info.get("mimetype") == "text/html" and bool(fs.isdir(path))


class _DownloadCap:
    """Counts the bytes of one remote source and refuses past ``data.max_download_mb``."""

    def __init__(self, url: str, limits: DataSettings) -> None:
        self.url = url
        self.mib = limits.max_download_mb
        self.limit = int(limits.max_download_mb * MIB)
        self.received = 0

    def declared(self, infos: dict[str, dict]) -> None:
        # a size the server states is checked before anything is fetched; many servers state none
        total = sum(int(info["size"]) for info in infos.values() if isinstance(info.get("size"), int))
        if total > self.limit:
            raise DataError(
                f"{self.url} is {total} bytes, over the {self.mib:g} MiB download limit (data.max_download_mb): "
                "nothing downloaded"
            )

    def copy(self, source: Any, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as out:
            while block := source.read(CHUNK):
                self.received += len(block)
                if self.received > self.limit:
                    raise DataError(
                        f"{self.url} sent more than {self.mib:g} MiB (data.max_download_mb): refused, "
                        "and the partial download is removed"
                    )
                out.write(block)


def _fetch_url(url: str, home: Path, limits: DataSettings, timeout: float) -> Path:
    import fsspec

    http = url.startswith("http")
    try:
        # a fresh filesystem each time: fsspec caches instances by arguments, and a cached one would keep
        # an endpoint or credentials from before a change of AWS_ENDPOINT_URL or the like
        options: dict[str, Any] = {"skip_instance_cache": True}
        if http:
            options["timeout"] = timeout  # a whole-request limit for the small probes (exists, info)
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise DataError(f"no fsspec driver for {url}: {exc}") from None
    except ValueError as exc:
        raise DataError(f"unsupported URL {url}: {exc}") from None
    try:
        is_dir = _is_http_listing(fs, path) if http else fs.isdir(path)
        if not is_dir and not fs.exists(path):
            raise DataError(f"nothing found at {url}")
    except DataError:
        raise
    except Exception as exc:  # network errors come in many types across fsspec drivers
        raise DataError(f"could not reach {url}: {type(exc).__name__}: {exc}") from None
    infos = _listing(fs, path, is_dir)
    cap = _DownloadCap(url, limits)
    cap.declared(infos)
    # the cache key follows the remote content: a changed object (size, mtime, ETag) is fetched again
    key = "url-" + hashlib.sha256((url + _fingerprint(infos)).encode()).hexdigest()[:16]
    reader = fs
    if http:
        import aiohttp

        # the body through a second filesystem whose session has a per-read timeout, not a whole-request
        # one: a slow but steady download of a large dataset is fine, a server that stops sending is not
        timeouts = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        reader, _ = fsspec.core.url_to_fs(url, skip_instance_cache=True, client_kwargs={"timeout": timeouts})
    open_options: dict[str, Any] = {"block_size": 0} if http else {}  # 0: one streamed GET, no range requests

    def build(tmp: Path) -> None:
        try:
            if is_dir:
                base = path.rstrip("/")
                for name in sorted(infos):
                    relative = name[len(base) :].lstrip("/")
                    if not relative or ".." in Path(relative).parts or Path(relative).is_absolute():
                        raise DataError(f"{url} lists a file outside the folder: {name!r}")
                    with reader.open(name, "rb", **open_options) as source:
                        cap.copy(source, tmp / "data" / relative)
            else:
                local = tmp / "download"
                with reader.open(path, "rb", **open_options) as source:
                    cap.copy(source, local)
                extract(local, tmp / "data", ExtractLimits.from_settings(limits), name=url)
                local.unlink()
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"could not download {url}: {type(exc).__name__}: {exc}") from None

    return _cached(home, key, build) / "data"


def _local_archive(local: Path, source: str, home: Path, limits: DataSettings) -> Path:
    """Extract a local archive into the cache, keyed by its content."""
    mode = local.stat().st_mode
    if not stat.S_ISREG(mode):
        # /dev/zero, a fifo or a socket would be read for ever
        raise DataError(f"{source} is not a regular file (a device, fifo or socket): give a folder or an archive")
    if local.stat().st_size == 0:
        raise DataError(f"{source} is an empty file, not an archive or image folder")
    require_archive(local)  # from its first bytes, before the whole file is hashed for the cache key
    key = "archive-" + sha256_file(local)[:16]
    extract_limits = ExtractLimits.from_settings(limits)
    return _cached(home, key, lambda tmp: extract(local, tmp / "data", extract_limits, name=str(local))) / "data"


def ingest(
    source: str,
    home: Path,
    synthetic: SyntheticSpec | None = None,
    hflip: bool | None = None,
    timeout: float | None = None,
    limits: DataSettings | None = None,
) -> IngestResult:
    """Materialise ``source`` as a local class-folder tree and describe it.

    ``limits`` carries the ingest caps (``data.max_download_mb``, ``data.max_extract_mb``, …; their
    defaults when omitted); ``timeout`` overrides ``data.download_timeout_seconds``.
    """
    limits = limits or DataSettings()
    timeout = limits.download_timeout_seconds if timeout is None else timeout
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
        result = _describe(_fetch_url(source, home, limits, timeout), source, "url", hflip_ok=False)
    else:
        local = Path(source.removeprefix("file://")).expanduser()
        if not local.exists():
            raise DataError(f"data source not found: {source}")
        if local.is_dir():
            if not utf8_name(str(local.resolve())):
                # a folder is used in place: its path goes into every report, step output and log as text
                raise DataError(
                    f"the path of data source {printable_name(source)} is not valid UTF-8: rename the folder"
                )
            if not any(_visible(p) for p in local.iterdir()):
                raise DataError(f"data source folder is empty: {source}")
            result = _describe(local.resolve(), source, "folder", hflip_ok=False)
        else:
            result = _describe(_local_archive(local, source, home, limits), source, "archive", hflip_ok=False)
    if hflip is not None:
        result = result.model_copy(update={"hflip_ok": hflip})
    return result


def save_result(result: IngestResult, path: Path) -> None:
    atomic_write_json(path, result.to_dict())
