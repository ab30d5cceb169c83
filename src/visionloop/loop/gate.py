"""The loop's gate: challenger and champion scored on two test sets, and the rule that says how both count.

- the *original* test set: the base dataset's test split, which no retrain ever trains on. The challenger
  must clear ``gate.min_accuracy`` on it, and may be at most ``loop.old_test_tolerance`` worse than the
  champion there. This is what stops poisoned labels: a model retrained into something worse on the
  curated data is refused, however well it fits the labels it was fed;
- the *production* slice: labelled production images held out of training (``retrain.held_out``). The
  challenger must beat the champion on it by more than 0 and by at least ``loop.min_production_gain``,
  on at least ``loop.min_production_test`` images: a retrain is only worth promoting if it serves the
  traffic better.

Both scores of both models are reported, in the decision, the loop's history and the version's tags.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionloop.config import Settings
from visionloop.registry import Rule, RuleDecision

ORIGINAL, PRODUCTION = "original", "production"


def two_set_rule(settings: Settings, production_images: int) -> Rule:
    """The rule ``registry.promote_by_rule`` applies under the model's lock."""
    loop, gate = settings.loop, settings.gate

    def rule(mine: dict[str, float], theirs: dict[str, float] | None, champion: str | None) -> tuple[bool, list[str]]:
        old = mine[ORIGINAL]
        if old < gate.min_accuracy:
            return False, [f"original test set: {old:.4f} is below the floor {gate.min_accuracy:.4f}"]
        reasons = [f"original test set: {old:.4f} clears the floor {gate.min_accuracy:.4f}"]
        if champion is None:
            return True, [*reasons, "there is no champion yet"]
        if theirs is None:
            return True, [
                *reasons,
                f"champion v{champion} cannot be scored on these test sets (other input or classes)",
            ]
        drop = theirs[ORIGINAL] - old
        if drop > loop.old_test_tolerance + 1e-9:
            return False, [
                *reasons,
                f"original test set: {drop:.4f} worse than champion v{champion} ({theirs[ORIGINAL]:.4f}), beyond the "
                f"tolerance {loop.old_test_tolerance:.4f}",
            ]
        reasons.append(
            f"original test set: within {loop.old_test_tolerance:.4f} of champion v{champion} ({theirs[ORIGINAL]:.4f})"
        )
        if production_images < loop.min_production_test:
            return False, [
                *reasons,
                f"production slice: {production_images} held-out images, fewer than loop.min_production_test "
                f"({loop.min_production_test})",
            ]
        gain = mine[PRODUCTION] - theirs[PRODUCTION]
        if gain > 0 and gain >= loop.min_production_gain - 1e-9:
            return True, [
                *reasons,
                f"production slice ({production_images} images): {mine[PRODUCTION]:.4f} beats champion v{champion} "
                f"({theirs[PRODUCTION]:.4f}) by {gain:+.4f}",
            ]
        return False, [
            *reasons,
            f"production slice ({production_images} images): {mine[PRODUCTION]:.4f} against champion v{champion} "
            f"({theirs[PRODUCTION]:.4f}), {gain:+.4f}; promotion needs a gain > 0 and >= {loop.min_production_gain:.4f}",
        ]

    return rule


def judge(
    settings: Settings, version: str, base_dataset_dir: Path, slice_dir: Path, reason: str
) -> tuple[RuleDecision, int]:
    """Score the challenger ``version`` and the champion on both test sets; promote if the rule passes.
    Returns the decision and the number of production-slice images."""
    from visionloop import registry
    from visionloop.data.preprocess import load_dataset
    from visionloop.loop.retrain import load_slice

    base = load_dataset(base_dataset_dir)
    x_old, y_old = base.part("test")
    m = base.manifest
    x_prod, y_prod = load_slice(slice_dir, m.classes, m.image_size, m.channels)
    test_sets: dict[str, tuple[np.ndarray, np.ndarray]] = {ORIGINAL: (x_old, y_old)}
    if len(y_prod):
        test_sets[PRODUCTION] = (x_prod, y_prod)
    # with an empty slice the rule refuses (or promotes over no champion) before it reads a production score
    rule = two_set_rule(settings, len(y_prod))
    decision = registry.promote_by_rule(settings, version, test_sets, rule, f"loop ({reason}): ", "loop.gate")
    return decision, len(y_prod)
