"""Fixtures for end-to-end tests: the real ``visionloop`` console script, run as a subprocess.

- ``cli``: a ``Cli`` whose home is ``<tmp_path>/home`` (passed as ``VISIONLOOP_HOME``) and whose
  working directory is ``tmp_path``; ``cli(*args)`` returns the CompletedProcess, ``cli.ok(*args)``
  also asserts exit 0, ``cli.json(*args)`` appends ``--json`` and parses stdout, ``cli.popen(*args)``
  starts it without waiting.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# the console script installed next to this interpreter; ``python -m visionloop.cli`` otherwise
_SCRIPT = Path(sys.executable).with_name("visionloop")
COMMAND = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "visionloop.cli"]


def _restore_sigint() -> None:
    # a child of a non-interactive shell may inherit SIGINT ignored; Python then never raises
    # KeyboardInterrupt, so give the command the default disposition, as a terminal would
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Cli:
    cwd: Path
    home: Path
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*COMMAND, *args], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self(*args)
        assert result.returncode == 0, f"visionloop {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
        return result

    def json(self, *args: str) -> Any:
        result = self.ok(*args, "--json")
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError:
            pytest.fail(f"visionloop {' '.join(args)} --json printed no single JSON object:\n{result.stdout}")

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*COMMAND, *args],
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_restore_sigint,
        )


def cli_env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VISIONLOOP_", "MLFLOW_")) and k not in ("FORCE_COLOR", "COLUMNS", "TERMINAL_WIDTH")
    }
    env["VISIONLOOP_HOME"] = str(home)
    return env


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    return Cli(cwd=tmp_path, home=home, env=cli_env(home))
