"""The container images: wheelhouse → (base image) → ``docker build`` → push to a registry → pull back by digest.

- ``wheelhouse(kind, output)``: every Python package an image installs, as wheels on the host beside the build: the
  project's own wheel (``pip wheel --no-deps``) and its dependencies for that kind (``pip download``, binary only,
  exact versions from ``constraints.txt``). The images install from it with ``pip install --no-index``, so no
  build runs pip over the network, and ``docker build --network none`` proves it.
- ``base_image(tag)``: a Debian base image from ``debootstrap --variant=minbase`` + ``docker import``, for machines
  that reach no public registry. The Dockerfiles' defaults stay the usual public images.
- ``build(kind, tag, base_image, wheelhouse)``: a small build context (Dockerfile, wheels: no .git,
  no .venv) and ``docker build``; works with the legacy builder (no BuildKit, no buildx needed).
- ``push(tag, registry)`` → digest, ``pull_by_digest(repository, digest)`` → image id, ``image_size(tag)``.

Every failure is an ``ImageError`` (a ``VisionloopError``, exit code 1) that names what failed and where.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from visionloop import __version__
from visionloop.errors import VisionloopError

Kind = Literal["serve", "train"]
KINDS: tuple[Kind, ...] = ("serve", "train")
# the one address the local registry of deploy/docker/registry.yml listens on
LOCAL_REGISTRY = "127.0.0.1:5000"
DEFAULT_SOURCE = "https://github.com/visionloop/visionloop"
BASE_TAG = "visionloop-base:bookworm"
MARKER = ".visionloop-wheelhouse.json"
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
APT_SOURCES_LIST = Path("/etc/apt/sources.list")
# what the imported base holds beyond minbase: Python and venv for the images' builder stage, CA certificates
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
Progress = Callable[[str], None]
PIP = (sys.executable, "-m", "pip")  # this interpreter's pip, with pip's own configuration (index, find-links, cert)


class ImageError(VisionloopError):
    """Building, pushing or pulling an image failed; the message names the step, the image and the place."""

    exit_code = 1


@dataclass(frozen=True)
class ImageInfo:
    kind: str
    tag: str
    id: str
    size: int  # bytes, as `docker image inspect` reports it (the image's own layers and its base's)
    seconds: float  # wall time of `docker build`
    labels: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _quiet(_message: str) -> None:
    pass


def default_tag(kind: Kind, version: str = __version__) -> str:
    """visionloop-serve:0.1.0 / visionloop-train:0.1.0: the names the compose files and manifests use."""
    return f"visionloop-{kind}:{version}"


def check_kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise ImageError(f"unknown image kind {kind!r}: choose serve or train")
    return kind  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ the project


def project_root(start: Path | None = None) -> Path:
    """The source checkout the images are built from: the first folder, from ``start`` (default the current
    folder) upwards, with pyproject.toml and deploy/docker/serve.Dockerfile; else the checkout this module is in."""
    candidates = [start or Path.cwd()]
    candidates += list(candidates[0].resolve().parents)
    candidates.append(Path(__file__).resolve().parents[3])  # src/visionloop/delivery/images.py in a checkout
    for folder in candidates:
        if (folder / "pyproject.toml").is_file() and (folder / "deploy" / "docker" / "serve.Dockerfile").is_file():
            return folder.resolve()
    raise ImageError(
        f"no visionloop source checkout at or above {candidates[0]}: the images are built from one "
        "(pyproject.toml and deploy/docker/*.Dockerfile); run this in a clone of the repository"
    )


def requirements(kind: Kind, root: Path) -> list[str]:
    """The project's requirements for ``kind``: the core install (serve), or core + the ``train`` extra (train)."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    if check_kind(kind) == "train":
        wanted += project.get("optional-dependencies", {}).get("train", [])
    return wanted


def constraints_hash(constraints: Path) -> str:
    return hashlib.sha256(constraints.read_bytes()).hexdigest()


def revision(root: Path) -> str:
    """The commit the build comes from (``git rev-parse HEAD``), or "unknown" outside a git checkout."""
    git = shutil.which("git")
    if git is None:
        return "unknown"
    result = subprocess.run([git, "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
    value = result.stdout.strip()
    return value if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", value) else "unknown"


# ------------------------------------------------------------------------------------------ subprocesses


def tail(text: str, lines: int = 15) -> str:
    """The last ``lines`` non-empty lines of a command's output, for an error message."""
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def _run(
    command: Sequence[str],
    what: str,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    log: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``command``; its output goes to ``log`` when given (read back for the error), else is captured.
    A non-zero exit is an ImageError: ``what`` failed, with the last lines of the output."""
    try:
        if log is not None:
            with log.open("w") as out:
                result = subprocess.run(
                    command, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd, timeout=timeout
                )
            output = log.read_text(errors="replace")
            result = subprocess.CompletedProcess(result.args, result.returncode, output, "")
        else:
            result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    except FileNotFoundError:
        raise ImageError(f"{what}: {command[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{what}: no result within {timeout:.0f} s ({' '.join(command[:3])} …)") from None
    if result.returncode != 0:
        where = f" (whole log: {log})" if log is not None else ""
        output = tail((result.stdout or "") + "\n" + (result.stderr or ""))
        raise ImageError(f"{what} failed (exit {result.returncode}){where}:\n{output}")
    return result


# ------------------------------------------------------------------------------------------ wheelhouse


def platform_tags(platform: str) -> list[str]:
    """``--platform`` values for pip: a ``manylinux_2_Y_ARCH`` glibc tag also takes every older manylinux wheel
    (pip before 24 does not expand it by itself), legacy aliases included; any other tag is taken as it is."""
    match = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", platform)
    if match is None:
        return [platform]
    major, minor, arch = int(match[1]), int(match[2]), match[3]
    if major != 2:
        return [platform]
    lowest = 5 if arch in ("x86_64", "i686") else 17
    tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, lowest - 1, -1)]
    for glibc_minor, alias in ((17, "manylinux2014"), (12, "manylinux2010"), (5, "manylinux1")):
        if lowest <= glibc_minor <= minor:
            tags.append(f"{alias}_{arch}")
    return tags


def target_options(python_version: str | None, platform: str | None) -> list[str]:
    """pip's options for wheels of another interpreter or platform than the host's (e.g. an image's Python)."""
    options: list[str] = []
    if python_version:
        if not re.fullmatch(r"3\.\d{1,2}", python_version):
            raise ImageError(f"--python-version must look like 3.11, got {python_version!r}")
        options += ["--python-version", python_version, "--implementation", "cp"]
        options += ["--abi", f"cp{python_version.replace('.', '')}"]
    for tag in platform_tags(platform) if platform else []:
        options += ["--platform", tag]
    return options


def _pip_env(constraints: Path) -> dict[str, str]:
    # PIP_CONSTRAINT reaches pip's isolated build environments too (the build backend is pinned as well)
    env = {**os.environ, "PIP_CONSTRAINT": str(constraints), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PIP_REQUIRE_VIRTUALENV", None)
    return env


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def check_wheelhouse(folder: Path, kind: Kind) -> dict:
    """The marker of a complete wheelhouse for ``kind`` at ``folder``; an ImageError says what is missing."""
    parent = folder.parent if folder.name == kind else folder
    hint = f"make one with `visionloop images wheelhouse --kind {kind} --output {parent}`"
    if not folder.is_dir():
        raise ImageError(f"no wheelhouse for the {kind} image at {folder}: {hint}")
    marker = read_marker(folder)
    if marker is None:
        raise ImageError(f"incomplete wheelhouse at {folder} (no {MARKER}: it was never finished): {hint}")
    if marker.get("kind") != kind:
        raise ImageError(f"the wheelhouse at {folder} is for the {marker.get('kind')} image, not {kind}: {hint}")
    missing = [name for name in marker.get("files", []) if not (folder / name).is_file()]
    if missing or not marker.get("project_wheel"):
        raise ImageError(
            f"incomplete wheelhouse at {folder}: {len(missing)} wheels missing, e.g. {missing[:3]}: {hint}"
        )
    return marker


def _resolve(requirements_file: Path, constraints: Path, work: Path) -> list[dict]:
    """What pip would install for these requirements on this interpreter: (name, version, url) per distribution."""
    report = work / "resolution.json"
    _run(
        [
            *PIP,
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            "-r",
            str(requirements_file),
        ],
        "resolving the dependencies (pip install --dry-run)",
        env=_pip_env(constraints),
        log=work / "resolve.log",
    )
    items = json.loads(report.read_text())["install"]
    return [
        {"name": i["metadata"]["name"], "version": i["metadata"]["version"], "url": i["download_info"]["url"]}
        for i in items
    ]


def _build_project_wheel(root: Path, constraints: Path, dest: Path, work: Path) -> Path:
    """``pip wheel --no-deps`` of a copy of the sources (the working tree is left as it is: no build/ folder)."""
    copy = work / "project"
    copy.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "setup.py", "MANIFEST.in"):
        if (root / name).is_file():
            shutil.copy2(root / name, copy / name)
    shutil.copytree(root / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    out = work / "project-wheel"
    # a fixed time stamp in the zip: the same sources give the same wheel, so docker's layer cache holds
    env = {**_pip_env(constraints), "SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", "315532800")}
    _run(
        [*PIP, "wheel", "--no-deps", "--quiet", "-w", str(out), str(copy)],
        "building the visionloop wheel (pip wheel --no-deps)",
        env=env,
        log=work / "project-wheel.log",
    )
    (wheel,) = out.glob("visionloop-*.whl")
    for old in dest.glob("visionloop-*.whl"):
        old.unlink()
    target = dest / wheel.name
    shutil.move(wheel, target)
    return target


def wheelhouse(
    kind: Kind,
    output: Path,
    *,
    root: Path | None = None,
    constraints: Path | None = None,
    python_version: str | None = None,
    platform: str | None = None,
    progress: Progress = _quiet,
) -> Path:
    """Wheels of the project and of every dependency of ``kind`` in ``output``; returns ``output``.

    Dependencies are resolved on this interpreter with constraints.txt, then each one is downloaded as a wheel
    (binary only) for the target (``python_version``/``platform``, default the host's); the few published only as
    source are built into wheels here. Everything lands in a temporary folder renamed to ``output`` at the end, with
    a marker holding the constraints' hash: a later call with the same constraints, requirements and target keeps
    those wheels and only rebuilds the project's own wheel (seconds)."""
    kind = check_kind(kind)
    root = root or project_root()
    constraints = (constraints or root / "constraints.txt").resolve()
    if not constraints.is_file():
        raise ImageError(f"no constraints file at {constraints}: the wheelhouse pins every version from it")
    output = output.resolve()
    wanted = requirements(kind, root)
    key = {
        "kind": kind,
        "constraints_sha256": constraints_hash(constraints),
        "requirements": wanted,
        "python_version": python_version or "",
        "platform": platform or "",
    }
    options = target_options(python_version, platform)
    output.parent.mkdir(parents=True, exist_ok=True)
    marker = read_marker(output)
    if marker is not None and {k: marker.get(k) for k in key} == key:
        try:
            check_wheelhouse(output, kind)
        except ImageError:
            marker = None
        else:
            progress(f"reusing the {kind} wheelhouse at {output}; rebuilding the visionloop wheel")
            with tempfile.TemporaryDirectory(prefix=".wheel-", dir=output.parent) as work:
                wheel = _build_project_wheel(root, constraints, output, Path(work))
            files = {*marker["files"], wheel.name} - ({marker["project_wheel"]} - {wheel.name})
            marker["project_wheel"], marker["files"] = wheel.name, sorted(files)
            (output / MARKER).write_text(json.dumps(marker, indent=2))
            return output
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        wheels = work / "wheels"
        wheels.mkdir()
        requirements_file = work / "requirements.txt"
        requirements_file.write_text("\n".join(wanted) + "\n")
        progress(f"resolving the {kind} dependencies against {constraints.name}")
        resolved = _resolve(requirements_file, constraints, work)
        sources = [d for d in resolved if not d["url"].endswith(".whl")]
        binaries = [d for d in resolved if d["url"].endswith(".whl")]
        for dist in sources:
            progress(f"building {dist['name']} {dist['version']} (published only as source) into a wheel")
            _run(
                [*PIP, "wheel", "--no-deps", "--quiet", "-w", str(wheels), f"{dist['name']}=={dist['version']}"],
                f"building a wheel of {dist['name']}=={dist['version']}",
                env=_pip_env(constraints),
                log=work / "source-wheels.log",
            )
        if options:
            impure = [p.name for p in wheels.glob("*.whl") if not p.name.endswith("-none-any.whl")]
            if impure:
                raise ImageError(
                    f"built from source for this machine only, not for the target {python_version or ''} "
                    f"{platform or ''}: {', '.join(impure)}; build the wheelhouse on a machine like the image"
                )
        progress(f"downloading {len(binaries)} wheels for the {kind} image (pip download, binary only)")
        _run(
            [*PIP, "download", "--only-binary=:all:", "--no-deps", "--quiet", "-d", str(wheels), *options]
            + [f"{d['name']}=={d['version']}" for d in binaries],
            f"downloading the wheels of the {kind} image (pip download)",
            env=_pip_env(constraints),
            log=work / "download.log",
        )
        progress("building the visionloop wheel")
        wheel = _build_project_wheel(root, constraints, wheels, work)
        files = sorted(p.name for p in wheels.iterdir() if p.is_file())
        marker = {
            **key,
            "project_wheel": wheel.name,
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (wheels / MARKER).write_text(json.dumps(marker, indent=2))
        if output.exists():
            shutil.rmtree(output)
        wheels.rename(output)  # the finished folder appears in one step: nothing half-written at ``output``
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output


# ------------------------------------------------------------------------------------------ docker


def docker_client() -> str:
    docker = shutil.which("docker")
    if docker is None:
        raise ImageError("the docker client is not installed (Debian: apt-get install docker.io)")
    return docker


def check_engine(docker: str | None = None) -> str:
    """The docker client's path, once ``docker info`` has reached a running engine."""
    docker = docker or docker_client()
    result = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip() or "error" in result.stdout.lower():
        why = tail(result.stderr or result.stdout, 1) or f"exit {result.returncode}"
        raise ImageError(
            f"the Docker engine is not running ({why}): start it (`dockerd &` as root, or `systemctl start docker`)"
        )
    return docker


def image_exists(tag: str, docker: str | None = None) -> bool:
    docker = docker or docker_client()
    return subprocess.run([docker, "image", "inspect", tag], capture_output=True).returncode == 0


def inspect_image(tag: str, docker: str | None = None) -> dict:
    docker = docker or docker_client()
    result = subprocess.run([docker, "image", "inspect", tag], capture_output=True, text=True)
    if result.returncode != 0:
        raise ImageError(f"no image {tag} in this Docker engine: build it with `visionloop images build`")
    return json.loads(result.stdout)[0]


def image_size(tag: str, docker: str | None = None) -> int:
    """The size in bytes `docker image inspect` gives for ``tag`` (base layers included)."""
    return int(inspect_image(tag, docker)["Size"])


def format_size(size: int) -> str:
    """Decimal units, as docker prints them: 412.3 MB, 2.05 GB."""
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def size_summary(serve: tuple[str, int], train: tuple[str, int]) -> str:
    """One line: both images' sizes side by side and the serving image as a share of the training image."""
    share = serve[1] / train[1] if train[1] else float("nan")
    return f"{serve[0]} {format_size(serve[1])}  |  {train[0]} {format_size(train[1])}  |  serve = {share:.1%} of train"


# ------------------------------------------------------------------------------------------ base image


def parse_apt_mirror(text: str, suite: str = "bookworm") -> str | None:
    """The Debian mirror URL in apt's sources: a deb822 ``.sources`` file or a one-line ``sources.list``.
    The stanza whose Suites include ``suite`` wins (the security archive is not a mirror of the suite)."""
    first: str | None = None
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.lstrip().startswith("#") or ":" not in line or line[:1].isspace():
                continue
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "uris" not in fields or "deb" not in fields.get("types", "deb").split():
            continue
        uri = fields["uris"].split()[0]
        if suite in fields.get("suites", "").split():
            return uri
        first = first or uri
    for line in text.splitlines():
        match = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
        if match:
            if match[2] == suite:
                return match[1]
            first = first or match[1]
    return first


def apt_mirror(suite: str = "bookworm") -> str:
    """The mirror this machine's apt uses (NOTES.md: read from apt's own sources, not guessed)."""
    for path in (DEBIAN_SOURCES, APT_SOURCES_LIST):
        if path.is_file():
            mirror = parse_apt_mirror(path.read_text(), suite)
            if mirror:
                return mirror
    raise ImageError(
        f"no Debian mirror in {DEBIAN_SOURCES} or {APT_SOURCES_LIST}: give one with --mirror http://deb.debian.org/debian"
    )


def base_image(
    tag: str = BASE_TAG,
    suite: str = "bookworm",
    *,
    mirror: str | None = None,
    docker: str | None = None,
    progress: Progress = _quiet,
) -> str:
    """A Debian ``suite`` image with Python 3 and venv, made without any registry; returns ``tag``.

    ``debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates SUITE DIR MIRROR``, then
    ``tar -C DIR -c . | docker import - TAG``. Nothing is done when ``tag`` exists already. Only for machines that
    reach no public registry: the Dockerfiles' defaults are the public images."""
    docker = check_engine(docker)
    if image_exists(tag, docker):
        progress(f"{tag} exists; kept")
        return tag
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise ImageError("debootstrap is not installed (Debian: apt-get install debootstrap); it makes the base image")
    if os.geteuid() != 0:
        raise ImageError("debootstrap needs root (it creates device files and changes ownership): run as root")
    mirror = mirror or apt_mirror(suite)
    rootfs = Path(tempfile.mkdtemp(prefix="visionloop-rootfs-", dir="/var/tmp"))
    log = rootfs.with_name(rootfs.name + ".log")
    try:
        progress(f"debootstrap {suite} from {mirror}")
        _run(
            [debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", suite, str(rootfs), mirror],
            f"debootstrap of {suite} from {mirror}",
            log=log,
        )
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        progress(f"docker import {tag}")
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["/bin/bash"]',
            f'LABEL org.opencontainers.image.description="Debian {suite} minbase with python3 (debootstrap)"',
        ]
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            command = [docker, "import", *[a for c in changes for a in ("--change", c)], "-", tag]
            imported = subprocess.run(command, stdin=tar.stdout, capture_output=True, text=True)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar_code = tar.wait()
        if tar_code != 0 or imported.returncode != 0:
            raise ImageError(
                f"docker import of {rootfs} as {tag} failed: {tail(imported.stderr) or f'tar exit {tar_code}'}"
            )
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
        log.unlink(missing_ok=True)
    return tag


# ------------------------------------------------------------------------------------------ build


def build(
    kind: Kind,
    tag: str | None = None,
    base_image: str | None = None,
    wheelhouse: Path | None = None,
    *,
    network: str = "none",
    root: Path | None = None,
    source: str = DEFAULT_SOURCE,
    labels: dict[str, str] | None = None,
    docker: str | None = None,
    progress: Progress = _quiet,
) -> ImageInfo:
    """``docker build`` of ``deploy/docker/<kind>.Dockerfile`` from a context of its own: the Dockerfile,
    the wheelhouse's dependencies in wheels/ and the visionloop wheel in project/ (nothing else of the checkout). ``base_image`` None keeps the Dockerfile's
    default (a public image). ``network`` "none" (the default) proves the build needs no network."""
    kind = check_kind(kind)
    root = root or project_root()
    tag = tag or default_tag(kind)
    if wheelhouse is None:
        raise ImageError(f"no wheelhouse given for the {kind} image: make one with `visionloop images wheelhouse`")
    wheelhouse = wheelhouse.resolve()
    marker = check_wheelhouse(wheelhouse, kind)
    dockerfile = root / "deploy" / "docker" / f"{kind}.Dockerfile"
    if not dockerfile.is_file():
        raise ImageError(f"no Dockerfile at {dockerfile}")
    docker = check_engine(docker)
    version = re.sub(r"^visionloop-([^-]+)-.*$", r"\1", marker["project_wheel"])
    commit = revision(root)
    context = Path(tempfile.mkdtemp(prefix=f"visionloop-{kind}-context-"))
    handle, name = tempfile.mkstemp(prefix=f"visionloop-build-{kind}-", suffix=".log")
    os.close(handle)
    log = Path(name)  # kept when the build fails (the error names it), removed when it succeeds
    try:
        shutil.copy2(dockerfile, context / "Dockerfile")
        # the dependencies and the project's wheel apart: the image installs them in two layers
        (context / "wheels").mkdir()
        (context / "project").mkdir()
        for name in marker["files"]:
            folder = context / ("project" if name == marker["project_wheel"] else "wheels")
            try:  # a hard link costs nothing; another file system gets a copy
                os.link(wheelhouse / name, folder / name)
            except OSError:
                shutil.copy2(wheelhouse / name, folder / name)
        command = [docker, "build", "--network", network, "-t", tag, "-f", str(context / "Dockerfile")]
        build_args = {"VERSION": version, "REVISION": commit, "SOURCE": source}
        if base_image:
            build_args["BASE_IMAGE"] = base_image
        for name, value in build_args.items():
            command += ["--build-arg", f"{name}={value}"]
        for name, value in (labels or {}).items():
            command += ["--label", f"{name}={value}"]
        progress(f"docker build {tag} (base {base_image or 'the Dockerfile default'}, network {network})")
        started = time.monotonic()
        _run([*command, str(context)], f"docker build of {tag} from {dockerfile.relative_to(root)}", log=log)
        seconds = time.monotonic() - started
        log.unlink()
    finally:
        shutil.rmtree(context, ignore_errors=True)
    info = inspect_image(tag, docker)
    return ImageInfo(
        kind=kind,
        tag=tag,
        id=info["Id"],
        size=int(info["Size"]),
        seconds=round(seconds, 1),
        labels=dict(info.get("Config", {}).get("Labels") or {}),
    )


# ------------------------------------------------------------------------------------------ registry


def registry_address(registry: str) -> str:
    """``HOST[:PORT]`` of a registry (a scheme or trailing slash is dropped); anything else is an ImageError."""
    address = re.sub(r"^https?://", "", registry.strip()).rstrip("/")
    if not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?", address):
        raise ImageError(f"registry address must be HOST[:PORT], e.g. {LOCAL_REGISTRY}; got {registry!r}")
    port = address.rsplit(":", 1)[1] if re.search(r":\d+$", address) else None
    if port is not None and not 0 < int(port) < 65536:
        raise ImageError(f"registry address {registry!r}: port {port} is not a TCP port")
    return address


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0] if re.search(r":\d+$", address) else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_registry(registry: str, timeout: float = 5.0) -> str:
    """GET http(s)://ADDRESS/v2/ once, so that a wrong address fails here with our message instead of in docker's
    retries. Returns the base URL that answered (a 401 counts: the registry is there, it wants a login)."""
    address = registry_address(registry)
    loopback = _is_loopback(address)
    # docker talks plain HTTP to a registry on a loopback address and HTTPS to the others
    schemes = ("http", "https") if loopback else ("https", "http")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if loopback else urllib.request.build_opener()
    failure = ""
    for scheme in schemes:
        url = f"{scheme}://{address}/v2/"
        try:
            with opener.open(url, timeout=timeout) as response:
                answered, headers = response.status, response.headers
        except urllib.error.HTTPError as exc:
            answered, headers = exc.code, exc.headers
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ConnectionRefusedError):
                raise ImageError(f"cannot reach the registry at {address}: connection refused") from None
            if isinstance(reason, socket.gaierror):
                raise ImageError(f"cannot reach the registry at {address}: unknown host ({reason})") from None
            if isinstance(reason, TimeoutError):
                failure = f"no answer within {timeout:g} s"
                break
            failure = str(reason) or type(reason).__name__
            continue
        if headers.get("Docker-Distribution-Api-Version", "").startswith("registry/2") or answered in (200, 401):
            return url[: -len("/v2/")]
        failure = f"GET {url} answered {answered}: not a container registry (no /v2/ API)"
        break
    raise ImageError(f"cannot reach the registry at {address}: {failure}")


def split_reference(reference: str) -> tuple[str, str]:
    """``[REGISTRY/]NAME[:TAG]`` → (NAME without its registry, TAG or "latest")."""
    name, tag = reference, "latest"
    last = reference.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = reference.rsplit(":", 1)
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    return "/".join(parts), tag


def parse_push_digest(output: str) -> str | None:
    """The manifest digest in ``docker push``'s output ("0.1.0: digest: sha256:… size: 1234"), or None."""
    match = re.search(r"digest:\s*(sha256:[0-9a-f]{64})", output)
    return match[1] if match else None


def push(tag: str, registry: str, *, repository: str | None = None, docker: str | None = None) -> str:
    """Tag ``tag`` as REGISTRY/NAME:TAG, push it; returns the manifest digest (``sha256:…``)."""
    address = registry_address(registry)
    check_registry(address)
    docker = check_engine(docker)
    inspect_image(tag, docker)
    name, version = split_reference(tag)
    remote = f"{address}/{repository or name}:{version}"
    _run([docker, "tag", tag, remote], f"docker tag {tag} {remote}")
    result = _run([docker, "push", remote], f"docker push {remote}")
    digest = parse_push_digest(result.stdout)
    if digest is None:
        repo = remote.rsplit(":", 1)[0]
        found = [d for d in inspect_image(remote, docker).get("RepoDigests") or [] if d.startswith(f"{repo}@")]
        digest = found[0].split("@", 1)[1] if found else None
    if digest is None:
        raise ImageError(f"docker push {remote} reported no digest, and the image has no digest for {address}")
    return digest


def pull_by_digest(repository: str, digest: str, docker: str | None = None) -> str:
    """``docker pull REPOSITORY@DIGEST``; returns the pulled image's id (``sha256:…``)."""
    if not DIGEST.fullmatch(digest):
        raise ImageError(f"{digest!r} is not a digest (sha256: and 64 hex digits)")
    address = repository.split("/", 1)[0]
    if "/" in repository and ("." in address or ":" in address or address == "localhost"):
        check_registry(address)
    docker = check_engine(docker)
    reference = f"{repository}@{digest}"
    result = subprocess.run([docker, "pull", reference], capture_output=True, text=True)
    if result.returncode != 0:
        output = tail(result.stderr + result.stdout, 3)
        if re.search(r"manifest unknown|not found|does not exist", output, re.IGNORECASE):
            raise ImageError(f"digest {digest} not found in {repository}: {output}")
        raise ImageError(f"docker pull {reference} failed: {output}")
    return inspect_image(reference, docker)["Id"]
