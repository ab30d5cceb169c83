"""What every benchmark prints: how busy the machine was, so a reader can trust or discount it."""

from __future__ import annotations

import os

from rich.console import Console


def print_load(console: Console, load_start: tuple[float, float, float]) -> tuple[float, float, float]:
    """Print the load before and now; returns the load now, for the JSON output."""
    load_end = os.getloadavg()
    busy = load_start[0] > 0.5  # before our own work started: someone else was using the cores
    console.print(
        f"load average (1 min): {load_start[0]:.2f} before this started, {load_end[0]:.2f} at the end "
        f"(ours included), {os.cpu_count()} logical cores"
        + ("  [yellow]— other processes were running: expect noisy figures[/]" if busy else "")
    )
    return load_end
