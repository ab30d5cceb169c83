"""What tests need to run real processes on 127.0.0.1, imported as a plain module (tests/ is on sys.path)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

_SCRIPT = Path(sys.executable).with_name("visionloop")
# the installed console script, or the module when the venv has none (an editable install without scripts)
VISIONLOOP = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "visionloop.cli"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now: for a server to start on, or to find closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
