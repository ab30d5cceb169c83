"""What every ``visionloop`` command shares: the consoles, the global options' state, settings from flags.

``cli.py`` defines the app; ``pipeline/commands.py`` generates the stage commands and ``run`` from the
dataflow declaration. Both build their settings here, so every entry point resolves them the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from visionloop.config import Settings, load_settings
from visionloop.config import describe as describe_setting
from visionloop.errors import VisionloopError

# soft_wrap: long paths and commands stay on one line when output goes to a file or a pipe
console = Console(stderr=False, soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

# the global options (--config, --home) of this invocation, set by the app's callback
STATE: dict[str, Path | None] = {"config": None, "home": None}


def describe(dotted: str) -> str:
    # help texts are rendered as rich markup, which would swallow "[setting …, env …, default …]"
    return escape(describe_setting(dotted))


SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Any setting as KEY=VALUE, e.g. --set train.patience=5 (repeatable)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables (for scripts and CI).")]


def _parse_set(pairs: list[str] | None) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise VisionloopError(f"--set expects KEY=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw else ""
    return out


def settings_from(sets: list[str] | None = None, **flags: Any) -> Settings:
    """Settings from the file, the environment, ``--set`` pairs and flags (``{"train.epochs": 5}``; None = unset)."""
    overrides = {**_parse_set(sets), **{k: v for k, v in flags.items() if v is not None}}
    if STATE["home"] is not None:
        overrides.setdefault("home", STATE["home"])
    return load_settings(STATE["config"], overrides)


def print_json(obj: Any) -> None:
    console.print_json(json.dumps(obj, default=str))
