"""Training in several processes: where a training runs, and the torchrun launcher around it.

``visionloop train --nproc-per-node N`` (and ``visionloop run`` with the same options) calls
``train_distributed``. It checks here what would fail in every process alike, writes the settings
as this process resolved them (every flag, the environment and the config file already applied) to
a request file, and runs torchrun with ``python -m visionloop.training.launch REQUEST`` in each
process. So the workers get exactly what the user asked for, whatever flags a later version adds:
nothing is rebuilt by hand. Rank 0 decides where the run lives (a new work folder and MLflow run, or
the interrupted one to resume) and hands it to every rank; it alone tracks the run, writes files and
writes its output where the launcher reads it.

An error that rank 0 decided is reported by rank 0 alone: the other ranks wait for it at a barrier
(a rendezvous with a timeout, ``train.dist_timeout``) before they exit, instead of sleeping.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visionloop.config import Settings
from visionloop.errors import Reported, VisionloopError
from visionloop.fsutil import atomic_write_json, read_json

if TYPE_CHECKING:
    from visionloop.training.distributed import Launch

# torch (through training/distributed.py) is imported only where processes are launched or trained:
# where a training runs is decided from files, and `visionloop run --to preprocess` needs no torch


def started_training(settings: Settings) -> dict[str, str]:
    """What `train --resume` continues: the dataset, work folder and MLflow run of the last training started."""
    started_path = settings.home / "latest" / "train_started.json"
    if not started_path.is_file():
        raise VisionloopError("nothing to resume: no training was started under this home")
    return read_json(started_path)


def where_to_train(settings: Settings, dataset_dir: Path | None, resume: bool) -> tuple[Path, Path | None, str | None]:
    """(dataset folder, work folder, MLflow run to continue): the interrupted run's, or ``dataset_dir``
    with a new work folder (None: the train step makes one) and a new run."""
    if resume:
        started = started_training(settings)
        return Path(started["dataset_dir"]), Path(started["work_dir"]), started["run_id"]
    if dataset_dir is None:
        raise VisionloopError("no dataset to train on: run `visionloop data preprocess` first")
    return dataset_dir, None, None


def unfinished_training(settings: Settings) -> bool:
    """Whether the last training started under this home never handed on its output (it was interrupted)."""
    started = settings.home / "latest" / "train_started.json"
    finished = settings.home / "latest" / "train.json"
    return started.is_file() and (not finished.is_file() or finished.stat().st_mtime < started.stat().st_mtime)


def check_world(settings: Settings, dataset_dir: Path, world_size: int) -> None:
    """Refuse a number of processes that cannot share the training data (see training/distributed.py)."""
    from visionloop.data.preprocess import load_manifest
    from visionloop.training import distributed

    train_images = sum(load_manifest(dataset_dir).counts["train"].values())
    distributed.check_world(train_images, settings.train.batch_size, world_size)


def train_distributed(
    settings: Settings, spec: Launch, dataset_dir: Path | None, resume: bool, show_progress: bool
) -> dict[str, Any] | None:
    """Train in ``spec``'s processes under torchrun and wait for them; returns the train step's output
    as rank 0 wrote it (None on a node that does not hold rank 0)."""
    # torch's C++ side logs every failed attempt to reach a rendezvous with a stack trace; this process
    # reports a failed rendezvous in one line instead (torch reads the level once, when imported)
    user_level = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    import torch

    from visionloop.training import distributed
    from visionloop.training.train import pick_device

    del os.environ["TORCH_CPP_LOG_LEVEL"]  # the training processes log as the user asked
    if user_level is not None:
        os.environ["TORCH_CPP_LOG_LEVEL"] = user_level

    spec.check()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        raise VisionloopError("already running under torchrun: drop --nproc-per-node, --nnodes and the rdzv options")
    if spec.nnodes == 1 or spec.node_rank == 0:  # the node of rank 0 has the data (and the checkpoint) to check
        check_world(settings, where_to_train(settings, dataset_dir, resume)[0], spec.world_size)
    if pick_device(settings.train.device).type == "cuda" and spec.nproc_per_node > torch.cuda.device_count():
        raise VisionloopError(
            f"--nproc-per-node {spec.nproc_per_node} but this node has {torch.cuda.device_count()} GPUs: "
            "start one process per GPU (or use --device cpu)"
        )
    threads = settings.train.threads or max(1, (os.cpu_count() or 1) // spec.nproc_per_node)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    with tempfile.TemporaryDirectory(prefix="visionloop-launch-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "train.json"
        atomic_write_json(
            request,
            {
                "settings": settings.model_copy(update={"home": settings.home.resolve()}).model_dump(mode="json"),
                "dataset_dir": None if dataset_dir is None else str(dataset_dir.resolve()),
                "resume": resume,
                "show_progress": show_progress,
                "result": str(result),
            },
        )
        try:
            distributed.launch(spec, "visionloop.training.launch", [str(request)])
        except distributed.WorkersFailed as exc:
            if exc.exit_code in (2, 130):  # a clear error, or an interrupt, that the process reported itself
                raise (KeyboardInterrupt() if exc.exit_code == 130 else Reported(exc.exit_code)) from None
            raise
        return read_json(result) if result.is_file() else None


def _report(exc: VisionloopError) -> None:
    sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
    sys.stderr.flush()


def worker(
    request_path: Path, track: Callable[..., Any] | None = None, untracked: Callable[..., Any] | None = None
) -> int:
    """One training process started by torchrun: rank 0 trains tracked (the train step), the others untracked."""
    from visionloop.pipeline import steps
    from visionloop.training import distributed
    from visionloop.training.train import pick_device

    request = read_json(request_path)
    settings = Settings(**request["settings"])
    resume = bool(request["resume"])
    dataset_dir = Path(request["dataset_dir"]) if request["dataset_dir"] else None
    world = distributed.world_from_env()

    def plan() -> tuple[Path, Path, str | None]:
        data, work_dir, run_id = where_to_train(settings, dataset_dir, resume)
        check_world(settings, data, world.size)  # before rank 0 makes a work folder or starts an MLflow run
        return data, work_dir or steps.new_work_dir(settings.home), run_id

    track = track or steps.train_step
    untracked = untracked or steps.train_untracked
    with distributed.process_group(pick_device(settings.train.device).type, settings.train.dist_timeout):
        try:
            data, work_dir, run_id = distributed.from_rank0(plan)
        except VisionloopError as exc:
            # every rank has this error from rank 0, which alone says it; the others leave once it has
            if world.is_rank0:
                _report(exc)
            distributed.barrier()
            return exc.exit_code
        try:
            if world.is_rank0:
                out = track(data, settings, work_dir, resume_run_id=run_id, show_progress=request["show_progress"])
                atomic_write_json(Path(request["result"]), steps.as_json(out))
            else:
                untracked(settings, data, work_dir, resume=run_id is not None)
        except VisionloopError as exc:
            _report(exc if world.is_rank0 else VisionloopError(f"rank {world.rank}: {exc}"))
            return exc.exit_code
        except KeyboardInterrupt:
            return 130  # the launcher says what to do next
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m visionloop.training.launch REQUEST.json (written by {__name__})")
    raise SystemExit(worker(Path(sys.argv[1])))
