"""Ingest from every kind of source, on real files, archives and a real HTTP server."""

from __future__ import annotations

import functools
import http.server
import socket
import struct
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionloop.data.sources import IngestResult, find_class_root, ingest, save_result
from visionloop.data.synthetic import SyntheticSpec
from visionloop.errors import DataError
from visionloop.fsutil import read_json


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    """Zip every file under ``folder``, entry names optionally under a ``prefix/`` top folder."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + str(path.relative_to(folder)))
    return archive


def tar_folder(folder: Path, archive: Path, prefix: str = "", mode: str = "w:gz") -> Path:
    with tarfile.open(archive, mode) as tf:
        for path in sorted(folder.rglob("*")):
            tf.add(path, prefix + str(path.relative_to(folder)), recursive=False)
    return archive


def assert_nothing_cached(home: Path) -> None:
    """A failed ingest leaves neither a final folder nor a temporary one under <home>/sources."""
    sources = home / "sources"
    assert not sources.exists() or list(sources.iterdir()) == []


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep the test output clean
        pass


@pytest.fixture
def http_root(tmp_path) -> Iterator[tuple[Path, str]]:
    """A real HTTP server on 127.0.0.1 serving a folder; yields (folder, base URL)."""
    folder = tmp_path / "www"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- built-in sources ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits") / "home"


def test_digits_writes_1797_grey_8x8_pngs_in_10_classes(digits_home):
    result = ingest("digits", digits_home)
    assert result.kind == "digits"
    assert result.hflip_ok is False  # a mirrored 2 is not a 2
    assert result.classes == [str(d) for d in range(10)]
    assert result.num_files == 1797
    assert result.root.is_relative_to(digits_home / "sources")
    files = sorted(result.root.rglob("*.png"))
    assert len(files) == 1797
    assert sorted(p.name for p in result.root.iterdir() if p.is_dir()) == result.classes
    for path in files:
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "L", (8, 8))


def test_digits_second_ingest_reuses_the_cache(digits_home):
    first = ingest("digits", digits_home)
    marker = first.root / ".left-by-test"
    marker.write_text("a rebuild would remove me")
    second = ingest("digits", digits_home)
    assert second == first
    assert marker.is_file()
    assert [p.name for p in (digits_home / "sources").iterdir() if p.name.startswith(".")] == []


def test_synthetic_source(tmp_home):
    spec = SyntheticSpec(classes=3, per_class=4, size=16, seed=1)
    result = ingest("synthetic", tmp_home, synthetic=spec)
    assert result.kind == "synthetic"
    assert result.hflip_ok is True
    assert result.classes == ["circle", "square", "triangle"]
    assert result.num_files == 12
    again = ingest("synthetic", tmp_home, synthetic=spec)
    assert again.root == result.root
    other = ingest("synthetic", tmp_home, synthetic=SyntheticSpec(classes=3, per_class=4, size=16, seed=2))
    assert other.root != result.root  # the cache is keyed by the spec


def test_hflip_flag_overrides_the_source_default(tmp_home):
    spec = SyntheticSpec(classes=2, per_class=1, size=8)
    assert ingest("synthetic", tmp_home, synthetic=spec, hflip=False).hflip_ok is False


# --- local folders --------------------------------------------------------------------------------


def test_local_folder_is_used_in_place(make_image_folder, tmp_home):
    folder = make_image_folder(classes=("cat", "dog"), per_class=3)
    result = ingest(str(folder), tmp_home)
    assert result.kind == "folder"
    assert result.root == folder.resolve()
    assert result.classes == ["cat", "dog"]
    assert result.num_files == 6
    assert not (tmp_home / "sources").exists()  # nothing copied


def test_folder_wrapped_in_a_top_folder(make_image_folder, tmp_path, tmp_home):
    outer = tmp_path / "download"
    make_image_folder(root=outer / "dataset-v2", classes=("a", "b", "c"), per_class=2)
    (outer / ".DS_Store").write_bytes(b"\0")  # hidden junk does not stop the descent
    assert find_class_root(outer) == outer / "dataset-v2"
    result = ingest(str(outer), tmp_home)
    assert result.root == (outer / "dataset-v2").resolve()
    assert result.classes == ["a", "b", "c"]


def test_hidden_files_and_folders_are_not_classes_or_images(make_image_folder, tmp_home):
    folder = make_image_folder(classes=("a", "b"), per_class=2)
    (folder / ".cache").mkdir()
    (folder / "a" / ".DS_Store").write_bytes(b"junk")
    result = ingest(str(folder), tmp_home)
    assert result.classes == ["a", "b"]
    assert result.num_files == 4


def test_file_url_of_a_folder(make_image_folder, tmp_home):
    folder = make_image_folder(per_class=2)
    result = ingest(f"file://{folder}", tmp_home)
    assert result.root == folder.resolve()
    assert result.classes == ["a", "b"]


def test_ingest_result_round_trips_through_json(make_image_folder, tmp_home, tmp_path):
    result = ingest(str(make_image_folder(per_class=1)), tmp_home)
    save_result(result, tmp_path / "ingest.json")
    assert IngestResult.from_dict(read_json(tmp_path / "ingest.json")) == result


# --- archives -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "dataset/"])
def test_zip_archive(make_image_folder, tmp_path, tmp_home, prefix):
    archive = zip_folder(make_image_folder(classes=("x", "y"), per_class=3), tmp_path / "data.zip", prefix)
    result = ingest(str(archive), tmp_home)
    assert result.kind == "archive"
    assert result.classes == ["x", "y"]
    assert result.num_files == 6
    assert result.root.is_relative_to(tmp_home / "sources")
    assert result.root.name == (prefix.strip("/") or "data")
    again = ingest(str(archive), tmp_home)
    assert again.root == result.root
    assert len(list((tmp_home / "sources").iterdir())) == 1  # one cached copy, no leftovers


@pytest.mark.parametrize(("name", "mode"), [("data.tar.gz", "w:gz"), ("data.tar", "w"), ("data.tar.xz", "w:xz")])
@pytest.mark.parametrize("prefix", ["", "top/"])
def test_tar_archives(make_image_folder, tmp_path, tmp_home, name, mode, prefix):
    archive = tar_folder(make_image_folder(classes=("x", "y", "z"), per_class=2), tmp_path / name, prefix, mode)
    result = ingest(str(archive), tmp_home)
    assert result.kind == "archive"
    assert result.classes == ["x", "y", "z"]
    assert result.num_files == 6
    with Image.open(next(result.root.rglob("*.png"))) as img:
        img.load()


def test_archive_recognised_by_content_not_name(make_image_folder, tmp_path, tmp_home):
    archive = zip_folder(make_image_folder(per_class=2), tmp_path / "download.bin")
    assert ingest(str(archive), tmp_home).classes == ["a", "b"]


def test_file_url_of_an_archive(make_image_folder, tmp_path, tmp_home):
    archive = tar_folder(make_image_folder(per_class=2), tmp_path / "data.tar.gz", "wrapped/")
    result = ingest(f"file://{archive}", tmp_home)
    assert result.kind == "archive"
    assert result.classes == ["a", "b"]


def test_zip_ignores_macos_metadata_folder(make_image_folder, tmp_path, tmp_home):
    archive = zip_folder(make_image_folder(per_class=2), tmp_path / "mac.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("__MACOSX/a/._a_000.png", b"\0\5\26\7 AppleDouble")
    result = ingest(str(archive), tmp_home)
    assert result.classes == ["a", "b"]


# --- URLs over real HTTP --------------------------------------------------------------------------


def test_http_url_of_a_zip_archive(http_root, make_image_folder, tmp_home):
    folder, base = http_root
    zip_folder(make_image_folder(classes=("ham", "spam"), per_class=3), folder / "data.zip", "export/")
    result = ingest(f"{base}/data.zip", tmp_home, timeout=10)
    assert result.kind == "url"
    assert result.classes == ["ham", "spam"]
    assert result.num_files == 6
    assert result.root.is_relative_to(tmp_home / "sources")
    assert not list(result.root.parent.glob("download*"))  # the downloaded archive is removed after extraction
    marker = result.root / ".left-by-test"
    marker.write_text("a second download would remove me")
    assert ingest(f"{base}/data.zip", tmp_home, timeout=10).root == result.root
    assert marker.is_file()  # the second ingest of the same URL came from the cache


def test_http_url_whose_content_changed_is_fetched_again(http_root, make_image_folder, tmp_home):
    folder, base = http_root
    zip_folder(make_image_folder(classes=("ham", "spam"), per_class=3), folder / "data.zip")
    first = ingest(f"{base}/data.zip", tmp_home, timeout=10)
    zip_folder(make_image_folder(classes=("ham", "spam", "eggs"), per_class=4), folder / "data.zip")
    second = ingest(f"{base}/data.zip", tmp_home, timeout=10)
    assert second.root != first.root
    assert (second.classes, second.num_files) == (["eggs", "ham", "spam"], 12)


def test_http_url_that_404s(http_root, tmp_home):
    _folder, base = http_root
    with pytest.raises(DataError, match=r"nothing found at http://127\.0\.0\.1:\d+/missing\.zip"):
        ingest(f"{base}/missing.zip", tmp_home, timeout=10)
    assert_nothing_cached(tmp_home)


def test_unreachable_url(tmp_home):
    url = f"http://127.0.0.1:{free_port()}/data.zip"
    with pytest.raises(DataError, match="could not reach") as info:
        ingest(url, tmp_home, timeout=2)
    assert url in str(info.value)
    assert_nothing_cached(tmp_home)


def test_http_url_serving_something_that_is_not_an_archive(http_root, tmp_home):
    folder, base = http_root
    (folder / "data.zip").write_text("<html>login required</html>")
    with pytest.raises(DataError, match="not a zip or tar"):
        ingest(f"{base}/data.zip", tmp_home, timeout=10)
    assert_nothing_cached(tmp_home)


# --- bad inputs -----------------------------------------------------------------------------------


def test_no_source_given(tmp_home):
    with pytest.raises(DataError, match="no data source"):
        ingest("", tmp_home)


def test_missing_path(tmp_path, tmp_home):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="not found") as info:
        ingest(str(missing), tmp_home)
    assert str(missing) in str(info.value)


def test_empty_folder(tmp_path, tmp_home):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".hidden").write_text("only hidden files")
    with pytest.raises(DataError, match="empty"):
        ingest(str(empty), tmp_home)


def test_folder_with_only_loose_files(tmp_path, write_png, tmp_home):
    folder = tmp_path / "loose"
    for i in range(3):
        write_png(folder / f"img{i}.png", seed=i)
    with pytest.raises(DataError, match=r"no class folders.*only loose files"):
        ingest(str(folder), tmp_home)


def test_class_folders_without_files(tmp_path, tmp_home):
    for name in ("a", "b"):
        (tmp_path / "hollow" / name).mkdir(parents=True)
    with pytest.raises(DataError, match="hold no files"):
        ingest(str(tmp_path / "hollow"), tmp_home)


def test_archive_of_loose_files(tmp_path, write_png, tmp_home):
    loose = tmp_path / "loose"
    write_png(loose / "one.png")
    write_png(loose / "two.png", seed=1)
    archive = zip_folder(loose, tmp_path / "loose.zip")
    with pytest.raises(DataError, match="only loose files"):
        ingest(str(archive), tmp_home)


def test_file_named_zip_that_is_not_an_archive(tmp_path, tmp_home):
    fake = tmp_path / "x.zip"
    fake.write_text("this is not a zip file\n" * 40)
    with pytest.raises(DataError, match=r"x\.zip is a file but not a zip or tar"):
        ingest(str(fake), tmp_home)
    assert_nothing_cached(tmp_home)


def test_zip_with_path_traversal_entry(make_image_folder, tmp_path, tmp_home):
    archive = zip_folder(make_image_folder(per_class=2), tmp_path / "evil.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("../evil.png", b"payload")
    with pytest.raises(DataError, match=r"outside the archive root: '\.\./evil\.png'"):
        ingest(str(archive), tmp_home)
    assert_nothing_cached(tmp_home)
    assert not (tmp_home / "evil.png").exists()
    assert not list(tmp_path.rglob("evil.png"))


def test_tar_with_path_traversal_entry(make_image_folder, tmp_path, tmp_home):
    archive = tar_folder(make_image_folder(per_class=2), tmp_path / "evil.tar.gz")
    payload = tmp_path / "payload.png"
    payload.write_bytes(b"payload")
    with tarfile.open(tmp_path / "evil2.tar.gz", "w:gz") as out, tarfile.open(archive) as src:
        for member in src.getmembers():
            out.addfile(member, src.extractfile(member) if member.isfile() else None)
        out.add(payload, "../evil.png")
    with pytest.raises(DataError, match="unsafe entry"):
        ingest(str(tmp_path / "evil2.tar.gz"), tmp_home)
    assert_nothing_cached(tmp_home)
    assert not (tmp_home / "sources" / "evil.png").exists()


def test_zip_with_damaged_compressed_data(tmp_path, tmp_home):
    archive = tmp_path / "damaged.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in ("a/1.bmp", "a/2.bmp", "b/1.bmp", "b/2.bmp"):
            zf.writestr(name, bytes(range(256)) * 64)
    data = bytearray(archive.read_bytes())
    first = zipfile.ZipFile(archive).infolist()[0]
    start = first.header_offset + 30 + len(first.filename)  # local header is 30 bytes + name
    for i in range(start, start + first.compress_size):
        data[i] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"damaged\.zip is a damaged"):
        ingest(str(archive), tmp_home)
    assert_nothing_cached(tmp_home)


def test_zip_with_damaged_central_directory(make_image_folder, tmp_path, tmp_home):
    archive = zip_folder(make_image_folder(per_class=2), tmp_path / "cd.zip")
    data = bytearray(archive.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    (directory_offset,) = struct.unpack("<I", data[end + 16 : end + 20])
    data[directory_offset : directory_offset + 4] = b"XXXX"
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match="damaged"):
        ingest(str(archive), tmp_home)
    assert_nothing_cached(tmp_home)


def test_encrypted_zip(make_image_folder, tmp_path, tmp_home):
    archive = zip_folder(make_image_folder(per_class=2), tmp_path / "locked.zip")
    data = bytearray(archive.read_bytes())
    # set the "encrypted" flag bit in every local and central header, as a password-protected zip has
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature)
        while at >= 0:
            data[at + flag_at] |= 1
            at = data.find(signature, at + 4)
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match="encrypted"):
        ingest(str(archive), tmp_home)
    assert_nothing_cached(tmp_home)


def test_truncated_tar_gz(make_image_folder, tmp_path, tmp_home):
    archive = tar_folder(make_image_folder(per_class=4, size=32), tmp_path / "cut.tar.gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="damaged tar archive"):
        ingest(str(archive), tmp_home)
    assert_nothing_cached(tmp_home)


def test_tar_with_damaged_member_header_is_not_silently_cut_short(make_image_folder, tmp_path, tmp_home):
    # tarfile itself stops without a word at a bad header after the first member
    archive = tar_folder(make_image_folder(per_class=3), tmp_path / "plain.tar", mode="w")
    with tarfile.open(archive) as tf:
        third = tf.getmembers()[2]
    data = bytearray(archive.read_bytes())
    data[third.offset + 148 : third.offset + 156] = b"XXXXXXXX"  # the header checksum field
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match="damaged tar archive"):
        ingest(str(archive), tmp_home)
    assert_nothing_cached(tmp_home)


def test_damaged_gzip_stream_in_tar_gz(tmp_path, tmp_home):
    # random bytes do not compress, so the damage lands in the last members' data, past the headers
    # tarfile reads; only the gzip CRC at the end of the stream can tell
    source = tmp_path / "src"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (source / name).mkdir(parents=True)
        for i in range(3):
            (source / name / f"{i}.bin").write_bytes(rng.bytes(4096))
    archive = tar_folder(source, tmp_path / "flipped.tar.gz")
    data = bytearray(archive.read_bytes())
    for i in range(len(data) * 3 // 4, len(data) * 3 // 4 + 16):
        data[i] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"flipped\.tar\.gz is a damaged tar archive"):
        ingest(str(archive), tmp_home)
    assert_nothing_cached(tmp_home)


def test_http_server_that_never_answers_times_out(tmp_home):
    """A host that accepts the connection and then says nothing: the timeout ends it, no hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/data.zip"
        with pytest.raises(DataError, match=r"could not reach .*Timeout"):
            ingest(url, tmp_home, timeout=1)
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()
