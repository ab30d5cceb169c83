"""``visionloop images``: the container images, from wheels on the host to a registry (``images.py`` does the work)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from visionloop.console import JsonOpt, console, err, print_json
from visionloop.delivery import images

HELP = """Container images: build the serving and the training image, push them to a registry.

The order, from a clone of the repository:

  1. [bold]visionloop images wheelhouse[/]   wheels of every package the images install, made on this machine
  2. [bold]visionloop images base[/]         only without a public registry: a Debian base from debootstrap
  3. [bold]visionloop images build[/]        docker build of deploy/docker/{serve,train}.Dockerfile, offline
  4. [bold]visionloop images push[/]         to a registry (a local one: deploy/docker/registry.yml)
  5. [bold]visionloop images sizes[/]        both images' sizes side by side

visionloop-serve (the core install: serve, monitor, loop; no torch) and visionloop-train (core + the train extra:
run, train, torchrun, mlflow server) are tagged with the package version. Every step fails with one line that
says what went wrong and where. See deploy/docker/README.md.

Examples:

  visionloop images wheelhouse && visionloop images build && visionloop images sizes

  visionloop images base && visionloop images build --base-image visionloop-base:bookworm

  visionloop images push --registry 127.0.0.1:5000
"""

app = typer.Typer(help=HELP, no_args_is_help=True, rich_markup_mode="rich")

KindOpt = Annotated[str, typer.Option("--kind", help="Which image: serve, train or all (both).", case_sensitive=False)]
WheelhouseOpt = Annotated[
    Path | None,
    typer.Option(
        "--wheelhouse",
        help="Folder holding one wheelhouse per image (<folder>/serve, <folder>/train); "
        "default .visionloop/wheelhouse in the checkout.",
    ),
]
TagOpt = Annotated[
    str | None,
    typer.Option("--tag", help="Image tag (only with one --kind); default visionloop-<kind>:<version>."),
]


def _kinds(kind: str) -> list[images.Kind]:
    kind = kind.lower()
    if kind == "all":
        return list(images.KINDS)
    return [images.check_kind(kind)]


def _tags(kinds: list[images.Kind], tag: str | None) -> dict[images.Kind, str]:
    if tag is not None and len(kinds) != 1:
        raise images.ImageError("--tag names one image: give --kind serve or --kind train with it")
    return {kind: tag or images.default_tag(kind) for kind in kinds}


def _wheelhouse_root(folder: Path | None) -> Path:
    return folder if folder is not None else images.project_root() / ".visionloop" / "wheelhouse"


@contextmanager
def _progress(title: str) -> Iterator[images.Progress]:
    """A spinner for the long steps, and each step's line kept above it."""
    with err.status(escape(title)) as status:

        def progress(message: str) -> None:
            err.print(f"  {escape(message)}", style="dim", highlight=False)
            status.update(escape(message))

        yield progress


@app.command("wheelhouse")
def wheelhouse_cmd(
    kind: KindOpt = "all",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Folder for the wheelhouses (<folder>/<kind>); default .visionloop/wheelhouse."
        ),
    ] = None,
    python_version: Annotated[
        str | None,
        typer.Option(help="Wheels for this Python (e.g. 3.11) instead of this machine's: the image's interpreter."),
    ] = None,
    platform: Annotated[
        str | None,
        typer.Option(
            help="Wheels for this platform tag instead of this machine's, e.g. manylinux_2_35_x86_64 for an Ubuntu "
            "22.04 base (glibc 2.35); older manylinux wheels are taken too."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every Python package an image installs, as wheels on this machine (run it before `build`).

    The visionloop wheel (pip wheel --no-deps) and each dependency of the image (serve: the core install; train:
    core + the train extra) at the exact version constraints.txt pins, downloaded as wheels (pip download,
    binary only; the few published only as source are built here). The image then installs with
    pip install --no-index, so its build needs no network. A wheelhouse with the same constraints is reused:
    only the visionloop wheel is rebuilt. Uses pip's own configuration (index, find-links, certificates).
    """
    root = _wheelhouse_root(output)
    done = {}
    for one in _kinds(kind):
        started = time.monotonic()
        with _progress(f"wheelhouse for the {one} image") as progress:
            path = images.wheelhouse(
                one, root / one, python_version=python_version, platform=platform, progress=progress
            )
        marker = images.read_marker(path) or {}
        size = sum(p.stat().st_size for p in path.glob("*.whl"))
        done[one] = {
            "path": str(path),
            "wheels": len(marker.get("files", [])),
            "bytes": size,
            "seconds": round(time.monotonic() - started, 1),
        }
    if as_json:
        print_json(done)
        return
    for one, row in done.items():
        console.print(
            f"{one}: {row['wheels']} wheels, {images.format_size(row['bytes'])} in {row['path']} ({row['seconds']} s)",
            highlight=False,
        )


@app.command("base")
def base_cmd(
    tag: Annotated[str, typer.Option(help="Tag of the base image.")] = images.BASE_TAG,
    suite: Annotated[str, typer.Option(help="Debian release to bootstrap (its python3 must be 3.11).")] = "bookworm",
    mirror: Annotated[
        str | None, typer.Option(help="Debian mirror URL; default the one apt uses here (/etc/apt/sources.list.d).")
    ] = None,
) -> None:
    """A base image without any registry: Debian minbase + python3, python3-venv, ca-certificates.

    Only for machines that reach no public registry (python:3.11-slim-bookworm and nvidia/cuda, the Dockerfiles'
    defaults, cannot be pulled): debootstrap --variant=minbase into a folder, then docker import. Then build with
    --base-image TAG. Needs root, debootstrap and a running Docker engine; kept when TAG exists (about 40 s
    otherwise).
    """
    with _progress(f"base image {tag}") as progress:
        images.base_image(tag, suite, mirror=mirror, progress=progress)
    console.print(f"{tag}: {images.format_size(images.image_size(tag))}", highlight=False)


@app.command("build")
def build_cmd(
    kind: KindOpt = "all",
    base_image: Annotated[
        str | None,
        typer.Option(
            "--base-image",
            help="Base image (build arg BASE_IMAGE): any image with python3.11 and venv; default the Dockerfile's "
            "(python:3.11-slim-bookworm for serve, a CUDA runtime image for train). "
            "Offline: `visionloop images base` and visionloop-base:bookworm.",
        ),
    ] = None,
    tag: TagOpt = None,
    wheelhouse: WheelhouseOpt = None,
    network: Annotated[
        str,
        typer.Option(
            help="Network of the build's RUN steps: none (default: proves the build needs none), host, or default "
            "(the CUDA base needs apt for python3.11)."
        ),
    ] = "none",
    as_json: JsonOpt = False,
) -> None:
    """docker build of deploy/docker/<kind>.Dockerfile from the wheelhouse (make it first: `images wheelhouse`).

    The build context holds only the Dockerfile and the wheels (no .git, no .venv); build args
    VERSION (the package version), REVISION (git rev-parse HEAD) and SOURCE fill the OCI labels. Works with the
    legacy builder (no BuildKit or buildx needed).
    """
    kinds = _kinds(kind)
    tags = _tags(kinds, tag)
    root = _wheelhouse_root(wheelhouse)
    for one in kinds:  # every wheelhouse is checked before the first build starts
        images.check_wheelhouse((root / one).resolve(), one)
    built = []
    for one in kinds:
        with _progress(f"building {tags[one]}") as progress:
            built.append(images.build(one, tags[one], base_image, root / one, network=network, progress=progress))
        if not as_json:
            info = built[-1]
            console.print(
                f"built {info.tag} ({info.id[:19]}): {images.format_size(info.size)} in {info.seconds:.0f} s",
                highlight=False,
            )
    if as_json:
        print_json([info.to_dict() for info in built])


@app.command("push")
def push_cmd(
    registry: Annotated[
        str, typer.Option(help="Registry address HOST[:PORT]; 127.0.0.1:5000 is deploy/docker/registry.yml's.")
    ] = images.LOCAL_REGISTRY,
    kind: KindOpt = "all",
    tag: TagOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Push the built images to a registry; prints each one's digest (pull it back with REGISTRY/NAME@DIGEST).

    The address is checked first (GET /v2/): a wrong one fails at once with the reason, not after docker's retries.
    A registry that wants a login: `docker login` first. Start the local one with
    `docker-registry serve deploy/docker/registry.yml`.
    """
    kinds = _kinds(kind)
    tags = _tags(kinds, tag)
    address = images.registry_address(registry)
    images.check_registry(address)
    pushed = []
    for one in kinds:
        with _progress(f"pushing {tags[one]} to {address}"):
            digest = images.push(tags[one], address)
        name, _ = images.split_reference(tags[one])
        pushed.append({"kind": one, "tag": tags[one], "repository": f"{address}/{name}", "digest": digest})
        if not as_json:
            console.print(f"{tags[one]} → {address}/{name}@{digest}", highlight=False)
    if as_json:
        print_json(pushed)


@app.command("sizes")
def sizes_cmd(
    serve_tag: Annotated[
        str | None, typer.Option("--serve", help="Serving image (default visionloop-serve:<version>).")
    ] = None,
    train_tag: Annotated[
        str | None, typer.Option("--train", help="Training image (default visionloop-train:<version>).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Both images' sizes side by side, and the serving image as a fraction of the training image."""
    serve = serve_tag or images.default_tag("serve")
    train = train_tag or images.default_tag("train")
    docker = images.check_engine()
    sizes = {serve: images.image_size(serve, docker), train: images.image_size(train, docker)}
    share = sizes[serve] / sizes[train]
    if as_json:
        print_json({"serve": {"tag": serve, "bytes": sizes[serve]}, "train": {"tag": train, "bytes": sizes[train]},
                    "serve_fraction_of_train": round(share, 4)})  # fmt: skip
        return
    table = Table(title="image sizes", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column(serve, justify="right")
    table.add_column(train, justify="right")
    table.add_column("serve / train", justify="right")
    table.add_row(images.format_size(sizes[serve]), images.format_size(sizes[train]), f"{share:.1%}")
    console.print(table)
