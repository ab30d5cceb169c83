"""The loop's durable state on a real SQLite file: runs (create, update and merge, the read side) and the
lease lock (two holders, expiry, renewal, release, ``held()``, eight racing threads), and a store that
cannot be opened. The lock race on PostgreSQL is tests/integration/loop/test_state_postgres.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from visionloop.loop.state import LoopBusy, LoopState, StoreError


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'predictions.db'}"


@pytest.fixture
def state(url: str) -> Iterator[LoopState]:
    s = LoopState(url, timeout=5, holder="loop-a")
    yield s
    s.close()


@pytest.fixture
def other(url: str) -> Iterator[LoopState]:
    s = LoopState(url, timeout=5, holder="loop-b")
    yield s
    s.close()


def wait_until_expired(state: LoopState, name: str) -> None:
    """Sleep until the lease's expiry has passed on this clock (bounded: the test fails rather than hangs)."""
    deadline = time.monotonic() + 10
    while (found := state.lock_holder(name)) is not None and found[1] >= time.time():
        assert time.monotonic() < deadline, "the lease did not expire"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------- runs
def test_a_run_is_created_updated_and_merged(state, other):
    run = state.create_run("pets", "alert", "VisionloopDrift firing", {"alert": "VisionloopDrift", "n": 1})
    assert run.id.startswith("lr-") and len(run.id) == len("lr-20261202-031501-3fa2c1")
    assert (run.phase, run.result, run.finished_at, run.owner, run.done) == ("triggered", None, None, "loop-a", False)
    assert state.get_run(run.id) == run

    building = other.update_run(run.id, phase="building", data={"dataset": "ds-1", "n": 2})
    assert building.phase == "building" and building.owner == "loop-b"
    assert building.data == {"alert": "VisionloopDrift", "n": 2, "dataset": "ds-1"}  # merged, top-level keys
    assert building.updated_at >= run.updated_at and building.finished_at is None

    done = state.update_run(run.id, phase="done", result="promoted", data={"version": "7"})
    assert done.done and done.result == "promoted" and done.finished_at is not None
    assert done.data == {"alert": "VisionloopDrift", "n": 2, "dataset": "ds-1", "version": "7"}
    stored = other.get_run(run.id)
    assert stored == done
    assert stored.to_dict()["data"]["version"] == "7" and stored.to_dict()["phase"] == "done"

    later = state.update_run(run.id, data={"note": "analysed"})  # the first finish time stays
    assert later.finished_at == done.finished_at and later.result == "promoted"


def test_a_result_needs_phase_done_and_unknown_runs_are_refused(state):
    run = state.create_run("pets", "manual", "by hand")
    with pytest.raises(ValueError, match="phase done"):
        state.update_run(run.id, result="kept")
    with pytest.raises(ValueError, match="phase done"):
        state.update_run(run.id, phase="training", result="kept")
    assert state.get_run(run.id).phase == "triggered"  # the refused update wrote nothing
    with pytest.raises(ValueError, match="unknown loop phase"):
        state.update_run(run.id, phase="gating")
    with pytest.raises(ValueError, match="unknown loop trigger"):
        state.create_run("pets", "cron", "no such trigger")
    with pytest.raises(StoreError, match="no loop run lr-missing"):
        state.update_run("lr-missing", phase="done")
    assert state.get_run("lr-missing") is None


def test_runs_unfinished_and_last_run(state):
    alert = state.create_run("pets", "alert", "drift")
    schedule = state.create_run("pets", "schedule", "nightly")
    manual = state.create_run("pets", "manual", "by hand")
    state.create_run("cars", "alert", "another model")
    state.update_run(schedule.id, phase="done", result="kept")

    assert [r.id for r in state.runs("pets")] == [manual.id, schedule.id, alert.id]  # newest first
    assert [r.id for r in state.runs("pets", limit=2)] == [manual.id, schedule.id]
    assert [r.id for r in state.runs("pets", since=schedule.created_at)] == [manual.id, schedule.id]
    assert [r.id for r in state.unfinished("pets")] == [alert.id, manual.id]  # oldest first
    assert state.last_run("pets").id == manual.id
    assert state.last_run("pets", triggers=("alert", "schedule")).id == schedule.id
    assert state.last_run("pets", triggers=("alert",)).id == alert.id
    assert state.last_run("pets", finished_only=True).id == schedule.id
    assert state.last_run("pets", triggers=("alert",), finished_only=True) is None
    assert state.last_run("boats") is None and state.runs("boats") == []


# ------------------------------------------------------------------------------------------- the lock
def test_only_one_holder_acquires_and_the_other_takes_it_after_expiry(state, other):
    assert state.acquire("retrain", 0.2)
    assert not other.acquire("retrain", 0.2)
    assert state.lock_holder("retrain")[0] == "loop-a"
    wait_until_expired(other, "retrain")
    assert other.acquire("retrain", 30)
    assert other.lock_holder("retrain")[0] == "loop-b"
    assert not state.renew("retrain", 30)  # lost: renewing says so
    assert not state.acquire("retrain", 30)


def test_re_acquiring_ones_own_lock_renews_it(state, other):
    assert state.acquire("retrain", 30)
    _, first = state.lock_holder("retrain")
    assert state.acquire("retrain", 300)
    holder, renewed = state.lock_holder("retrain")
    assert holder == "loop-a" and renewed > first + 200
    assert state.renew("retrain", 600) and state.lock_holder("retrain")[1] > renewed
    assert not other.renew("retrain", 600)  # not its lease


def test_only_the_holder_releases(state, other):
    assert state.acquire("retrain", 30)
    other.release("retrain")
    assert state.lock_holder("retrain")[0] == "loop-a"
    state.release("retrain")
    assert state.lock_holder("retrain") is None
    assert other.acquire("retrain", 30)


def test_held_refuses_while_another_holds_and_releases_on_exit(state, other):
    with state.held("retrain", 30) as check:
        check()
        with pytest.raises(LoopBusy, match="held by loop-a until 20"), other.held("retrain", 30):
            pass
        check()  # the refused attempt did not disturb our lease
    assert state.lock_holder("retrain") is None

    with pytest.raises(RuntimeError, match="inside"), other.held("retrain", 30):
        raise RuntimeError("inside")
    assert state.lock_holder("retrain") is None  # released on the exception too
    assert state.acquire("retrain", 30)


def test_held_renews_the_lease_and_check_reports_it_lost(state, other):
    with state.held("retrain", 0.6) as check:
        _, first = state.lock_holder("retrain")
        deadline = time.monotonic() + 10
        while state.lock_holder("retrain")[1] == first:  # the renewal thread pushes the expiry on
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.02)
        assert not other.acquire("retrain", 30)
        check()
        state.release("retrain")  # as if it expired and someone else took it
        assert other.acquire("retrain", 30)
        deadline = time.monotonic() + 10
        while True:
            try:
                check()
            except LoopBusy as busy:
                assert "was lost by loop-a" in str(busy)
                break
            assert time.monotonic() < deadline, "check() never noticed the lost lease"
            time.sleep(0.05)
    assert other.lock_holder("retrain")[0] == "loop-b"  # our exit did not release their lease


def test_eight_threads_racing_acquire_get_exactly_one_lock(url):
    states = [LoopState(url, timeout=10, holder=f"racer-{i}") for i in range(8)]
    start = threading.Barrier(len(states))
    results: dict[str, bool | BaseException] = {}

    def race(s: LoopState) -> None:
        start.wait()
        try:
            results[s.holder] = s.acquire("retrain", 60)
        except BaseException as exc:
            results[s.holder] = exc

    threads = [threading.Thread(target=race, args=(s,)) for s in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert sorted(map(str, results.values())) == ["False"] * 7 + ["True"], results
        winner = next(h for h, won in results.items() if won is True)
        assert states[0].lock_holder("retrain")[0] == winner
    finally:
        for s in states:
            s.close()


# ------------------------------------------------------------------------------------------- outages
def test_an_unreachable_store_gives_a_clear_error(tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    state = LoopState(f"sqlite:///{tmp_path / 'file.txt' / 'x.db'}", timeout=1)
    with pytest.raises(StoreError) as caught:
        state.create_run("pets", "manual", "by hand")
    message = str(caught.value)
    assert message.startswith("loop state in store sqlite:///") and "file.txt/x.db cannot be reached" in message
    assert "unable to open database file" in message and "sqlalche.me" not in message
    with pytest.raises(StoreError, match="cannot be reached"):
        state.acquire("retrain", 30)
    state.close()


def test_marks_are_remembered_across_processes_and_overwritten(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    first, second = LoopState(url, holder="a"), LoopState(url, holder="b")
    assert first.mark("champion_event_seq:m") is None
    first.set_mark("champion_event_seq:m", "3")
    assert second.mark("champion_event_seq:m") == "3"
    second.set_mark("champion_event_seq:m", "4")
    assert first.mark("champion_event_seq:m") == "4" and first.mark("other") is None
    first.close()
    second.close()
