"""The local runner: a loop over the declared steps (``dataflow.STEPS``), in this process, timed,
with their outputs handed along, recorded under ``<home>/latest/`` and cached.

``run_steps`` runs any range of the steps; the inputs of the first ones come from the outputs the
earlier steps last recorded, which is how ``visionloop run --from train`` and each stage command
(a range of one step) pick up where the last command left off.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from visionloop.config import Settings
from visionloop.pipeline import dataflow, steps
from visionloop.pipeline.cache import StepCache

# (stage name, seconds, its output, whether the output was reused from the cache)
StageCallback = Callable[[str, float, Any, bool], None]
# a step's own way to produce its output instead of ``dataflow.execute`` (the DDP launcher for train):
# called with the step, its arguments and finish_run
Executor = Callable[[dataflow.Step, dict[str, Any], bool], BaseModel]


@dataclass
class RunSummary:
    dataset_version: str
    source: str
    images: dict[str, int]
    device: str
    epochs_run: int
    test_accuracy: float
    baseline_name: str
    baseline_accuracy: float
    model_name: str
    model_version: str
    aliases: list[str]
    promoted: bool
    gate_reasons: list[str]
    champion_version: str | None
    run_id: str
    work_dir: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    cached_steps: list[str] = field(default_factory=list)  # reused from an earlier run, not run again

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepsRun:
    outputs: dict[str, BaseModel]  # every output the range used or made, by step name
    ran: list[str]  # the steps of the range, in order
    seconds: dict[str, float]
    cached: list[str]
    total_seconds: float


def cache_key(
    cache: StepCache, step: dataflow.Step, outputs: Mapping[str, BaseModel], settings: Settings, args: dict[str, Any]
) -> str:
    """A step's inputs, the settings it reads and the code: its upstream outputs as JSON, the settings
    it declares, and whatever content its declaration adds (the ingested folder, the report's bytes)."""
    upstream = [[name, steps.as_json(outputs[name])] for name in step.upstream()]
    declared = {name: dataflow.setting_value(settings, name) for name in step.settings}
    extra = step.content(args) if step.content is not None else None
    return cache.key(step.name, upstream, declared, extra)


def run_steps(
    settings: Settings,
    first: str | None = None,
    last: str | None = None,
    *,
    show_progress: bool = True,
    on_stage: StageCallback | None = None,
    use_cache: bool = True,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    executors: Mapping[str, Executor] | None = None,
    declared: tuple[dataflow.Step, ...] | None = None,
) -> StepsRun:
    """Run the steps ``first`` … ``last`` of the declaration in order.

    A cached step whose inputs, settings and code are unchanged since a successful earlier run is not
    run again: its recorded output is reused (``pipeline/cache.py``). ``overrides`` replaces some of a
    step's arguments (``promote --version``); ``executors`` runs a step another way (DDP training).
    """
    declared = declared or dataflow.STEPS
    selected = dataflow.step_range(first, last, declared)
    names = [s.name for s in selected]
    outputs: dict[str, BaseModel] = {}
    overrides = overrides or {}
    for step in selected:  # what the range needs from before it: the outputs last recorded
        for parameter, wire in step.wiring.items():
            given = parameter in overrides.get(step.name, {})
            if isinstance(wire, dataflow.From) and not given and wire.step not in names and wire.step not in outputs:
                upstream = dataflow.step_named(wire.step, declared)
                outputs[wire.step] = steps.latest(settings.home, wire.step, upstream.output)
    cache = StepCache(settings.home, enabled=use_cache)
    in_run = [s.name for s in selected if s.in_run]
    seconds: dict[str, float] = {}
    cached: list[str] = []
    open_run: str | None = None  # a run a step left RUNNING for the next one
    started = time.perf_counter()
    try:
        for step in selected:
            t0 = time.perf_counter()
            given = overrides.get(step.name, {})
            args = dataflow.call_args(step, outputs, settings, dataflow.work_dir_of(outputs), given)
            # a step given arguments by hand (promote --version, train --resume) is neither reused nor cached
            key = cache_key(cache, step, outputs, settings, args) if step.cached and not given else None
            hit = cache.lookup(step.name, key) if key is not None else None
            out = steps.from_json(step.output, hit.output) if hit is not None else None
            if out is not None and (step.still_valid is None or step.still_valid(settings, out)):
                cached.append(step.name)
            else:
                finish = not in_run or step.name == in_run[-1]
                custom = (executors or {}).get(step.name)
                if custom is not None:
                    out = custom(step, args, finish)
                else:
                    out = dataflow.execute(step, args, settings, show_progress=show_progress, finish_run=finish)
                if step.in_run:
                    open_run = None if finish else getattr(out, "run_id", args.get("run_id"))
                if key is not None:
                    cache.store(step.name, key, steps.as_json(out), step.file_paths(out))
            outputs[step.name] = out
            seconds[step.name] = time.perf_counter() - t0
            steps.record(settings.home, step.name, out)
            if on_stage is not None:
                on_stage(step.name, seconds[step.name], out, step.name in cached)
    except BaseException:
        if open_run is not None:  # failed between two steps of the run: it is not left RUNNING
            with steps.run_status(open_run):
                raise
        raise
    return StepsRun(outputs, names, seconds, cached, time.perf_counter() - started)


def run_pipeline(
    settings: Settings,
    show_progress: bool = True,
    on_stage: StageCallback | None = None,
    use_cache: bool = True,
    executors: Mapping[str, Executor] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> RunSummary:
    """ingest → validate → preprocess → train → evaluate → export → register → promote, summarised.

    Run it twice on the same data and the second run trains and registers nothing; ``use_cache=False``
    runs every step (and refreshes the cache). Ingest always runs: it is what notices that the data changed.
    """
    done = run_steps(
        settings,
        show_progress=show_progress,
        on_stage=on_stage,
        use_cache=use_cache,
        executors=executors,
        overrides=overrides,
    )
    return summarize(settings, done)


def summarize(settings: Settings, done: StepsRun) -> RunSummary:
    from visionloop import registry

    out = done.outputs
    ingested, prepared, trained = out["ingest"], out["preprocess"], out["train"]
    evaluated, registered, promoted = out["evaluate"], out["register"], out["promote"]
    assert isinstance(trained, steps.TrainOutput) and isinstance(promoted, steps.PromoteOutput)
    return RunSummary(
        dataset_version=prepared.dataset_version,
        source=ingested.source,
        images=prepared.counts,
        device=trained.device,
        epochs_run=trained.epochs_run,
        test_accuracy=evaluated.test_accuracy,
        baseline_name=evaluated.baseline_name,
        baseline_accuracy=evaluated.baseline_accuracy,
        model_name=registered.model_name,
        model_version=registered.version,
        aliases=registry.aliases_of(settings, registered.version),  # now, even when the decision was cached
        promoted=promoted.promoted,
        gate_reasons=promoted.reasons,
        champion_version=registry.alias_version(settings, registry.CHAMPION),
        run_id=trained.run_id,
        work_dir=str(Path(trained.work_dir)),
        stage_seconds={k: round(v, 3) for k, v in done.seconds.items()},
        total_seconds=round(done.total_seconds, 3),
        cached_steps=done.cached,
    )
