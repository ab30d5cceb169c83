"""The prediction store's spool: rows the database could not take, kept on local disk until it can.

Why it exists: a server is stopped (SIGTERM in a rolling deploy) or its queue fills while the database is
down or slow. Rows that only live in memory are then lost, and with them the monitoring, live accuracy and
retraining that read them. The writer hands such rows here instead, and replays them once the store
answers again: the same server on its next start, or any replica that shares the spool folder.

The format, chosen so a crash costs at most the record being written:

- append-only files, one at a time per writer process, ``<pid>@<host>@<token>-<n>.open`` while written
  (``token`` is random per process, so a restarted container that got the same pid never mistakes an old
  file for its own), renamed to ``.spool`` (sealed) when the writer closes it or it passes
  ``FILE_MAX_BYTES``; only sealed files, and open files whose writer is gone, are replayed;
- each record is ``MAGIC | length (u32) | CRC-32 (u32) | payload`` and every append is fsync'd, so a torn
  or corrupt record (a crash mid-write, a bad sector) fails its length or CRC and is skipped, not fatal:
  reading resumes at the next ``MAGIC``;
- a replayer claims a file by renaming it to ``<name>.replaying@<pid>@<host>`` (``rename`` is atomic, so two
  replicas never replay the same file at once), touches it while it works, and deletes it only after every
  row in it is committed. A claim whose process is gone (same host: its pid is dead; another host: the file
  was not touched for ``stale_seconds``) is claimed again. Replay is idempotent on ``request_id``, so a file
  replayed twice after a crash doubles nothing;
- the folder (all writers together) holds at most ``max_bytes``; rows past it are refused and counted by
  the caller (``spool_full``).

The payload is JSON (vectors as base64 float32, kept image bytes as base64): nothing in a spool file is
ever executed on load, even if someone else can write to the folder.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visionloop.monitoring.tables import Prediction

log = logging.getLogger("visionloop.store")

MAGIC = b"VLS1"
HEADER = struct.Struct("<4sII")  # magic, payload length, CRC-32 of the payload
MAX_RECORD = 256 * 2**20  # a length past this is a corrupt header, not a record
FILE_MAX_BYTES = 32 * 2**20  # a writer starts a new file past this: replay reads one file at a time, whole
OPEN, SEALED, CLAIM = ".open", ".spool", ".replaying@"
_ARRAYS = ("probabilities", "embedding", "channel_means")


# ------------------------------------------------------------------------------------------- records
def encode(kind: str, value: Prediction | dict[str, Any]) -> bytes:
    """One framed record: a prediction (with its image bytes, if kept) or a ``models`` row."""
    if isinstance(value, Prediction):
        body: dict[str, Any] = {}
        for name, field_value in value.__dict__.items():
            if name in _ARRAYS:
                body[name] = base64.b64encode(np.ascontiguousarray(field_value, "<f4").tobytes()).decode()
            elif name == "image":
                body[name] = None if field_value is None else base64.b64encode(field_value).decode()
            elif isinstance(field_value, np.generic):
                body[name] = field_value.item()
            else:
                body[name] = field_value
    else:
        body = dict(value)
    payload = json.dumps({"kind": kind, "row": body}, separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode(payload: bytes) -> tuple[str, Prediction | dict[str, Any]]:
    """The (kind, value) ``encode`` wrote."""
    record = json.loads(payload)
    kind, body = record["kind"], record["row"]
    if kind != "prediction":
        return kind, body
    for name in _ARRAYS:
        body[name] = np.frombuffer(base64.b64decode(body[name]), dtype="<f4").astype(np.float32)
    if body.get("image") is not None:
        body["image"] = base64.b64decode(body["image"])
    return kind, Prediction(**body)


def read_records(data: bytes) -> tuple[list[bytes], int]:
    """The intact payloads in ``data``, and how many bytes were skipped (torn or corrupt records)."""
    payloads: list[bytes] = []
    skipped, pos, end = 0, 0, len(data)
    while pos < end:
        if end - pos >= HEADER.size:
            magic, length, crc = HEADER.unpack_from(data, pos)
            start = pos + HEADER.size
            if magic == MAGIC and length <= MAX_RECORD and start + length <= end:
                payload = data[start : start + length]
                if zlib.crc32(payload) == crc:
                    payloads.append(payload)
                    pos = start + length
                    continue
        following = data.find(MAGIC, pos + 1)  # resynchronise at the next record, if any
        following = end if following < 0 else following
        skipped += following - pos
        pos = following
    return payloads, skipped


# ------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class SpoolName:
    """What a spool file's name says: whose it is, whether it is sealed, and who claimed it.

    ``<pid>@<host>@<token>-<n>.open|.spool`` then, once claimed, ``.replaying@<pid>@<host>@<token>``."""

    pid: int
    host: str
    tag: str  # <token>-<n>: the writer's random process token and its file number
    state: str  # OPEN or SEALED
    claim: tuple[int, str, str] | None = None  # (pid, host, token) of the replayer

    @classmethod
    def parse(cls, name: str) -> SpoolName | None:
        base, _, claimed = name.partition(CLAIM)
        for state in (OPEN, SEALED):
            if base.endswith(state):
                break
        else:
            return None
        parts = base[: -len(state)].split("@")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        claim = None
        if claimed:
            cparts = claimed.split("@")
            if len(cparts) != 3 or not cparts[0].isdigit():
                return None
            claim = (int(cparts[0]), cparts[1], cparts[2])
        return cls(int(parts[0]), parts[1], parts[2], state, claim)

    @property
    def token(self) -> str:
        return self.tag.split("-")[0]

    @property
    def sealed(self) -> str:
        """The file's name once given back, unclaimed and sealed."""
        return f"{self.pid}@{self.host}@{self.tag}{SEALED}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # claimed or deleted by another replica meanwhile
        return 0.0


def _fsync_dir(path: Path) -> None:
    """Make a create/rename/unlink in ``path`` durable (the file's own fsync does not cover its name)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class Claimed:
    """A spool file this process is replaying: its rows, read whole, and where it lies now."""

    path: Path
    name: SpoolName
    records: list[tuple[str, Prediction | dict[str, Any]]]
    skipped_bytes: int


class Spool:
    """The spool folder of one store, as one writer process sees it: its own file, and the others to replay."""

    def __init__(self, directory: Path, max_bytes: int, stale_seconds: float = 600.0) -> None:
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.stale_seconds = stale_seconds
        self.pid = os.getpid()
        self.host = socket.gethostname().replace("@", "_").replace("/", "_")
        self.token = secrets.token_hex(4)
        self.rows = 0  # rows in this process's own spool files (written, not yet replayed)
        self._fd: int | None = None
        self._path: Path | None = None
        self._lock = threading.Lock()  # the writer thread and close() may both spool at shutdown
        self._full_logged_at = 0.0
        self._seq = 0

    # -------------------------------------------------------------------------------- writing
    def used_bytes(self) -> int:
        """Bytes in the folder now, every writer's files together (what the cap counts)."""
        total = 0
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    try:
                        total += entry.stat().st_size
                    except OSError:
                        continue
        except FileNotFoundError:
            return 0
        return total

    def append(self, records: list[tuple[str, Prediction | dict[str, Any]]]) -> tuple[int, int]:
        """Append and fsync records; returns (predictions spooled, predictions refused because the spool is full).

        Models rows are tiny and always go first (a stored prediction needs its version's classes).
        An ``OSError`` (disk full, folder not writable) is raised: the caller counts those rows as lost."""
        if not records:
            return 0, 0
        with self._lock:
            free = self.max_bytes - self.used_bytes()
            chunks: list[bytes] = []
            spooled = refused = 0
            for kind, value in records:
                try:
                    data = encode(kind, value)
                except (TypeError, ValueError) as exc:  # a value that is not what its field says: this row only
                    log.error("prediction spool: a %s row cannot be spooled: %s", kind, exc)
                    refused += kind == "prediction"
                    continue
                if kind == "prediction" and len(data) > free:
                    refused += 1
                    continue
                free -= len(data)
                chunks.append(data)
                spooled += kind == "prediction"
            if chunks:
                fd = self._open()
                data = memoryview(b"".join(chunks))
                while data:  # a regular file takes it all at once, but os.write may legally write less
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
                self.rows += spooled
            if refused and time.monotonic() - self._full_logged_at > 60:
                self._full_logged_at = time.monotonic()
                log.error(
                    "prediction spool %s is full (monitor.spool_max_mb = %.0f MiB): %d predictions dropped; "
                    "this message repeats at most once a minute",
                    self.directory, self.max_bytes / 2**20, refused,
                )  # fmt: skip
            return spooled, refused

    def _open(self) -> int:
        if self._fd is not None and self._path is not None and self._path.exists():
            if os.fstat(self._fd).st_size < FILE_MAX_BYTES:
                return self._fd
            self._seal_locked()  # full enough: a replayer reads a whole file into memory, so files stay small
        self._close_fd()  # our file was claimed away (an operator moved it): start a new one
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        self._path = self.directory / f"{self.pid}@{self.host}@{self.token}-{self._seq}{OPEN}"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fsync_dir(self.directory)
        return self._fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._path = None, None

    def seal(self) -> None:
        """Close this process's file and mark it sealed: from now on any replica may replay it."""
        with self._lock:
            self._seal_locked()

    def _seal_locked(self) -> None:
        path = self._path
        self._close_fd()
        if path is not None and path.exists():
            path.rename(path.with_name(path.name[: -len(OPEN)] + SEALED))
            _fsync_dir(self.directory)

    # -------------------------------------------------------------------------------- replaying
    def _abandoned(self, path: Path, name: SpoolName) -> bool:
        """True when nobody works on this file: sealed and unclaimed, or its holder (claimer, else writer) is gone."""
        if name.claim is None and name.state == SEALED:
            return True
        pid, host, token = name.claim or (name.pid, name.host, name.token)
        if token == self.token:
            return False  # ours: our open file is sealed before we replay it; our claim is in progress
        if host == self.host:  # same machine (or pod): ask the kernel; our own pid is an earlier incarnation's
            return pid == self.pid or not _pid_alive(pid)
        try:  # another host's: judged by age (the holder touches it while it works)
            return time.time() - path.stat().st_mtime > self.stale_seconds
        except FileNotFoundError:
            return False

    def pending(self) -> Iterator[tuple[Path, SpoolName]]:
        """Files that may be claimed now (sealed, or held by a process that is gone), oldest first."""
        try:
            paths = sorted(self.directory.iterdir(), key=_mtime)
        except FileNotFoundError:
            return
        for path in paths:
            name = SpoolName.parse(path.name)
            if name is not None and self._abandoned(path, name):
                yield path, name

    def claim(self) -> Claimed | None:
        """Claim one file to replay (atomic rename), read it whole; None when nothing is waiting."""
        for path, name in self.pending():
            target = self.directory / f"{name.sealed}{CLAIM}{self.pid}@{self.host}@{self.token}"
            try:
                path.rename(target)
                os.utime(target)  # a fresh claim: other hosts see it is being worked on
            except FileNotFoundError:
                continue  # another replica claimed it first
            payloads, skipped = read_records(target.read_bytes())
            records = []
            for payload in payloads:
                try:
                    records.append(decode(payload))
                except Exception as exc:  # a record that frames but does not decode: skip it, keep the rest
                    skipped += len(payload)
                    log.error("prediction spool %s: a record cannot be read: %s", target.name, exc)
            if skipped:
                log.warning("prediction spool %s: skipped %d bytes of torn or corrupt records", target.name, skipped)
            claimed = Claimed(target, SpoolName.parse(target.name) or name, records, skipped)
            if name.token == self.token:
                self.rows -= sum(kind == "prediction" for kind, _ in records)
                self.rows = max(self.rows, 0)
            return claimed
        return None

    def touch(self, claimed: Claimed) -> None:
        """Still working on it (other hosts judge a claim stale by its age)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(claimed.path)

    def release(self, claimed: Claimed) -> None:
        """Give a claim back unfinished (the store went away again, or we are stopping): the whole file, since
        replay is idempotent, so the rows it holds count as ours again if it was ours."""
        if claimed.name.token == self.token:
            self.rows += sum(kind == "prediction" for kind, _ in claimed.records)
        with contextlib.suppress(FileNotFoundError):
            claimed.path.rename(self.directory / claimed.name.sealed)
            _fsync_dir(self.directory)

    def done(self, claimed: Claimed) -> None:
        """Every row of a claimed file is committed: delete it."""
        with contextlib.suppress(FileNotFoundError):
            claimed.path.unlink()
            _fsync_dir(self.directory)
