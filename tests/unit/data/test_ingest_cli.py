"""``visionloop data ingest`` / ``run --to validate`` on hostile sources: one ``error:`` line, a non-zero exit,
no traceback, nothing left under the home. In-process (``visionloop.cli.main`` with its own argv), so each
case costs the ingest, not a Python start."""

from __future__ import annotations

import os
import signal
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from visionloop.cli import main


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["visionloop", *args])
    previous = signal.getsignal(signal.SIGTERM)  # main() installs its own SIGTERM handler
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    out, err = capsys.readouterr()
    return code, out, err


def _zip_bomb(path: Path) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf, zf.open("a/bomb.bmp", "w") as out:
        for _ in range(8):
            out.write(bytes(1 << 20))


def _empty_tar_gz(path: Path) -> None:
    tarfile.open(path, "w:gz").close()


def _latin1_folder(path: Path) -> None:
    """A class folder tree whose own path is not valid UTF-8; ``path`` becomes a link to it (a text name)."""
    real = Path(os.fsdecode(os.fsencode(path.parent) + b"/caf\xe9"))
    for label in ("a", "b"):
        (real / label).mkdir(parents=True)
        (real / label / "x.png").write_bytes(b"not read")
    path.symlink_to(real)


BAD_SOURCES: dict[str, tuple[Callable[[Path], object] | None, str]] = {
    "bomb.zip": (_zip_bomb, "times its own size"),
    "empty.tar.gz": (_empty_tar_gz, "holds no files"),
    "empty.zip": (lambda p: zipfile.ZipFile(p, "w").close(), "holds no files"),
    "zeros.bin": (lambda p: p.write_bytes(bytes(1 << 20)), "not a zip or tar"),
    "/dev/zero": (None, "not a regular file"),
    "folder-named-in-latin-1": (lambda p: _latin1_folder(p), "is not valid UTF-8"),
}


@pytest.mark.parametrize("name", list(BAD_SOURCES))
@pytest.mark.parametrize("command", [("data", "ingest"), ("run", "--to", "validate")])
def test_bad_source_is_one_error_line_and_a_non_zero_exit(tmp_path, monkeypatch, capsys, name, command):
    for variable in [v for v in os.environ if v.startswith("VISIONLOOP_")]:
        monkeypatch.delenv(variable)
    monkeypatch.chdir(tmp_path)
    make, problem = BAD_SOURCES[name]
    source = Path(name) if make is None else tmp_path / name
    if make is not None:
        make(source)
    home = tmp_path / "home"
    code, _out, err = run_cli(
        monkeypatch,
        capsys,
        "--home",
        str(home),
        *command,
        "--source",
        str(source),
        *(("--set", "data.max_compression_ratio=4") if name == "bomb.zip" else ()),
    )
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert problem in lines[0]
    sources = home / "sources"
    assert not sources.exists() or list(sources.iterdir()) == []


def test_run_to_validate_on_a_folder_with_names_that_are_not_utf8(
    tmp_path, monkeypatch, capsys, make_image_folder, write_png
):
    for variable in [v for v in os.environ if v.startswith("VISIONLOOP_")]:
        monkeypatch.delenv(variable)
    monkeypatch.chdir(tmp_path)
    root = make_image_folder(classes=("a", "b"), per_class=20, size=8)
    write_png(Path(os.fsdecode(os.fsencode(root / "a") + b"/\xff.png")), size=8, seed=5)
    write_png(Path(os.fsdecode(os.fsencode(root) + b"/\xfe/x.png")), size=8, seed=6)
    home = tmp_path / "home"
    code, _out, err = run_cli(
        monkeypatch, capsys, "--home", str(home), "run", "--to", "validate", "--source", str(root)
    )
    assert code == 0, err
    assert "Traceback" not in err
    report = next((home / "reports").glob("*/report.md")).read_text(encoding="utf-8")
    assert "`a/\\xff.png`: name is not valid UTF-8" in report
