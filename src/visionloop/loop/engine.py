"""The loop's engine: decide whether a trigger starts a run, then drive the run to its end, crash-safe.

A run moves through phases, each recorded in the loop's table of the prediction store (``state.py``)
before the work of the next one starts, so a loop that is killed picks up where it was:

    triggered → building → training → registered → analysing → done
                                         │ gate refused: done (rejected)        └→ rolling_back → done

- *building*: the retrain folder and the production slice (``retrain.build``, content-addressed: built
  again identically after a crash);
- *training*: the pipeline on it, ingest → register. The MLflow run carries the loop run's id as a tag;
  after a crash the run is found by it: a version it registered is taken as it is, otherwise training
  resumes from its last checkpoint, and a run that cannot be resumed is marked KILLED (never left RUNNING)
  before a fresh one starts;
- *registered*: the two-test-set gate (``gate.judge``) under the registry's model lock. A promotion that
  landed just before a crash is found on retry (the version is the champion already), never made twice;
- *analysing*: the post-promotion analysis (``analysis.py``), each measurement stored as it is taken;
- *rolling_back*: ``registry.rollback_version``, which moves nothing if the champion already moved.

Decisions about triggers: one run at a time (in this process, and across processes through the lease in
the store), a cool-down after a retrain, and enough new labelled production data (``loop.min_labels``,
``loop.min_new_labels``), so the same data is never trained on twice. Every trigger is acknowledged with
its action (``Ack``), counted, and kept for ``GET /triggers``.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections import deque
from typing import Any, Literal

from pydantic import BaseModel

from visionloop.config import Settings
from visionloop.errors import VisionloopError
from visionloop.loop import analysis as analysis_mod
from visionloop.loop import gate, retrain
from visionloop.loop.metrics import LoopMetrics
from visionloop.loop.state import LoopBusy, LoopRun, LoopState
from visionloop.loop.triggers import Trigger, from_accuracy, from_schedule, from_verdict
from visionloop.monitoring.store import PredictionStore

log = logging.getLogger("visionloop.loop")
Action = Literal["started", "busy", "cooldown", "waiting", "ignored", "resumed"]
RETRAINING = ("alert", "verdict", "accuracy", "schedule", "manual")
DECISION_WAIT_SECONDS = 60.0  # how long a trigger waits for the one being decided before it answers busy anyway
REUSED = ("busy", "cooldown", "waiting")  # refusals a trigger that waited for a decision takes over from it


class Ack(BaseModel):
    """What the loop did with one trigger."""

    at: float
    trigger: str
    reason: str
    action: Action
    detail: str = ""
    run_id: str | None = None  # started: the new run; busy, cooldown: the run in progress or the one that ended


class Engine:
    def __init__(
        self,
        settings: Settings,
        state: LoopState | None = None,
        store: PredictionStore | None = None,
        metrics: LoopMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or PredictionStore.from_settings(settings, writer=False)
        self.state = state or LoopState.from_settings(settings)
        self.metrics = metrics or LoopMetrics()
        self.lock_name = f"loop:{settings.registry.model_name}"
        self.acks: deque[Ack] = deque(maxlen=200)
        # One run at a time in this process, and one decision at a time. A trigger that arrives while another
        # is being decided waits for that decision (it is short next to a run) instead of answering "busy" with
        # no run to name: then it is busy with the run just started, or takes over the refusal just made for
        # the same kind of trigger (the labels and the cool-down it would look at are the same), so 200
        # concurrent alerts cost one decision and every answer names a real run.
        self._claim = threading.Condition()  # guards current, _deciding and _decided
        self._deciding: Trigger | None = None  # the trigger being decided now
        self._decided: tuple[str, Action, str, str | None] | None = None  # kind, action, detail, run id
        self._decisions = 0  # decisions made: a waiter reuses only one made while it waited
        self._stop = threading.Event()
        self.current: str | None = None  # the run in progress here (set from its start to its end)
        # an alert the loop could not act on yet (busy, cool-down, too few labels): Alertmanager notifies a
        # group again only after repeat_interval, so the watcher offers it again until it starts or resolves
        self.pending: Trigger | None = None
        self._pending_action: str | None = None

    @property
    def model_name(self) -> str:
        return self.settings.registry.model_name

    def close(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ deciding
    def offer(self, trigger: Trigger, wait: bool = True) -> Ack:
        """Start a run for ``trigger`` if the rules allow; ``wait`` runs it here, else on a thread."""
        loop = self.settings.loop
        enabled = trigger.kind in ("manual", "promotion") or trigger.kind in loop.triggers
        if not enabled:
            return self._ack(trigger, "ignored", f"trigger {trigger.kind} is not in loop.triggers")
        answer = self._claim_decision(trigger)
        if answer is not None:
            return self._ack(trigger, *answer)
        started = False
        ack: Ack | None = None
        try:
            if not self.state.acquire(self.lock_name, loop.lock_seconds):
                ack = self._ack(trigger, "busy", *self._lease_holder())
                return ack
            try:
                refusal = self._refusal(trigger)
                if refusal is not None:
                    ack = self._ack(trigger, *refusal)
                    return ack
                data: dict[str, Any] = {"trigger_details": trigger.details}
                if trigger.kind == "promotion":  # nothing to train: the analysis of a version promoted by hand
                    details = trigger.details
                    data["version"] = details["version"]
                    data["analysis"] = analysis_mod.Analysis(
                        version=details["version"], previous=details.get("previous"), started_at=time.time()
                    ).model_dump()
                    data["event_seq"] = details.get("event_seq")
                run = self.state.create_run(self.model_name, trigger.kind, trigger.reason, data)
                if trigger.kind == "promotion":
                    run = self.state.update_run(run.id, phase="analysing")
                with self._claim:  # before the decision ends: a trigger that waited for it names this run
                    self.current = run.id
                ack = started_ack = self._ack(trigger, "started", run_id=run.id)
                started = True
            finally:
                if not started:
                    self.state.release(self.lock_name)
        finally:
            self._decision_made(trigger, ack, started)
        self._launch(run, wait)
        return started_ack

    def _claim_decision(self, trigger: Trigger) -> tuple[Action, str, str | None] | None:
        """Become the one deciding (None), or the answer without deciding: busy with the run in progress, or
        the refusal just made for the same kind of trigger while this one waited."""
        deadline = time.monotonic() + DECISION_WAIT_SECONDS
        with self._claim:
            waited_from = None
            while self._deciding is not None and self.current is None:
                waited_from = self._decisions if waited_from is None else waited_from
                left = deadline - time.monotonic()
                if left <= 0:
                    deciding = self._deciding
                    return "busy", f"trigger {deciding.kind} ({deciding.reason}) is still being decided", None
                self._claim.wait(left)
            if self.current is not None:
                return "busy", f"run {self.current} is in progress", self.current
            decided = self._decided
            if waited_from is not None and self._decisions > waited_from and decided is not None:
                kind, action, detail, run_id = decided
                if kind == trigger.kind and action in REUSED:
                    return action, detail, run_id
            self._deciding = trigger
        return None

    def _decision_made(self, trigger: Trigger, ack: Ack | None, started: bool) -> None:
        with self._claim:
            self._deciding = None
            self._decisions += 1
            self._decided = None if ack is None or started else (trigger.kind, ack.action, ack.detail, ack.run_id)
            self._claim.notify_all()

    def _lease_holder(self) -> tuple[str, str | None]:
        """The busy answer when another loop process holds the lease: who, and the run it is driving."""
        holder = self.state.lock_holder(self.lock_name)
        who = holder[0] if holder else "?"
        unfinished = self.state.unfinished(self.model_name)
        if not unfinished:
            return f"another loop process ({who}) holds the lease and is deciding a trigger", None
        run = unfinished[0]
        return f"run {run.id} is in progress in another loop process ({who}), phase {run.phase}", run.id

    def _refusal(self, trigger: Trigger) -> tuple[Action, str, str | None] | None:
        """Why ``trigger`` starts nothing now (cool-down, too few labels), and the run it is about, or None."""
        loop = self.settings.loop
        if trigger.kind not in RETRAINING or trigger.kind == "manual":
            return None
        last = self.state.last_run(self.model_name, RETRAINING, finished_only=True)
        if last is not None and last.finished_at is not None and time.time() - last.finished_at < loop.cooldown_seconds:
            left = loop.cooldown_seconds - (time.time() - last.finished_at)
            return "cooldown", f"run {last.id} ended {last.result}; cool-down for another {left:.0f} s", last.id
        if trigger.kind == "schedule":
            return None  # a schedule retrains on whatever labels there are, as a cron job would
        base = retrain.base_data(self.settings)
        production = retrain.production_images(self.settings, self.store, base.classes, base.hashes)
        usable = len(production.images)
        if usable < loop.min_labels:
            return (
                "waiting",
                f"{usable} usable labelled production images, loop.min_labels is {loop.min_labels}",
                None,
            )
        latest_used = self._labels_until()
        if latest_used is not None:
            new = sum(1 for p in production.images if p.time > latest_used)
            if new < loop.min_new_labels:
                return (
                    "waiting",
                    f"{new} labels newer than the last retrain's, loop.min_new_labels is {loop.min_new_labels}",
                    None,
                )
        return None

    def _labels_until(self) -> float | None:
        """The newest label time the last retrain used."""
        for run in self.state.runs(self.model_name, limit=50):
            until = run.data.get("lineage", {}).get("labels_until")
            if until is not None:
                return float(until)
        return None

    def resolved(self, alertnames: list[str]) -> None:
        """Alertmanager says these alerts resolved: a pending trigger from them is dropped."""
        pending = self.pending
        if pending is not None and set(pending.details.get("alerts", [])) <= set(alertnames):
            self.pending = None
            log.info("alert %s resolved: the pending trigger is dropped", ", ".join(alertnames))

    def _ack(self, trigger: Trigger, action: Action, detail: str = "", run_id: str | None = None) -> Ack:
        ack = Ack(
            at=time.time(), trigger=trigger.kind, reason=trigger.reason, action=action, detail=detail, run_id=run_id
        )
        again = trigger is self.pending
        if trigger.kind == "alert" and action in ("busy", "cooldown", "waiting"):
            self.pending = trigger
        elif again or (trigger.kind == "alert" and action == "started"):
            self.pending = None
        if again and action == self._pending_action:
            return ack  # the same answer to the same pending alert: not counted or logged at every look
        self._pending_action = action if trigger is self.pending else None
        self.acks.append(ack)
        self.metrics.triggers.labels(trigger.kind, action).inc()
        log.info("trigger %s (%s): %s%s", trigger.kind, trigger.reason, action, f" — {detail}" if detail else "")
        return ack

    # ------------------------------------------------------------------ watching
    def tick(self, wait: bool = False) -> list[Ack]:
        """One look at everything: unfinished runs, the champion, the verdict, live accuracy, the schedule;
        a run it starts runs on a thread, or here with ``wait`` (``visionloop loop once``)."""
        acks: list[Ack] = []
        if self.current is not None or self._deciding is not None:
            return acks
        resumed = self.resume(wait=wait)
        if resumed is not None:
            return [resumed]
        from visionloop import registry

        try:
            promotion = self._outside_promotion()
            if promotion is not None:
                return [self.offer(promotion, wait=wait)]
            champion = registry.alias_version(self.settings, registry.CHAMPION)
            if champion is None:
                return acks
            loop = self.settings.loop
            candidates: list[Trigger | None] = [self.pending]
            if "verdict" in loop.triggers:
                candidates.append(from_verdict(self.settings, self.store, champion))
            if "accuracy" in loop.triggers:
                candidates.append(from_accuracy(self.settings, self.store, champion))
            if "schedule" in loop.triggers:
                last = self.state.last_run(self.model_name, ("schedule",))
                candidates.append(from_schedule(self.settings, None if last is None else last.created_at))
            for trigger in candidates:
                if trigger is not None:
                    acks.append(self.offer(trigger, wait=wait))
                    break
        except VisionloopError as exc:
            self.metrics.errors.labels("watch").inc()
            log.warning("watch: %s", exc)
        return acks

    def _outside_promotion(self) -> Trigger | None:
        """A champion promotion the loop did not make (a person's, a CI job's, a forced one): it is watched too."""
        from visionloop import registry

        try:
            events = [e for e in registry.history(self.settings) if e.alias == registry.CHAMPION]
        except VisionloopError:
            return None  # no registered model yet
        if not events:
            return None
        newest = events[-1]
        mark = f"champion_event_seq:{self.model_name}"
        seen = self.state.mark(mark)
        if seen is None:  # the loop's first look: what happened before it started is not its to judge
            self.state.set_mark(mark, str(newest.seq))
            return None
        if newest.seq <= int(seen):
            return None
        self.state.set_mark(mark, str(newest.seq))
        if newest.kind != "promote":
            return None
        ours = any(r.data.get("version") == newest.to_version for r in self.state.runs(self.model_name, limit=50))
        if ours:
            return None
        return Trigger(
            "promotion",
            f"v{newest.to_version} was promoted outside the loop: {newest.reason}",
            {"version": newest.to_version, "previous": newest.from_version, "event_seq": newest.seq},
        )

    def resume(self, wait: bool = True) -> Ack | None:
        """Take up the oldest unfinished run (its process died), if the lock can be had."""
        unfinished = self.state.unfinished(self.model_name)
        if not unfinished:
            return None
        run = unfinished[0]
        with self._claim:
            if self.current is not None or self._deciding is not None:
                return None
            self.current = run.id
        if not self.state.acquire(self.lock_name, self.settings.loop.lock_seconds):
            self._run_ended()
            return None
        ack = self._ack(
            Trigger(run.trigger, run.reason), "resumed", f"phase {run.phase}, last written by {run.owner}", run.id
        )
        self.state.update_run(
            run.id, data={"resumed": [*run.data.get("resumed", []), {"at": time.time(), "phase": run.phase}]}
        )
        self._launch(run, wait)
        return ack

    # ------------------------------------------------------------------ running
    def _launch(self, run: LoopRun, wait: bool) -> None:
        if wait:
            self._execute(run)
        else:
            threading.Thread(target=self._execute, args=(run,), name=f"loop-run-{run.id}", daemon=True).start()

    def _execute(self, run: LoopRun) -> None:
        """Drive ``run`` to done; the caller set ``current`` and holds the store lock, both released here."""
        self.metrics.lock_held.set(1)
        try:
            with self.state.held(self.lock_name, self.settings.loop.lock_seconds) as still_held:
                while run.phase != "done" and not self._stop.is_set():
                    still_held()
                    run = self._step(run)
        except LoopBusy as exc:  # the lease was lost: another loop process owns the run now, it is not failed
            log.warning("run %s: stopped in phase %s: %s", run.id, run.phase, exc)
        except Exception as exc:
            log.exception("run %s failed in phase %s", run.id, run.phase)
            self.metrics.errors.labels(_stage(run.phase)).inc()
            self._finish(run, "failed", {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:1000]}"})
        finally:
            self.metrics.phase.state("idle")
            self.metrics.lock_held.set(0)
            self._run_ended()

    def _run_ended(self) -> None:
        with self._claim:
            self.current = None
            self._claim.notify_all()

    def _step(self, run: LoopRun) -> LoopRun:
        phase = run.phase
        self.metrics.phase.state(
            {"triggered": "building", "registered": "gating", "rolling_back": "rolling_back"}.get(phase, phase)
        )
        if phase in ("triggered", "building"):
            return self._build(run)
        if phase == "training":
            return self._train(run)
        if phase == "registered":
            return self._gate(run)
        if phase == "analysing":
            return self._analyse(run)
        if phase == "rolling_back":
            return self._rollback(run)
        raise VisionloopError(f"run {run.id} is in an unknown phase {phase!r}")

    def _build(self, run: LoopRun) -> LoopRun:
        run = self.state.update_run(run.id, phase="building")
        base = retrain.base_data(self.settings)
        production = retrain.production_images(self.settings, self.store, base.classes, base.hashes)
        data = retrain.build(self.settings, self.store, base, production)
        doc = retrain.lineage(data.lineage_path)
        for earlier in self.state.runs(self.model_name, limit=200):
            if (
                earlier.id != run.id
                and earlier.data.get("retrain", {}).get("key") == data.key
                and earlier.result
                in (
                    "rolled_back",
                    "rejected",
                )
            ):
                return self._finish(
                    run, "rejected", {"reasons": [f"same data as run {earlier.id}, which ended {earlier.result}"]}
                )
        summary = {k: v for k, v in doc["production"].items() if not k.endswith("request_ids")}
        return self.state.update_run(
            run.id,
            phase="training",
            data={
                "retrain": {
                    "key": data.key,
                    "folder": str(data.folder),
                    "slice": str(data.folder.parent / f"{data.key}.production-test"),
                    "lineage_path": str(data.lineage_path),
                    "base_dataset": data.base_dataset,
                    "base_dataset_dir": str(data.base_dataset_dir),
                },
                "lineage": {"base_dataset": data.base_dataset, "base_files": doc["base"]["files"], **summary},
                "work_dir": str(self.settings.home / "runs" / f"loop-{run.id}"),
            },
        )

    def _retrain_data(self, run: LoopRun) -> retrain.RetrainData:
        r = run.data["retrain"]
        lineage = run.data["lineage"]
        from pathlib import Path

        return retrain.RetrainData(
            Path(r["folder"]), r["key"], r["base_dataset"], Path(r["base_dataset_dir"]),
            int(lineage.get("train", 0)), int(lineage.get("test", 0)), Path(r["lineage_path"]),
        )  # fmt: skip

    def _train(self, run: LoopRun) -> LoopRun:
        from pathlib import Path

        from visionloop import registry

        data = self._retrain_data(run)
        tags = {"visionloop.loop_run": run.id, "loop.trigger": run.trigger, "loop.reason": run.reason[:4900]}
        if self.settings.loop.executor == "kubeflow":
            version, run_id, dataset_version = retrain.train_kubeflow(self.settings, data, f"visionloop loop {run.id}")
        else:
            work_dir = Path(run.data["work_dir"])
            resume_id = None
            for found, status in registry.runs_tagged(self.settings, "visionloop.loop_run", run.id):
                registered = registry.version_of_run(self.settings, found)
                if registered is not None:  # registered before the crash: nothing to redo
                    return self._registered(
                        run, registered, found, registry.dataset_version_of(self.settings, registered) or ""
                    )
                if resume_id is None and (work_dir / "train" / "last.pt").is_file():
                    resume_id = found
                elif status == "RUNNING":
                    registry.connect(self.settings)
                    registry.set_run_status(found, "KILLED")  # no orphaned RUNNING run
            if resume_id is not None:
                log.info("run %s: resuming training of MLflow run %s from its checkpoint", run.id, resume_id)
            version, run_id, dataset_version = retrain.train_local(self.settings, data, work_dir, tags, resume_id)
        return self._registered(run, version, run_id, dataset_version)

    def _registered(self, run: LoopRun, version: str, run_id: str, dataset_version: str) -> LoopRun:
        from visionloop import registry

        data = self._retrain_data(run)
        tags = {
            "visionloop.loop_run": run.id,
            "loop.trigger": run.trigger,
            **retrain.lineage_tags(data, retrain.lineage(data.lineage_path)),
        }
        registry.tag_run(self.settings, run_id, tags)
        registry.connect(self.settings)
        registry.log_artifact(run_id, data.lineage_path, "loop")
        registry.tag_version(self.settings, version, {**tags, "loop.reason": run.reason})
        return self.state.update_run(
            run.id,
            phase="registered",
            data={"version": version, "mlflow_run_id": run_id, "dataset_version": dataset_version},
        )

    def _gate(self, run: LoopRun) -> LoopRun:
        from pathlib import Path

        from visionloop import registry

        data = self._retrain_data(run)
        version = run.data["version"]
        decision, slice_size = gate.judge(
            self.settings,
            version,
            data.base_dataset_dir,
            Path(run.data["retrain"]["slice"]),
            f"{run.trigger}: {run.reason}",
        )
        self.metrics.retrain_seconds.observe(time.time() - run.created_at)
        self.metrics.last_decision.set(time.time())
        record = {"gate": {**decision.model_dump(), "production_test_images": slice_size}}
        log.info(
            "run %s: gate %s v%s: %s",
            run.id,
            "promoted" if decision.promoted else "rejected",
            version,
            "; ".join(decision.reasons),
        )
        if not decision.promoted:
            return self._finish(run, "rejected", record)
        event = registry.last_event(self.settings, version, "promote")
        self._reload()
        started = time.time()
        previous = decision.champion_version
        if previous == version:  # promoted before a crash: the event says what it replaced
            previous = event.from_version if event else None
        record["analysis"] = analysis_mod.Analysis(version=version, previous=previous, started_at=started).model_dump()
        record["event_seq"] = event.seq if event else None
        return self.state.update_run(run.id, phase="analysing", data=record)

    def _analyse(self, run: LoopRun) -> LoopRun:
        loop = self.settings.loop
        state = analysis_mod.Analysis.model_validate(run.data["analysis"])
        self.metrics.analysis.state("running")
        while True:
            verdict = analysis_mod.verdict(state, self.settings)
            if verdict != "running":
                break
            wait = state.next_at(loop.analysis_interval_seconds) - time.time()
            if wait > 0 and self._stop.wait(wait):
                return run  # stopping: the analysis goes on after a restart
            measurement = analysis_mod.measure(self.settings, self.store, state)
            state.measurements.append(measurement)
            self.metrics.measurements.labels(measurement.result).inc()
            if measurement.live_accuracy is not None:
                self.metrics.analysis_accuracy.labels(state.version).set(measurement.live_accuracy)
            log.info("run %s: analysis of v%s, measurement %d/%d %s: %s", run.id, state.version,
                     len(state.measurements), loop.analysis_count, measurement.result, "; ".join(measurement.reasons))  # fmt: skip
            run = self.state.update_run(run.id, data={"analysis": state.model_dump()})
        state.phase = verdict  # type: ignore[assignment]
        self.metrics.analysis.state(verdict)
        self.metrics.last_decision.set(time.time())
        run = self.state.update_run(run.id, data={"analysis": state.model_dump()})
        from visionloop import registry

        counts = state.counts()
        summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        registry.tag_version(self.settings, state.version, {"loop.analysis": f"{verdict} ({summary}) in run {run.id}"})
        if verdict == "failed" or (verdict == "inconclusive" and loop.analysis_on_inconclusive == "rollback"):
            return self.state.update_run(run.id, phase="rolling_back")
        result = {"successful": "promoted", "inconclusive": "inconclusive"}[verdict]
        if run.trigger == "promotion" and verdict == "successful":
            result = "kept"
        return self._finish(run, result, {})

    def _rollback(self, run: LoopRun) -> LoopRun:
        from visionloop import registry

        state = analysis_mod.Analysis.model_validate(run.data["analysis"])
        last = next((m for m in reversed(state.measurements) if m.result == "failed"), None)
        why = "; ".join(last.reasons) if last else f"analysis {state.phase}"
        reason = f"post-promotion analysis {state.phase} ({state.counts()['failed']} failed measurements): {why}"
        event = registry.rollback_version(self.settings, state.version, f"loop run {run.id}: {reason}")
        if event is None:
            event = registry.last_event(self.settings, state.previous or "", "rollback") if state.previous else None
        self._reload()
        self.metrics.last_decision.set(time.time())
        log.warning("run %s: rolled back v%s: %s", run.id, state.version, reason)
        return self._finish(
            run,
            "rolled_back",
            {
                "rollback": {
                    "reason": reason,
                    "to_version": event.to_version if event else None,
                    "event_seq": event.seq if event else None,
                }
            },
        )

    def _finish(self, run: LoopRun, result: str, data: dict[str, Any]) -> LoopRun:
        self.metrics.runs.labels(result).inc()
        return self.state.update_run(run.id, phase="done", result=result, data=data)

    def _reload(self) -> None:
        """Tell the servers in ``loop.reload_urls`` to load the new champion now (they poll anyway)."""
        token = self.settings.serve.admin_token
        for url in self.settings.loop.reload_urls:
            request = urllib.request.Request(f"{url.rstrip('/')}/admin/reload", method="POST", data=b"")
            if token:
                request.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    response.read()
            except Exception as exc:  # the server polls the alias too: a failed nudge only delays it
                log.warning("reload of %s failed: %s", url, exc)


def _stage(phase: str) -> str:
    return {"triggered": "build", "building": "build", "training": "train", "registered": "gate",
            "analysing": "analysis", "rolling_back": "rollback"}.get(phase, "watch")  # fmt: skip
