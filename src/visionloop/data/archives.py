"""Unpack a dataset archive without trusting it: caps counted while the bytes come out.

An archive's own header can lie about sizes, and a 1 MB zip can hold a gigabyte of zeros, so the
limits are enforced on what is actually decompressed, chunk by chunk, not on what the archive
declares (the declared sizes are checked too, but only as an early, cheap refusal):

- ``data.max_extract_mb``: total bytes unpacked;
- ``data.max_compression_ratio``: bytes unpacked per byte of archive (past the first MiB, so a tiny
  archive of a few flat images is not refused for compressing well);
- ``data.max_archive_members``: entries, files and folders together.

Only regular files and folders come out: symbolic and hard links, devices and fifos are refused,
as are names that would land outside the destination. The archive type is told from its first
bytes (magic numbers), never by a probe that reads the whole file: ``tarfile.is_tarfile`` tries every
compression in turn and spends most of a minute inside the xz decoder on 256 MiB of zeros.

The caller extracts into a temporary folder (``fsutil.atomic_dir``), so a refusal leaves nothing
half-written behind.
"""

from __future__ import annotations

import lzma
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from visionloop.config import DataSettings
from visionloop.errors import DataError

MIB = 1 << 20
CHUNK = MIB  # bytes copied per read: the most an archive can get past a cap before it is refused
RATIO_FLOOR_BYTES = MIB  # below this much output the compression ratio is not judged
_TAR_RECORD = 10240  # tar's default record: an empty archive made by tar(1) is this many zero bytes

# the tar compressions tarfile reads, by the magic number at the start of the file
_MAGIC = (
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),  # an empty zip is only its end-of-central-directory record
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)
_TAR_MODES = {"tar": "r:", "gzip": "r:gz", "bzip2": "r:bz2", "xz": "r:xz"}


@dataclass(frozen=True)
class ExtractLimits:
    max_bytes: int
    max_ratio: float
    max_members: int

    @classmethod
    def from_settings(cls, data: DataSettings) -> ExtractLimits:
        return cls(int(data.max_extract_mb * MIB), data.max_compression_ratio, data.max_archive_members)


def archive_kind(path: Path) -> str | None:
    """'zip', 'tar', 'gzip', 'bzip2' or 'xz' from the file's first bytes; None when it is none of them."""
    with path.open("rb") as fh:
        head = fh.read(512)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[257:262] == b"ustar":  # POSIX and GNU tar headers both carry it
        return "tar"
    size = path.stat().st_size
    # an empty tar is nothing but zero blocks: told apart from any zero-filled file by its size
    if 0 < size <= _TAR_RECORD and size % 512 == 0 and not path.read_bytes().strip(b"\0"):
        return "tar"
    return None


def require_archive(path: Path, name: str | None = None) -> str:
    """The archive kind of ``path`` (see ``archive_kind``), or a DataError saying it is none."""
    kind = archive_kind(path)
    if kind is None:
        raise DataError(
            f"{name or path} is a file but not a zip or tar(.gz/.bz2/.xz) archive, nor an image folder: "
            "expected a folder of class_name/image files or an archive of one"
        )
    return kind


class _Budget:
    """Counts the bytes that come out of one archive and refuses past either cap."""

    def __init__(self, archive: Path, limits: ExtractLimits, name: str) -> None:
        self.archive = name
        self.limits = limits
        self.archive_bytes = max(archive.stat().st_size, 1)
        self.unpacked = 0

    def _check(self, total: int, verb: str) -> None:
        if total > self.limits.max_bytes:
            raise DataError(
                f"{self.archive} {verb} more than {self.limits.max_bytes / MIB:g} MiB "
                "(data.max_extract_mb): refused, and what was extracted is removed"
            )
        if total > RATIO_FLOOR_BYTES and total > self.limits.max_ratio * self.archive_bytes:
            raise DataError(
                f"{self.archive} {verb} more than {self.limits.max_ratio:g} times its own size of "
                f"{self.archive_bytes} bytes (data.max_compression_ratio; a zip bomb?): refused, "
                "and what was extracted is removed"
            )

    def declared(self, total: int) -> None:
        """An early refusal from the sizes the archive states, before anything is written."""
        self._check(total, "declares")

    def take(self, count: int) -> None:
        self.unpacked += count
        self._check(self.unpacked, "unpacks to")

    def members(self, count: int) -> None:
        if count > self.limits.max_members:
            raise DataError(
                f"{self.archive} has more than {self.limits.max_members} entries (data.max_archive_members): refused"
            )


def _target(dest: Path, name: str, label: str, is_dir: bool = False) -> Path:
    """Where entry ``name`` goes; refuses names that resolve outside ``dest`` (``..``, absolute paths).

    The root itself is a valid name only for a folder: ``tar -cf x.tar .`` starts with the entry ``.``.
    """
    root = dest.resolve()
    target = (root / name).resolve()
    if not target.is_relative_to(root) or (target == root and not is_dir):
        raise DataError(f"{label} has an entry outside the archive root: {name!r}")
    return target


def _copy(source: BinaryIO, target: Path, budget: _Budget) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        while block := source.read(CHUNK):
            budget.take(len(block))  # before the write: the refused chunk never reaches the disk
            out.write(block)


def _special(what: str, name: str, label: str) -> DataError:
    return DataError(f"{label} has a {what} entry {name!r}: refused, only regular files and folders are extracted")


def _extract_zip(archive: Path, dest: Path, budget: _Budget, label: str) -> int:
    files = 0
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        budget.members(len(infos))
        # zipfile stops each entry at its declared size (a longer one then fails its CRC), so for a zip
        # the declared total already bounds what can come out: a bomb is refused before a byte is written
        budget.declared(sum(info.file_size for info in infos))
        for info in infos:
            target = _target(dest, info.filename, label, is_dir=info.is_dir())
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            # the Unix file type, when a Unix zip wrote one (many tools store permission bits only)
            kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
            if kind and kind != stat.S_IFREG:
                what = "symbolic link" if kind == stat.S_IFLNK else "special file"
                raise _special(what, info.filename, label)
            with zf.open(info) as source:  # checks the CRC when the entry is read to its end
                _copy(source, target, budget)
            files += 1
    return files


def _extract_tar(archive: Path, dest: Path, budget: _Budget, kind: str, label: str) -> int:
    files = 0
    with tarfile.open(archive, _TAR_MODES[kind]) as tf:
        # members are read one header at a time, so a bomb is refused before the rest is decompressed
        for count, member in enumerate(tf, start=1):
            budget.members(count)
            try:
                # the 'data' filter refuses absolute paths, '..', links out of the tree and devices
                member = tarfile.data_filter(member, str(dest))
            except tarfile.FilterError as exc:
                raise DataError(f"{label} has an unsafe entry, refused: {exc}") from None
            target = _target(dest, member.name, label, is_dir=member.isdir())
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isreg():
                source = tf.extractfile(member)
                if source is None:  # cannot happen for a regular member; typed as Optional
                    raise _special("unreadable", member.name, label)
                with source:
                    _copy(source, target, budget)
                files += 1
            else:
                what = "symbolic link" if member.issym() else "hard link" if member.islnk() else "special file"
                raise _special(what, member.name, label)
        # tarfile stops quietly at a bad header after the first one; a whole archive ends in zero
        # blocks only (reading to the end also checks the gzip/bz2/xz stream's CRC); counted, so
        # a gigabyte of compressed zeros after the end is refused as well
        tf.fileobj.seek(tf.offset)
        while block := tf.fileobj.read(CHUNK):
            budget.take(len(block))
            if block.strip(b"\0"):
                raise DataError(f"{label} is a damaged tar archive: unreadable data after byte {tf.offset}")
    return files


def extract(archive: Path, dest: Path, limits: ExtractLimits, name: str | None = None) -> None:
    """Unpack ``archive`` (zip, tar, tar.gz/.bz2/.xz) into ``dest`` within ``limits``, or raise DataError.

    ``name`` is what the messages call the archive (the URL of a download); its path by default.
    """
    name = name or str(archive)
    kind = require_archive(archive, name)
    dest.mkdir(parents=True, exist_ok=True)
    budget = _Budget(archive, limits, name)
    if kind == "zip":
        try:
            files = _extract_zip(archive, dest, budget, label=name)
        # a damaged central directory fails in ZipFile(), damaged deflate data raises zlib.error,
        # an encrypted or unsupported entry raises RuntimeError (NotImplementedError)
        except (zipfile.BadZipFile, zlib.error, RuntimeError, OSError, EOFError) as exc:
            raise DataError(f"{name} is a damaged or unsupported zip archive: {exc}") from None
    else:
        try:
            files = _extract_tar(archive, dest, budget, kind, label=name)
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise DataError(f"{name} is a damaged tar archive: {exc}") from None
    if files == 0:
        raise DataError(f"archive {name} holds no files: expected class_name/image files inside it")
