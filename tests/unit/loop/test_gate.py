"""The loop's two-test-set rule: the floor and the tolerance on the original test set, then the gain on the
held-out production slice, each decision with reasons that name the numbers it was made on.
(``gate.judge`` scores real models: the integration tests of the loop run it.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from visionloop.config import Settings
from visionloop.loop.gate import ORIGINAL, PRODUCTION, two_set_rule


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("VISIONLOOP_") or name == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def settings(tmp_path: Path, **loop: object) -> Settings:
    values = {"old_test_tolerance": 0.01, "min_production_gain": 0.0, "min_production_test": 15, **loop}
    return Settings(home=tmp_path / "home", gate={"min_accuracy": 0.9}, loop=values)


def scores(original: float, production: float) -> dict[str, float]:
    return {ORIGINAL: original, PRODUCTION: production}


def names(reasons: list[str], *numbers: float) -> bool:
    text = " | ".join(reasons)
    return all(f"{n:.4f}" in text for n in numbers)


def test_below_the_floor_is_refused_before_anything_else(tmp_path):
    rule = two_set_rule(settings(tmp_path), production_images=100)
    promoted, reasons = rule(scores(0.8912, 0.99), scores(0.95, 0.1), "3")
    assert not promoted
    assert reasons == ["original test set: 0.8912 is below the floor 0.9000"]
    promoted, reasons = rule(scores(0.8912, 0.99), None, None)  # not even over no champion
    assert not promoted and "below the floor" in reasons[0]


def test_over_no_champion_the_floor_is_enough(tmp_path):
    rule = two_set_rule(settings(tmp_path), production_images=0)  # no production slice needed either
    promoted, reasons = rule(scores(0.9312, 0.0), None, None)
    assert promoted
    assert reasons == ["original test set: 0.9312 clears the floor 0.9000", "there is no champion yet"]


def test_a_champion_that_cannot_be_scored_is_replaced(tmp_path):
    rule = two_set_rule(settings(tmp_path), production_images=0)
    promoted, reasons = rule(scores(0.9312, 0.0), None, "4")
    assert promoted
    assert names(reasons, 0.9312) and "champion v4 cannot be scored" in reasons[-1]


def test_worse_on_the_original_test_set_beyond_the_tolerance_is_refused(tmp_path):
    rule = two_set_rule(settings(tmp_path), production_images=100)
    promoted, reasons = rule(scores(0.9312, 1.0), scores(0.9500, 0.2), "2")  # 0.0188 worse; production far better
    assert not promoted
    assert "0.0188 worse than champion v2 (0.9500)" in reasons[-1] and "tolerance 0.0100" in reasons[-1]
    assert names(reasons, 0.9312, 0.9500)
    assert not any("production" in r for r in reasons)  # refused before the production slice is read


def test_exactly_at_the_tolerance_is_not_refused_for_it(tmp_path):
    rule = two_set_rule(settings(tmp_path), production_images=20)
    promoted, reasons = rule(scores(0.94, 0.90), scores(0.95, 0.80), "2")  # 0.01 worse: at the tolerance
    assert promoted
    assert "original test set: within 0.0100 of champion v2 (0.9500)" in reasons
    assert not any("beyond the tolerance" in r for r in reasons)
    tighter = two_set_rule(settings(tmp_path, old_test_tolerance=0.0099), production_images=20)
    promoted, why = tighter(scores(0.94, 0.90), scores(0.95, 0.80), "2")
    assert not promoted and "beyond the tolerance 0.0099" in why[-1]


def test_better_on_the_original_test_set_is_within_the_tolerance(tmp_path):
    rule = two_set_rule(settings(tmp_path), production_images=20)
    promoted, reasons = rule(scores(0.99, 0.90), scores(0.92, 0.80), "2")
    assert promoted and "within 0.0100 of champion v2 (0.9200)" in reasons[1]


def test_too_few_production_images_is_refused(tmp_path):
    rule = two_set_rule(settings(tmp_path), production_images=14)
    promoted, reasons = rule(scores(0.95, 1.0), scores(0.95, 0.1), "2")
    assert not promoted
    assert "14 held-out images, fewer than loop.min_production_test (15)" in reasons[-1]
    assert names(reasons, 0.95)
    assert two_set_rule(settings(tmp_path), production_images=15)(scores(0.95, 1.0), scores(0.95, 0.1), "2")[0]


@pytest.mark.parametrize("challenger, champion", [(0.80, 0.80), (0.75, 0.80)], ids=["equal", "worse"])
def test_no_gain_on_the_production_slice_is_refused(tmp_path, challenger, champion):
    rule = two_set_rule(settings(tmp_path), production_images=30)  # min_production_gain 0: still needs > 0
    promoted, reasons = rule(scores(0.95, challenger), scores(0.95, champion), "2")
    assert not promoted
    assert f"{challenger - champion:+.4f}; promotion needs a gain > 0 and >= 0.0000" in reasons[-1]
    assert "production slice (30 images)" in reasons[-1]


def test_a_gain_below_min_production_gain_is_refused(tmp_path):
    rule = two_set_rule(settings(tmp_path, min_production_gain=0.05), production_images=30)
    promoted, reasons = rule(scores(0.95, 0.8400), scores(0.95, 0.8000), "2")
    assert not promoted and "+0.0400; promotion needs a gain > 0 and >= 0.0500" in reasons[-1]


def test_a_gain_of_min_production_gain_or_more_is_promoted(tmp_path):
    rule = two_set_rule(settings(tmp_path, min_production_gain=0.05), production_images=30)
    promoted, reasons = rule(scores(0.9450, 0.8500), scores(0.9500, 0.8000), "2")  # exactly the gain
    assert promoted
    assert reasons[-1] == "production slice (30 images): 0.8500 beats champion v2 (0.8000) by +0.0500"
    assert rule(scores(0.95, 0.9), scores(0.95, 0.8), "2")[0]


@pytest.mark.parametrize(
    "mine, theirs, images",
    [
        pytest.param(scores(0.9312, 0.8667), scores(0.9375, 0.7333), 30, id="promoted"),
        pytest.param(scores(0.9312, 0.7333), scores(0.9375, 0.8667), 30, id="refused-on-production"),
    ],
)
def test_a_decision_on_both_sets_names_both_models_scores_on_both(tmp_path, mine, theirs, images):
    _, reasons = two_set_rule(settings(tmp_path), images)(mine, theirs, "2")
    assert names(reasons, mine[ORIGINAL], theirs[ORIGINAL], mine[PRODUCTION], theirs[PRODUCTION])
    assert any(r.startswith("original test set") for r in reasons)
    assert any(r.startswith("production slice") for r in reasons)


def test_every_reason_list_names_the_scores_it_was_decided_on(tmp_path):
    """Whatever the outcome, the challenger's original score is named, the champion's wherever compared."""
    cases = [
        (settings(tmp_path), 30, scores(0.8888, 0.5), scores(0.9444, 0.4), [0.8888]),  # floor
        (settings(tmp_path), 30, scores(0.9111, 0.5), None, [0.9111]),  # not comparable
        (settings(tmp_path), 30, scores(0.9111, 0.5), scores(0.9444, 0.4), [0.9111, 0.9444]),  # tolerance
        (settings(tmp_path), 3, scores(0.9411, 0.5), scores(0.9444, 0.4), [0.9411, 0.9444]),  # too few images
        (settings(tmp_path), 30, scores(0.9411, 0.3), scores(0.9444, 0.4), [0.9411, 0.9444, 0.3, 0.4]),  # gain
        (settings(tmp_path), 30, scores(0.9411, 0.5), scores(0.9444, 0.4), [0.9411, 0.9444, 0.5, 0.4]),  # promote
    ]
    for config, images, mine, theirs, numbers in cases:
        _, reasons = two_set_rule(config, images)(mine, theirs, "2")
        assert reasons and names(reasons, *numbers), reasons
