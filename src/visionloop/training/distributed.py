"""Data-parallel training across processes: the little that ``train()`` needs from torch.distributed.

torchrun (``python -m torch.distributed.run``, which ``visionloop train --nproc-per-node N`` runs)
starts one process per GPU (or per share of the CPU cores) and tells each who it is through the
environment: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``. Without those variables
(or with ``WORLD_SIZE=1``) every helper here is a no-op and ``train()`` is the single-process loop.

The rules the training loop follows, stated once:

- ``train.batch_size`` is the *global* batch. Every step takes the next ``batch_size`` images of one
  seeded permutation that every rank draws identically, and rank r trains on its r-th share
  (``batch_size // world`` images); DDP averages the gradients, so a step is the same step a single
  process would take on the whole batch. The last batch of an epoch is topped up to a multiple of
  the world size with images from the start of the permutation (as torch's DistributedSampler does).
- Metrics are sums all-reduced across ranks, so every rank sees the same numbers and early stopping
  stays in lock-step.
- Rank 0 alone writes files (checkpoints, the model) and talks to MLflow; a checkpoint holds the
  plain module (no DDP wrapper), so it resumes under any world size.
- Every collective has a timeout (``train.dist_timeout``): a vanished peer is an error, not a hang.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from visionloop.errors import TrainingError, VisionloopError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """Who this process is among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(environ: dict[str, str] | None = None) -> World:
    """The world torchrun describes in the environment; a single process when it describes none."""
    env = os.environ if environ is None else environ
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_size = int(env.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError as exc:
        raise TrainingError(f"malformed torch.distributed environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from None
    if size < 1 or not 0 <= rank < size or not 0 <= local_rank < max(local_size, 1):
        raise TrainingError(f"inconsistent torch.distributed environment: RANK={rank}, WORLD_SIZE={size}")
    return World(rank=rank, size=size, local_rank=local_rank, local_size=max(local_size, 1))


def backend_for(device_type: str) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device_type == "cuda" else "gloo"


@contextmanager
def process_group(device_type: str, timeout_s: float) -> Iterator[World]:
    """Join the process group torchrun set up for this process (if any) for the duration of the block.

    A no-op for a single process, and when the group already exists (the caller that created it
    destroys it). On CUDA each process takes the GPU of its ``LOCAL_RANK``.
    """
    world = world_from_env()
    if not world.distributed or dist.is_initialized():
        yield world
        return
    if device_type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise TrainingError(
                f"process {world.rank} wants GPU {world.local_rank} but this node has {torch.cuda.device_count()}: "
                "start at most one process per GPU"
            )
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(
        backend=backend_for(device_type),
        timeout=dt.timedelta(seconds=timeout_s),
        **({"device_id": torch.device("cuda", world.local_rank)} if device_type == "cuda" else {}),
    )
    try:
        yield world
    finally:
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over every rank, in place; returns it (unchanged for a single process)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), which each rank updated
    from its own share of the last batch; evaluation and checkpoints then see one model."""
    if _active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if _active():
        dist.barrier()


def from_rank0(decide: Callable[[], T]) -> T:
    """Run ``decide`` on rank 0 only and hand its result to every rank.

    For what one process must decide for all (where a run lives, whether a checkpoint is usable):
    when ``decide`` fails, every rank raises the same error, so none is left waiting for the others;
    on the other ranks it is marked (``reported_by_rank0``) so that only rank 0 need report it.
    """
    if not _active():
        return decide()
    payload: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            payload[0] = ("ok", decide())
        except VisionloopError as exc:
            failure, payload[0] = exc, ("error", exc)
        except BaseException as exc:  # a bug or an interrupt on rank 0: the others stop too
            failure, payload[0] = exc, ("error", TrainingError(f"rank 0 failed: {type(exc).__name__}: {exc}"))
    dist.broadcast_object_list(payload, src=0)
    if failure is not None:
        raise failure
    kind, value = payload[0]
    if kind == "error":
        value.reported_by_rank0 = True
        raise value
    return value


def reported_by_rank0(exc: BaseException) -> bool:
    """Whether ``exc`` is rank 0's error, handed to this rank by ``from_rank0``."""
    return getattr(exc, "reported_by_rank0", False)


# ------------------------------------------------------------------------------ sharding rules


def check_world(train_images: int, batch_size: int, world_size: int) -> None:
    """Refuse a world size that cannot share the data sensibly (``batch_size`` is the global batch)."""
    if world_size <= 1:
        return
    if batch_size % world_size:
        lower = batch_size - batch_size % world_size
        suggestion = f"{lower} or {lower + world_size}" if lower else str(world_size)
        raise TrainingError(
            f"train.batch_size={batch_size} is the global batch and does not divide among {world_size} processes: "
            f"use a multiple of {world_size} (e.g. {suggestion}) or another number of processes"
        )
    if train_images < batch_size:
        raise TrainingError(
            f"the train split has {train_images} images, fewer than one global batch of {batch_size} "
            f"({batch_size // world_size} per process x {world_size} processes): "
            "lower train.batch_size or use fewer processes"
        )


def pad_to_world(order: torch.Tensor, batch_size: int, world_size: int) -> torch.Tensor:
    """Top the epoch's last batch up to a multiple of ``world_size`` with images from the start of
    ``order``, so that every rank takes the same number of images in every step."""
    short = -(len(order) % batch_size) % world_size
    return torch.cat([order, order[:short]]) if short else order


def rank_share(batch: torch.Tensor, world: World) -> torch.Tensor:
    """Rank r's share of a global batch whose length is a multiple of the world size."""
    return batch.tensor_split(world.size)[world.rank] if world.distributed else batch


# ------------------------------------------------------------------------------ the launcher


class WorkersFailed(TrainingError):
    """A training process exited with an error; the others were stopped."""

    def __init__(self, rank: int, exit_code: int) -> None:
        super().__init__(f"training process rank {rank} failed (exit code {exit_code}); its output is above")
        self.rank, self.exit_code = rank, exit_code


@dataclass(frozen=True)
class Launch:
    """How ``visionloop train --nproc-per-node N [--nnodes M ...]`` starts torchrun on this node."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_timeout: float = 300.0

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def check(self) -> None:
        """Refuse what would make torchrun hang or fail obscurely, before anything starts."""
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise TrainingError("--nproc-per-node and --nnodes must be at least 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise TrainingError(
                f"missing rendezvous endpoint: --nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT, an address "
                "of one of the nodes that every node can reach, given the same on every node"
            )
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise TrainingError(f"invalid --rdzv-endpoint {self.rdzv_endpoint!r}: expected HOST:PORT")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise TrainingError(f"--node-rank {self.node_rank} is not in 0..{self.nnodes - 1} (--nnodes {self.nnodes})")
        if self.rdzv_timeout <= 0:
            raise TrainingError("--rdzv-timeout must be positive")

    def torchrun_args(self, module: str, module_args: list[str]) -> list[str]:
        """The arguments of ``python -m torch.distributed.run`` that run ``python -m module module_args``."""
        timeout = max(1, round(self.rdzv_timeout))
        args = ["--nproc-per-node", str(self.nproc_per_node), "--nnodes", str(self.nnodes), "--max-restarts", "0"]
        if self.rdzv_endpoint is None:  # one node: a private rendezvous on a free local port
            args.append("--standalone")
        elif self.node_rank is not None:  # fixed node ranks: the node given rank 0 holds global rank 0
            args += ["--rdzv-backend", "static", "--rdzv-endpoint", self.rdzv_endpoint]
            args += ["--node-rank", str(self.node_rank), "--rdzv-conf", f"timeout={timeout}"]
        else:  # ranks handed out by the c10d rendezvous hosted on the endpoint's node
            args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", self.rdzv_endpoint]
            args += ["--rdzv-conf", f"join_timeout={timeout},read_timeout={timeout}"]
        return [*args, "-m", module, *module_args]


def launch(spec: Launch, module: str, module_args: list[str]) -> None:
    """Run ``python -m module module_args`` in ``spec.nproc_per_node`` processes under torchrun, here.

    This is ``python -m torch.distributed.run <spec.torchrun_args(...)>`` run in this process, so that
    its failures come back as exceptions: a rendezvous that does not complete within the timeout
    raises TrainingError, a training process that fails raises WorkersFailed (after torchrun stopped
    the others), and a signal to this process (Ctrl-C, SIGTERM) raises KeyboardInterrupt once the
    training processes have stopped. torchrun's own log is silenced unless LOGLEVEL is set.
    """
    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError

    if "LOGLEVEL" not in os.environ:
        for name in ("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launcher"):
            logger = logging.getLogger(name)
            logger.addHandler(logging.NullHandler())
            logger.propagate = False
    where = spec.rdzv_endpoint or "this node"
    hint = (
        "start `visionloop train` with the same --nnodes and --rdzv-endpoint on every node, check that they can "
        "reach it, or raise --rdzv-timeout"
    )
    try:
        torchrun.run(torchrun.parse_args(spec.torchrun_args(module, module_args)))
    except ChildFailedError as exc:
        # the root cause: the earliest failure that was not torchrun stopping the others (negative codes)
        rank, failure = min(exc.failures.items(), key=lambda kv: (kv[1].exitcode <= 0, kv[1].timestamp, kv[0]))
        raise WorkersFailed(rank, failure.exitcode) from None
    except SignalException:
        raise KeyboardInterrupt from None
    except RendezvousTimeoutError:
        raise TrainingError(
            f"rendezvous at {where} timed out after {spec.rdzv_timeout:g} s: not all {spec.nnodes} nodes joined; {hint}"
        ) from None
    except (RendezvousError, dist.DistError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise TrainingError(f"rendezvous at {where} failed within {spec.rdzv_timeout:g} s ({detail}); {hint}") from None
