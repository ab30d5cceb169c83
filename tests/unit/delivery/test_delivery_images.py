"""The pure parts of visionloop.delivery.images: argument checks, parsing, error messages; no Docker engine needed.

The builds, runs and pushes themselves are tested for real in tests/deploy/test_container_images.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from localhost import free_port  # tests/localhost.py
from visionloop.delivery import images
from visionloop.delivery.images import ImageError

ROOT = Path(__file__).resolve().parents[3]

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_the_mirror_is_read_from_apts_own_sources():
    assert images.parse_apt_mirror(DEB822, "bookworm") == "http://deb.debian.org/debian"
    # the security archive is listed first here, but it is not a mirror of the suite
    security_first = DEB822.split("\n\n")[1] + "\n\n" + DEB822.split("\n\n")[0]
    assert images.parse_apt_mirror(security_first, "bookworm") == "http://deb.debian.org/debian"
    one_line = "# comment\ndeb [signed-by=/k.gpg] http://mirror.example/debian bookworm main\n"
    assert images.parse_apt_mirror(one_line, "bookworm") == "http://mirror.example/debian"
    assert images.parse_apt_mirror("deb http://m.example/debian trixie main\n", "bookworm") == "http://m.example/debian"
    assert images.parse_apt_mirror("# nothing here\n", "bookworm") is None
    disabled = "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n"
    assert images.parse_apt_mirror(disabled, "bookworm") is None


def test_push_output_gives_the_digest():
    digest = "sha256:" + "ab" * 32
    output = f"The push refers to repository [127.0.0.1:5000/visionloop-serve]\n5f70bf18a086: Pushed\n0.1.0: digest: {digest} size: 1993\n"
    assert images.parse_push_digest(output) == digest
    assert images.parse_push_digest("5f70bf18a086: Pushed\n") is None
    assert images.parse_push_digest("digest: sha256:1234") is None  # not 64 hex digits


@pytest.mark.parametrize(
    ("given", "address"),
    [
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("http://127.0.0.1:5000/", "127.0.0.1:5000"),
        ("ghcr.io", "ghcr.io"),
        ("registry.example.com:443", "registry.example.com:443"),
        ("[::1]:5000", "[::1]:5000"),
    ],
)
def test_registry_addresses(given: str, address: str):
    assert images.registry_address(given) == address


@pytest.mark.parametrize("bad", ["", "127.0.0.1:5000/path", "host:port", "a b", "127.0.0.1:99999"])
def test_a_malformed_registry_address_is_refused_with_the_expected_form(bad: str):
    with pytest.raises(ImageError, match=r"HOST\[:PORT\]|not a TCP port"):
        images.registry_address(bad)


def test_a_registry_nobody_listens_on_is_one_clear_sentence():
    closed = f"127.0.0.1:{free_port()}"
    with pytest.raises(ImageError) as raised:
        images.check_registry(closed)
    assert str(raised.value) == f"cannot reach the registry at {closed}: connection refused"
    assert raised.value.exit_code == 1


def test_split_reference():
    assert images.split_reference("visionloop-serve:0.1.0") == ("visionloop-serve", "0.1.0")
    assert images.split_reference("ghcr.io/owner/visionloop-serve:1") == ("owner/visionloop-serve", "1")
    assert images.split_reference("127.0.0.1:5000/visionloop-train") == ("visionloop-train", "latest")
    assert images.split_reference("localhost/x:2") == ("x", "2")


def test_manylinux_platform_takes_older_wheels_too():
    tags = images.platform_tags("manylinux_2_35_x86_64")
    assert tags[0] == "manylinux_2_35_x86_64" and "manylinux_2_28_x86_64" in tags and "manylinux_2_5_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_36_x86_64" not in tags  # newer than the target's glibc
    assert images.platform_tags("manylinux_2_28_aarch64")[-1] == "manylinux2014_aarch64"
    assert images.platform_tags("macosx_11_0_arm64") == ["macosx_11_0_arm64"]
    options = images.target_options("3.11", "manylinux_2_17_x86_64")
    assert options[:6] == ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    with pytest.raises(ImageError, match=r"3\.11"):
        images.target_options("311", None)


def test_the_serving_requirements_hold_no_training_library():
    serve = " ".join(images.requirements("serve", ROOT))
    train = " ".join(images.requirements("train", ROOT))
    for library in ("torch", "scikit-learn", "kfp", "onnx>"):
        assert library not in serve and library in train
    assert "onnxruntime" in serve and "mlflow-skinny" in serve
    with pytest.raises(ImageError, match="serve or train"):
        images.requirements("gpu", ROOT)  # type: ignore[arg-type]


def test_a_wheelhouse_must_be_complete(tmp_path: Path):
    folder = tmp_path / "serve"
    with pytest.raises(ImageError, match=r"no wheelhouse for the serve image at .*/serve: make one with"):
        images.check_wheelhouse(folder, "serve")
    folder.mkdir()
    (folder / "numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    with pytest.raises(ImageError, match=r"incomplete wheelhouse .*never finished"):
        images.check_wheelhouse(folder, "serve")
    marker = {"kind": "serve", "files": ["numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl", "gone.whl"]}
    (folder / images.MARKER).write_text(json.dumps({**marker, "project_wheel": "visionloop-0.1.0-py3-none-any.whl"}))
    with pytest.raises(ImageError, match=r"1 wheels missing, e.g. \['gone.whl'\]"):
        images.check_wheelhouse(folder, "serve")
    with pytest.raises(ImageError, match="for the serve image, not train"):
        images.check_wheelhouse(folder, "train")
    marker["files"] = marker["files"][:1]
    (folder / images.MARKER).write_text(json.dumps({**marker, "project_wheel": "visionloop-0.1.0-py3-none-any.whl"}))
    assert images.check_wheelhouse(folder, "serve")["kind"] == "serve"


def test_build_checks_the_wheelhouse_before_anything_else(tmp_path: Path):
    with pytest.raises(ImageError, match="no wheelhouse for the train image"):
        images.build("train", wheelhouse=tmp_path / "train", root=ROOT)
    with pytest.raises(ImageError, match="unknown image kind 'cpu'"):
        images.build("cpu", wheelhouse=tmp_path, root=ROOT)  # type: ignore[arg-type]


def test_revision_is_the_commit_or_unknown(tmp_path: Path):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert images.revision(ROOT) == head.stdout.strip()
    assert images.revision(tmp_path) == "unknown"


def test_the_project_root_is_found_from_below(tmp_path: Path):
    assert images.project_root(ROOT / "src" / "visionloop") == ROOT
    # outside any checkout, the checkout this module lives in is the answer (it is one)
    assert images.project_root(tmp_path) == ROOT


def test_sizes_side_by_side():
    line = images.size_summary(("visionloop-serve:0.1.0", 412_300_000), ("visionloop-train:0.1.0", 2_050_000_000))
    assert line == "visionloop-serve:0.1.0 412.3 MB  |  visionloop-train:0.1.0 2.05 GB  |  serve = 20.1% of train"
    assert images.format_size(999_000) == "1.0 MB"


def test_default_tags_follow_the_package_version():
    from visionloop import __version__

    assert images.default_tag("serve") == f"visionloop-serve:{__version__}"
    assert images.default_tag("train", "1.2.3") == "visionloop-train:1.2.3"
