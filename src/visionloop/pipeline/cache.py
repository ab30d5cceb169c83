"""Step caching for the local runner: a step whose inputs, parameters and code are unchanged is skipped.

Each cached step has a key: a hash of the step's name, the code version (a hash of every source
file of the visionloop package, so any code change invalidates every step), and the step's inputs
and parameters as the runner names them (the previous step's key, the settings the step reads, a
fingerprint of the ingested files). An entry ``<home>/cache/steps/<step>-<key>.json`` holds the
step's output, as ``<home>/latest/<step>.json`` does, plus the SHA-256 of every file the output
points at. On a hit every one of those files is hashed again: a missing or changed file (a
corrupted dataset, a truncated model) makes the entry invalid, a changed file is removed, and the
step runs again.

This is what Kubeflow Pipelines' own caching does (a key of component spec + inputs), made to work
on one machine without a metadata store.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionloop import __version__
from visionloop.fsutil import atomic_write_json, read_json, sha256_file

log = logging.getLogger("visionloop.cache")


@functools.cache
def code_version() -> str:
    """Hash of every .py file of the installed visionloop package, plus its version."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def folder_fingerprint(root: Path) -> str:
    """Cheap identity of a folder of files: every relative path with its size and modification time.

    Paths are hashed as the bytes the file system holds (``os.fsencode``): a name that is not valid
    UTF-8 is still part of the folder's identity, and must not stop the run with a UnicodeEncodeError.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(os.fsencode(path.relative_to(root)))
        digest.update(f"\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


@dataclass
class Hit:
    output: dict[str, Any]  # the step's output as JSON, as steps.record writes it


class StepCache:
    def __init__(self, home: Path, enabled: bool = True) -> None:
        self.root = home / "cache" / "steps"
        self.enabled = enabled

    def key(self, step: str, *inputs: Any) -> str:
        blob = json.dumps([step, code_version(), inputs], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _entry(self, step: str, key: str) -> Path:
        return self.root / f"{step}-{key}.json"

    def lookup(self, step: str, key: str) -> Hit | None:
        """The cached output of ``step`` under ``key``, if its entry exists and every file it names is intact."""
        if not self.enabled:
            return None
        entry = self._entry(step, key)
        if not entry.is_file():
            return None
        try:
            data = read_json(entry)
            files: dict[str, str] = data["files"]
            for name, expected in files.items():
                path = Path(name)
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is missing")
                if sha256_file(path) != expected:
                    # removed, so that the step cannot reuse it either (preprocess reuses a dataset it finds)
                    path.unlink()
                    raise ValueError(f"{path} changed since it was cached; removed")
        except Exception as exc:  # a broken entry or a broken output: run the step again
            log.warning("cached %s output is not usable (%s); running the step again", step, exc)
            entry.unlink(missing_ok=True)
            return None
        return Hit(data["output"])

    def store(self, step: str, key: str, output: dict[str, Any], files: Iterable[Path]) -> None:
        entry = {"step": step, "key": key, "output": output, "files": {str(p): sha256_file(p) for p in files}}
        atomic_write_json(self._entry(step, key), entry)
