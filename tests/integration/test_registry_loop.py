"""The registry calls the closed loop makes, on a real MLflow SQLite store with real exported models: the gate by a
rule over several test sets (under the model's lock), a forced promotion, the rollback that moves nothing when the
champion already moved, a rolled-back version never promoted again, and the lookups a resumed run uses."""

from __future__ import annotations

import numpy as np
import pytest
from registry_stores import isolate, make_settings, register

from visionloop import registry
from visionloop.errors import RegistryError


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    isolate(monkeypatch)


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path)


def sets(digits_dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    x, y = digits_dataset.part("test")
    return {"original": (x, y), "small": (x[:50], y[:50])}


def better_everywhere(mine, theirs, champion):
    if theirs is None:
        return True, ["no champion to compare with"]
    ok = all(mine[k] > theirs[k] for k in mine)
    return ok, [f"{k}: {mine[k]:.3f} against {theirs[k]:.3f}" for k in mine]


def test_promote_by_rule_scores_both_on_every_set_and_records_it(settings, digits_dataset, weak_export, strong_export):
    weak = register(settings, weak_export).version
    first = registry.promote_by_rule(settings, weak, sets(digits_dataset), better_everywhere, "loop (test): ")
    assert first.promoted and first.champion_version is None and set(first.challenger) == {"original", "small"}
    strong = register(settings, strong_export).version
    decision = registry.promote_by_rule(settings, strong, sets(digits_dataset), better_everywhere, "loop (test): ")
    assert decision.promoted and decision.champion_version == weak
    assert decision.champion["original"] < decision.challenger["original"]
    assert registry.alias_version(settings, registry.CHAMPION) == strong
    tags = registry.version_tags(settings, strong)
    assert tags["gate.decision"] == "promoted" and "original" in tags["gate.challenger"]
    event = registry.last_event(settings, strong, "promote")
    assert event is not None and event.from_version == weak and event.reason.startswith("loop (test): original:")
    # asked again (a retry after a crash): reported as promoted, nothing moves
    again = registry.promote_by_rule(settings, strong, sets(digits_dataset), better_everywhere)
    assert again.promoted and again.reasons == [f"v{strong} is already the champion"]
    assert len(registry.history(settings)) == 2
    # the weak one does not beat it: refused, recorded, champion unchanged
    weaker = register(settings, weak_export).version
    refused = registry.promote_by_rule(settings, weaker, sets(digits_dataset), better_everywhere)
    assert not refused.promoted and registry.version_tags(settings, weaker)["gate.decision"] == "rejected"
    assert registry.alias_version(settings, registry.CHAMPION) == strong


def test_forced_promotion_rollback_and_no_second_chance(settings, digits_dataset, weak_export, strong_export):
    strong = register(settings, strong_export).version
    registry.promote_by_rule(settings, strong, sets(digits_dataset), better_everywhere)
    weak = register(settings, weak_export).version
    event = registry.force_champion(settings, weak, "operator override")
    assert (event.kind, event.from_version, event.to_version) == ("promote", strong, weak)
    assert event.reason == "forced: operator override"
    with pytest.raises(RegistryError, match="already the champion"):
        registry.force_champion(settings, weak, "again")
    with pytest.raises(RegistryError, match="has no version 99"):
        registry.force_champion(settings, "99", "missing")
    back = registry.rollback_version(settings, weak, "analysis failed")
    assert back is not None and (back.kind, back.to_version) == ("rollback", strong)
    assert registry.rollback_version(settings, weak, "retried after a crash") is None  # nothing moves twice
    assert registry.alias_version(settings, registry.CHAMPION) == strong
    assert registry.version_tags(settings, weak)["rolled_back"] == "true"

    def always(mine, theirs, champion):
        return True, ["the rule would promote it"]

    decision = registry.promote_by_rule(settings, weak, sets(digits_dataset), always)
    assert not decision.promoted and "rolled back before" in decision.reasons[0]
    assert registry.alias_version(settings, registry.CHAMPION) == strong


def test_lookups_of_a_resumed_run(settings, weak_export):
    registered = register(settings, weak_export)
    registry.tag_run(settings, registered.run_id, {"visionloop.loop_run": "lr-test"})
    assert registry.runs_tagged(settings, "visionloop.loop_run", "lr-test") == [(registered.run_id, "FINISHED")]
    assert registry.runs_tagged(settings, "visionloop.loop_run", "lr-other") == []
    assert registry.version_of_run(settings, registered.run_id) == registered.version
    assert registry.version_of_run(settings, "0" * 32) is None
