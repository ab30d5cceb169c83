"""s3:// sources against a real S3-compatible server on 127.0.0.1 (moto's standalone server).

The same path a team takes with MinIO or any S3 endpoint: fsspec's s3fs driver, credentials and
the endpoint from the standard AWS variables (AWS_ENDPOINT_URL), nothing special in visionloop.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from localhost import free_port  # tests/localhost.py (tests/ is on sys.path)
from visionloop.data.sources import ingest
from visionloop.errors import DataError


def upload_folder(client: Any, folder: Path, bucket: str, prefix: str) -> None:
    client.create_bucket(Bucket=bucket)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder)}", Body=path.read_bytes())


def test_s3_prefix_of_class_folders(s3: Any, make_image_folder: Callable[..., Path], tmp_home: Path) -> None:
    upload_folder(s3, make_image_folder(classes=("cat", "dog"), per_class=4), "images", "pets/v1")
    result = ingest("s3://images/pets/v1", tmp_home, timeout=10)
    assert result.kind == "url"
    assert result.classes == ["cat", "dog"]
    assert result.num_files == 8
    assert result.root.is_relative_to(tmp_home / "sources")


def test_s3_zip_archive(s3: Any, make_image_folder: Callable[..., Path], tmp_home: Path) -> None:
    folder = make_image_folder(classes=("a", "b", "c"), per_class=2)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(folder.rglob("*.png")):
            zf.write(path, f"export/{path.relative_to(folder)}")
    s3.create_bucket(Bucket="archives")
    s3.put_object(Bucket="archives", Key="data.zip", Body=buffer.getvalue())
    result = ingest("s3://archives/data.zip", tmp_home, timeout=10)
    assert (result.classes, result.num_files) == (["a", "b", "c"], 6)


def test_s3_object_changed_is_fetched_again(s3: Any, make_image_folder: Callable[..., Path], tmp_home: Path) -> None:
    upload_folder(s3, make_image_folder(classes=("a", "b"), per_class=2), "moving", "data")
    first = ingest("s3://moving/data", tmp_home, timeout=10)
    upload_folder(s3, make_image_folder(classes=("a", "b", "c"), per_class=2, seed=1), "moving", "data")
    second = ingest("s3://moving/data", tmp_home, timeout=10)
    assert first.root != second.root
    assert second.classes == ["a", "b", "c"]


def test_s3_missing_bucket_is_a_clear_error(s3: Any, tmp_home: Path) -> None:
    with pytest.raises(DataError, match=r"s3://no-such-bucket/x"):
        ingest("s3://no-such-bucket/x", tmp_home, timeout=10)
    assert not (tmp_home / "sources").exists() or not any((tmp_home / "sources").iterdir())


def test_s3_endpoint_down_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_home: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(DataError, match="s3://images/pets"):
        ingest("s3://images/pets", tmp_home, timeout=5)
