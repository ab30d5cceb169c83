"""The loop lock on a real PostgreSQL server: two holders race for it, one wins, the other takes it once the
lease expires. The rest of the contract is tests/unit/loop/test_state.py, on SQLite.

PostgreSQL comes from ``registry_stores.postgres_database`` (initdb + postgres on 127.0.0.1, torn down after
the module). Without the server binaries the module skips, and fails when CI=true.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from registry_stores import postgres_database  # tests/integration is on sys.path (no __init__.py)

from visionloop.loop.state import LoopState


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    with postgres_database() as url:
        yield url


def test_two_holders_race_for_the_lock_and_the_loser_takes_it_after_expiry(postgres):
    states = [LoopState(postgres, timeout=10, holder=f"loop-{i}") for i in range(2)]
    try:
        for _ in range(5):  # a few rounds: each starts both racers at once on a free lock
            start = threading.Barrier(2)
            won: dict[str, bool] = {}

            def race(s: LoopState, start: threading.Barrier = start, won: dict[str, bool] = won) -> None:
                start.wait()
                won[s.holder] = s.acquire("retrain", 0.3)

            threads = [threading.Thread(target=race, args=(s,)) for s in states]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert sorted(won.values()) == [False, True], won
            winner = next(s for s in states if won[s.holder])
            loser = next(s for s in states if not won[s.holder])
            assert loser.lock_holder("retrain")[0] == winner.holder
            assert not loser.renew("retrain", 30)

            deadline = time.monotonic() + 10
            while not loser.acquire("retrain", 30):  # free once the winner's 0.3 s lease has passed
                assert time.monotonic() < deadline, "the lease never expired"
                time.sleep(0.05)
            assert not winner.renew("retrain", 30) and winner.lock_holder("retrain")[0] == loser.holder
            loser.release("retrain")

        run = states[0].create_run("pets", "alert", "drift")  # the run rows on the same server, merged
        states[1].update_run(run.id, phase="done", result="kept", data={"version": "3"})
        assert states[0].get_run(run.id).data == {"version": "3"} and states[0].unfinished("pets") == []
        states[0].set_mark("champion_event_seq:pets", "7")  # INSERT, then ON CONFLICT DO UPDATE
        states[1].set_mark("champion_event_seq:pets", "8")
        assert states[0].mark("champion_event_seq:pets") == "8"
    finally:
        for s in states:
            s.close()
