"""Ingest limits on hostile sources: zip bombs, endless downloads, special files, empty archives.

Every source here is real (files on disk, a real HTTP server on 127.0.0.1); the caps are set small in
the settings so that the data stays small: a bomb of a few MiB stands in for one of a gigabyte.
"""

from __future__ import annotations

import http.server
import io
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from visionloop.config import DataSettings
from visionloop.data.sources import ingest
from visionloop.errors import DataError

BOMB_BYTES = 32 << 20  # 32 MiB of zeros deflate to about 32 KiB: a ratio near 1000


def assert_nothing_cached(home: Path) -> None:
    """A refused ingest leaves neither a final folder nor a temporary one under <home>/sources."""
    sources = home / "sources"
    assert not sources.exists() or list(sources.iterdir()) == []


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, str(path.relative_to(folder)))
    return archive


def zeros_in_chunks(total: int) -> Iterator[bytes]:
    block = bytes(1 << 20)
    for start in range(0, total, len(block)):
        yield block[: min(len(block), total - start)]


def add_bomb(archive: Path, kind: str) -> Path:
    """Append one class-folder entry of BOMB_BYTES zeros to a fresh zip or tar.gz, written in chunks."""
    if kind == "zip":
        with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED) as zf, zf.open("a/bomb.bmp", "w") as out:
            for block in zeros_in_chunks(BOMB_BYTES):
                out.write(block)
        return archive
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("a/bomb.bmp")
        info.size = BOMB_BYTES
        tf.addfile(info, io.BufferedReader(io.BytesIO(bytes(BOMB_BYTES))))
    return archive


# --- archives -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "name"), [("zip", "bomb.zip"), ("tar.gz", "bomb.tar.gz")])
def test_compression_bomb_is_refused_while_extracting_and_nothing_stays(tmp_path, kind, name):
    """Run in a child whose files may not grow past 4 MiB (RLIMIT_FSIZE): extracting the 32 MiB entry whole would
    fail there with EFBIG, so the ratio refusal must come first, from counting, with less than 4 MiB written."""
    archive = add_bomb(tmp_path / name, kind)
    assert archive.stat().st_size < 256 << 10
    home = tmp_path / "home"
    program = textwrap.dedent(
        f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))
        from pathlib import Path
        from visionloop.config import DataSettings
        from visionloop.data.sources import ingest
        from visionloop.errors import DataError
        try:
            ingest({str(archive)!r}, Path({str(home)!r}), limits=DataSettings(max_compression_ratio=10))
        except DataError as exc:
            print(exc)
        """
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    message = done.stdout.strip()
    assert "data.max_compression_ratio" in message, message
    assert str(archive) in message and "10 times its own size" in message
    assert_nothing_cached(home)


def test_extracted_bytes_cap_counts_what_comes_out(make_image_folder, tmp_path, tmp_home):
    # incompressible images: the ratio is near 1, only the total is over the cap
    folder = make_image_folder(classes=("a", "b"), per_class=4, size=200)  # ~120 KB each, ~1 MB in all
    archive = zip_folder(folder, tmp_path / "big.zip")
    with pytest.raises(DataError, match=r"big\.zip (declares|unpacks to) more than 0\.5 MiB \(data\.max_extract_mb\)"):
        ingest(str(archive), tmp_home, limits=DataSettings(max_extract_mb=0.5))
    assert_nothing_cached(tmp_home)
    assert ingest(str(archive), tmp_home).num_files == 8  # the default cap lets it through


def test_tar_sizes_are_counted_while_streaming_not_summed_first(tmp_path, tmp_home):
    """tar members are read one at a time: the third one crosses the cap and is refused as it comes out."""
    archive = tmp_path / "liar.tar"
    with tarfile.open(archive, "w") as tf:  # tar sizes are the data's real length; stored, ratio 1
        for index in range(3):
            info = tarfile.TarInfo(f"a/{index}.bin")
            info.size = 600 << 10
            tf.addfile(info, io.BytesIO(os.urandom(info.size)))
    with pytest.raises(DataError, match=r"unpacks to more than 1 MiB"):
        ingest(str(archive), tmp_home, limits=DataSettings(max_extract_mb=1))
    assert_nothing_cached(tmp_home)


def test_member_count_cap(make_image_folder, tmp_path, tmp_home):
    archive = zip_folder(make_image_folder(per_class=3, size=8), tmp_path / "many.zip")
    with pytest.raises(DataError, match=r"more than 5 entries \(data\.max_archive_members\)"):
        ingest(str(archive), tmp_home, limits=DataSettings(max_archive_members=5))
    assert_nothing_cached(tmp_home)


def _tar_with(tmp_path: Path, folder: Path, extra: tarfile.TarInfo) -> Path:
    archive = tmp_path / "special.tar"
    with tarfile.open(archive, "w") as tf:
        for path in sorted(folder.rglob("*")):
            tf.add(path, str(path.relative_to(folder)), recursive=False)
        tf.addfile(extra)
    return archive


@pytest.mark.parametrize(
    ("entry_type", "what"),
    [(tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link"), (tarfile.FIFOTYPE, "special file")],
)
def test_tar_links_and_special_files_are_refused(make_image_folder, tmp_path, tmp_home, entry_type, what):
    folder = make_image_folder(per_class=2, size=8)
    extra = tarfile.TarInfo("a/extra.png")
    extra.type = entry_type
    extra.linkname = "a/a_000.png" if entry_type == tarfile.LNKTYPE else "a_000.png"  # inside the tree
    archive = _tar_with(tmp_path, folder, extra)
    with pytest.raises(DataError, match=rf"(has a {what} entry 'a/extra\.png'|unsafe entry)"):
        ingest(str(archive), tmp_home)
    assert_nothing_cached(tmp_home)


def test_zip_symlink_entry_is_refused(make_image_folder, tmp_path, tmp_home):
    archive = zip_folder(make_image_folder(per_class=2, size=8), tmp_path / "link.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo("a/link.png")
        info.create_system = 3  # Unix
        info.external_attr = (0o120777) << 16  # S_IFLNK: what `zip --symlinks` writes
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match=r"has a symbolic link entry 'a/link\.png'"):
        ingest(str(archive), tmp_home)
    assert_nothing_cached(tmp_home)


def _empty_tar(path: Path, mode: str) -> Path:
    tarfile.open(path, mode).close()
    return path


@pytest.mark.parametrize(
    ("name", "make", "problem"),
    [
        ("empty.tar", lambda p: _empty_tar(p, "w"), "holds no files"),
        ("empty.tar.gz", lambda p: _empty_tar(p, "w:gz"), "holds no files"),
        ("empty.tar.xz", lambda p: _empty_tar(p, "w:xz"), "holds no files"),
        ("empty.zip", lambda p: zipfile.ZipFile(p, "w").close(), "holds no files"),
        ("zero-bytes.bin", lambda p: p.write_bytes(b""), "empty file, not an archive or image folder"),
        ("zeros.bin", lambda p: p.write_bytes(bytes(3 << 20)), "not a zip or tar"),
        ("zeros-odd.bin", lambda p: p.write_bytes(bytes(100_000)), "not a zip or tar"),
        ("only-folders.zip", lambda p: _zip_of_folders(p), "holds no files"),
    ],
)
def test_empty_archives_and_zero_files_give_one_clear_error(tmp_path, tmp_home, name, make, problem):
    path = tmp_path / name
    make(path)
    with pytest.raises(DataError, match=problem) as info:
        ingest(str(path), tmp_home)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert_nothing_cached(tmp_home)


def _zip_of_folders(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(zipfile.ZipInfo("a/"), b"")
        zf.writestr(zipfile.ZipInfo("b/"), b"")


def test_archives_are_identified_by_magic_bytes_not_by_a_whole_file_probe(tmp_path):
    """tarfile.is_tarfile would run every decompressor over a zero-filled file (56 s for 256 MiB)."""
    from visionloop.data.archives import archive_kind

    zeros = tmp_path / "zeros"
    zeros.write_bytes(bytes(3 << 20))
    assert archive_kind(zeros) is None
    for mode, kind in (("w", "tar"), ("w:gz", "gzip"), ("w:bz2", "bzip2"), ("w:xz", "xz")):
        path = tmp_path / f"x.{kind}"
        with tarfile.open(path, mode) as tf:
            tf.addfile(tarfile.TarInfo("a/one.png"), io.BytesIO(b""))
        assert archive_kind(path) == kind
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as zf:
        zf.writestr("a/one.png", b"x")
    assert archive_kind(tmp_path / "x.zip") == "zip"


# --- special files --------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "file://"])
def test_dev_zero_is_refused_not_read_for_ever(tmp_home, prefix):
    with pytest.raises(DataError, match=r"/dev/zero is not a regular file"):
        ingest(f"{prefix}/dev/zero", tmp_home)
    assert_nothing_cached(tmp_home)


def test_fifo_is_refused(tmp_path, tmp_home):
    fifo = tmp_path / "pipe.zip"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        ingest(str(fifo), tmp_home)


# --- downloads ------------------------------------------------------------------------------------


class _EndlessZeros(http.server.BaseHTTPRequestHandler):
    """Answers every GET with zeros and no Content-Length (bounded at 64 MiB, so a failing test still ends)."""

    protocol_version = "HTTP/1.0"  # the body ends when the connection closes
    stalls: threading.Event | None = None  # set on the class: send 1 KiB, then say nothing until it is set

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.end_headers()

    def do_GET(self) -> None:
        self.send_response(200)  # no Content-Type either: fsspec would read such a body whole to look for links
        self.end_headers()
        try:
            if self.stalls is not None:
                self.wfile.write(b"PK\x03\x04" + bytes(1020))
                self.wfile.flush()
                self.stalls.wait(timeout=30)
                return
            for block in zeros_in_chunks(64 << 20):
                self.wfile.write(block)
        except OSError:  # the client hung up: what the cap is for
            pass

    def log_message(self, format, *args):  # keep the test output clean
        pass


@pytest.fixture
def serve_handler() -> Iterator:
    servers = []

    def start(handler: type) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_download_without_content_length_is_cut_at_the_cap(serve_handler, tmp_home):
    base = serve_handler(_EndlessZeros)
    url = f"{base}/data.zip"
    with pytest.raises(DataError, match=r"sent more than 1 MiB \(data\.max_download_mb\)") as info:
        ingest(url, tmp_home, limits=DataSettings(max_download_mb=1))
    assert url in str(info.value)
    assert_nothing_cached(tmp_home)  # the partial download is gone


def test_download_with_a_content_length_over_the_cap_is_refused_before_it_starts(tmp_path, tmp_home):
    import functools

    folder = tmp_path / "www"
    folder.mkdir()
    (folder / "data.zip").write_bytes(os.urandom(2 << 20))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/data.zip"
        with pytest.raises(DataError, match=r"is 2097152 bytes, over the 1 MiB download limit.*nothing downloaded"):
            ingest(url, tmp_home, limits=DataSettings(max_download_mb=1))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert_nothing_cached(tmp_home)


def test_download_that_stalls_mid_body_hits_the_read_timeout(serve_handler, tmp_home):
    stall = threading.Event()
    handler = type("Stalling", (_EndlessZeros,), {"stalls": stall})
    base = serve_handler(handler)
    try:
        with pytest.raises(DataError, match=r"could not download .*Timeout"):
            ingest(f"{base}/data.zip", tmp_home, limits=DataSettings(download_timeout_seconds=1))
    finally:
        stall.set()
    assert_nothing_cached(tmp_home)


def test_tar_of_dot_as_tar_cf_makes_it(make_image_folder, tmp_path, tmp_home):
    """``tar -cf x.tar .`` starts with the entry ``.``, the destination itself: a folder, not an escape."""
    archive = tmp_path / "dot.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(make_image_folder(per_class=2, size=8), arcname=".")
    assert ingest(str(archive), tmp_home).classes == ["a", "b"]


def test_http_folder_listing_is_still_a_folder(make_image_folder, tmp_path, tmp_home):
    """An HTML index page (HEAD says text/html) is still read as a folder of class folders."""
    import functools

    make_image_folder(root=tmp_path / "www" / "ds", per_class=2, size=8)
    handler = functools.partial(_QuietFiles, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        result = ingest(f"http://127.0.0.1:{server.server_address[1]}/ds/", tmp_home, timeout=10)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert (result.classes, result.num_files) == (["a", "b"], 4)


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep the test output clean
        pass
