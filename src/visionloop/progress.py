"""Progress bars for long loops, on stderr, only when there is enough work to be worth one."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

from rich.console import Console
from rich.progress import track

T = TypeVar("T")
MIN_ITEMS = 500  # below this a loop ends before a bar would be read
_stderr = Console(stderr=True)


def progress(items: Iterable[T], description: str, enabled: bool = True) -> Iterator[T]:
    total = len(items) if isinstance(items, Sized) else None
    show = enabled and (total is None or total >= MIN_ITEMS)
    yield from track(items, description=description, total=total, disable=not show, console=_stderr, transient=True)
