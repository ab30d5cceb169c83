"""The progress helper yields every item, in order, whether or not a bar is drawn."""

from __future__ import annotations

import pytest

from visionloop.progress import MIN_ITEMS, progress


@pytest.mark.parametrize("count", [0, 3, MIN_ITEMS, MIN_ITEMS + 7])
@pytest.mark.parametrize("enabled", [True, False])
def test_progress_yields_every_item_in_order(count: int, enabled: bool, capsys: pytest.CaptureFixture[str]) -> None:
    items = list(range(count))
    assert list(progress(items, "work", enabled)) == items
    assert capsys.readouterr().out == ""  # bars go to stderr, never into output a script parses


def test_progress_takes_iterators_without_a_length() -> None:
    assert list(progress(iter(range(5)), "work")) == [0, 1, 2, 3, 4]
