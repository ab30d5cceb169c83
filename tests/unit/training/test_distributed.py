"""Data-parallel training: the sharding rules, the launcher's checks, and real 2-process DDP on CPU (gloo).

The multi-process tests start two processes with ``torch.multiprocessing`` (what torchrun sets in the
environment, set by hand) and call the real ``train()`` in both; every process writes what it saw to
a file and the assertions run here. One group of two processes runs all the training scenarios, so
that the (slow) start of the processes is paid once.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from visionloop.config import TrainSettings
from visionloop.data.preprocess import Dataset
from visionloop.errors import TrainingError
from visionloop.training import distributed
from visionloop.training.distributed import Launch, World, check_world, pad_to_world, rank_share, world_from_env
from visionloop.training.train import load_model, train

# ---------------------------------------------------------------------------------- the rules, one process


def test_world_from_env_reads_what_torchrun_sets():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    world = world_from_env(env)
    assert world == World(rank=3, size=4, local_rank=1, local_size=2)
    assert world.distributed and not world.is_rank0
    assert world_from_env({}) == World()  # no torchrun: one process, rank 0
    assert not world_from_env({"WORLD_SIZE": "1", "RANK": "0"}).distributed


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "two"}, {"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "0"}])
def test_a_malformed_torchrun_environment_is_an_error(env):
    with pytest.raises(TrainingError, match="environment"):
        world_from_env(env)


def test_without_a_process_group_the_helpers_do_nothing():
    tensor = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(tensor) is tensor and tensor.tolist() == [1.0, 2.0]
    assert distributed.from_rank0(lambda: "decided") == "decided"
    distributed.barrier()
    distributed.broadcast_buffers(torch.nn.BatchNorm1d(2))
    with distributed.process_group("cpu", 5) as world:  # WORLD_SIZE unset: no group is created
        assert world == World()
        assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(("n", "batch", "world"), [(63, 32, 2), (64, 32, 2), (100, 32, 4), (33, 32, 2), (95, 48, 3)])
def test_every_step_splits_evenly_and_the_steps_match_one_process(n, batch, world):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    padded = pad_to_world(order, batch, world)
    assert torch.equal(padded[:n], order)  # the permutation itself is untouched
    assert len(padded) - n < world
    assert torch.equal(padded[n:], order[: len(padded) - n])  # topped up from the start
    batches = [padded[s : s + batch] for s in range(0, len(padded), batch)]
    assert len(batches) == -(-n // batch)  # as many steps as a single process takes: the schedule resumes anywhere
    for global_batch in batches:
        shares = [rank_share(global_batch, World(rank=r, size=world)) for r in range(world)]
        assert {len(s) for s in shares} == {len(global_batch) // world}
        assert torch.equal(torch.cat(shares), global_batch)  # the ranks together train on the global batch
    assert set(padded.tolist()) == set(range(n))  # every image, every epoch


def test_one_process_takes_the_whole_batch():
    order = torch.arange(10)
    assert torch.equal(pad_to_world(order, 4, 1), order)
    assert torch.equal(rank_share(order, World()), order)


@pytest.mark.parametrize(
    ("n", "batch", "world", "problem"),
    [
        (100, 30, 4, "does not divide among 4 processes"),
        (100, 33, 2, "e.g. 32 or 34"),
        (100, 1, 2, "e.g. 2"),
        (20, 32, 2, "fewer than one global batch"),
    ],
)
def test_a_world_that_cannot_share_the_data_is_refused(n, batch, world, problem):
    with pytest.raises(TrainingError, match=problem):
        check_world(n, batch, world)


def test_a_world_that_shares_the_data_is_accepted():
    check_world(64, 32, 2)
    check_world(32, 32, 32)
    check_world(5, 64, 1)  # one process: as before, any batch size


@pytest.mark.parametrize(
    ("launch", "problem"),
    [
        (Launch(2, nnodes=2), "missing rendezvous endpoint"),
        (Launch(2, nnodes=2, rdzv_endpoint="node0"), "expected HOST:PORT"),
        (Launch(2, nnodes=2, rdzv_endpoint="node0:99999"), "expected HOST:PORT"),
        (Launch(2, nnodes=2, node_rank=2, rdzv_endpoint="node0:29400"), "--node-rank 2"),
        (Launch(0), "at least 1"),
        (Launch(2, rdzv_timeout=0), "--rdzv-timeout"),
    ],
)
def test_launcher_refuses_what_would_hang_or_fail_later(launch, problem):
    with pytest.raises(TrainingError, match=problem):
        launch.check()


def test_launcher_arguments_for_one_node_static_and_c10d_rendezvous():
    one_node = Launch(2).torchrun_args("visionloop.cli", ["train", "--json"])
    assert one_node[-4:] == ["-m", "visionloop.cli", "train", "--json"]
    assert "--standalone" in one_node and one_node[one_node.index("--nproc-per-node") + 1] == "2"

    static = Launch(4, nnodes=2, node_rank=1, rdzv_endpoint="node0:29400", rdzv_timeout=60)
    static.check()
    args = static.torchrun_args("visionloop.cli", ["train"])
    assert args[args.index("--rdzv-backend") + 1] == "static"
    assert args[args.index("--node-rank") + 1] == "1"
    assert args[args.index("--rdzv-conf") + 1] == "timeout=60"
    assert static.world_size == 8

    c10d = Launch(1, nnodes=3, rdzv_endpoint="node0:29400", rdzv_timeout=30).torchrun_args("m", [])
    assert c10d[c10d.index("--rdzv-backend") + 1] == "c10d"
    assert c10d[c10d.index("--rdzv-endpoint") + 1] == "node0:29400"
    assert c10d[c10d.index("--rdzv-conf") + 1] == "join_timeout=30,read_timeout=30"
    assert "--max-restarts" in c10d and "--standalone" not in c10d

    from torch.distributed import run as torchrun

    parsed = torchrun.parse_args(static.torchrun_args("visionloop.cli", ["train"]))  # torchrun accepts them
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.node_rank) == ("2", "4", 1)
    assert parsed.module and parsed.training_script == "visionloop.cli"


# ---------------------------------------------------------------------------------- two processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings(**overrides: Any) -> TrainSettings:
    values: dict[str, Any] = {
        "epochs": 4,
        "width": 8,
        "depth": 2,
        "batch_size": 32,
        "patience": 100,
        "device": "cpu",
        "threads": 1,
        "seed": 0,
        "dist_timeout": 60,
    }
    return TrainSettings(**{**values, **overrides})


def run_two_processes(target: Any, *args: Any) -> None:
    """``target(rank, *args)`` in two processes that torchrun's environment variables join into one group."""
    mp.start_processes(target, args=(free_port(), *args), nprocs=2, start_method="spawn", join=True)


def _as_torchrun_would(rank: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
    )


def _summary(result: Any) -> dict[str, Any]:
    keys = ("epochs_run", "best_epoch", "best_val_accuracy", "resumed_from_epoch", "device", "world_size")
    return {**{k: getattr(result, k) for k in keys}, "temperature": result.temperature, "history": result.history}


def _refuse() -> None:
    raise TrainingError("checkpoint is unreadable")


def _scenarios(rank: int, port: int, dataset: Dataset, out: Path, single_checkpoint: Path) -> None:
    """Everything the two processes do, in order; rank r writes what it saw to out/rank{r}.json."""
    _as_torchrun_would(rank, port)
    seen: dict[str, Any] = {}
    with distributed.process_group("cpu", 60) as world:  # train() below joins this group, as under the CLI
        # the helpers
        seen["world"] = [world.rank, world.size]
        seen["sum"] = distributed.all_reduce_sum(torch.tensor([1.0, float(rank)])).tolist()
        seen["from_rank0"] = distributed.from_rank0(lambda: f"decided by rank {rank}")
        try:
            distributed.from_rank0(_refuse)
        except TrainingError as exc:
            seen["rank0_error"] = str(exc)
        norm = torch.nn.BatchNorm1d(2)
        norm.running_mean.fill_(float(rank + 1))
        distributed.broadcast_buffers(norm)
        seen["buffers"] = norm.running_mean.tolist()

        # 1. four epochs in two processes; after epoch 2, rank 0 keeps a copy of the checkpoint
        #    (on_epoch runs before the epoch's own checkpoint: at epoch 3, last.pt holds epoch 2)
        def keep_epoch_2(epoch: int, _metrics: dict[str, float]) -> None:
            if epoch == 3:
                (out / "ddp-epoch2").mkdir()
                shutil.copy(out / "straight" / "last.pt", out / "ddp-epoch2" / "last.pt")

        straight = train(dataset, out / "straight", settings(), hflip=True, on_epoch=keep_epoch_2, show_progress=False)
        seen["straight"] = _summary(straight)

        # 2. resume that copy in two processes: it must end exactly where the straight run ended
        if world.is_rank0:
            shutil.copytree(out / "ddp-epoch2", out / "ddp-resumed")
        resumed = train(dataset, out / "ddp-resumed", settings(), hflip=True, resume=True, show_progress=False)
        seen["ddp_resumed"] = _summary(resumed)

        # 3. resume a single-process checkpoint in two processes
        if world.is_rank0:
            shutil.copytree(single_checkpoint, out / "from-single")
        from_single = train(dataset, out / "from-single", settings(), hflip=True, resume=True, show_progress=False)
        seen["from_single"] = _summary(from_single)

        # 4. a checkpoint that does not fit: every rank fails with rank 0's error, none waits forever
        try:
            train(dataset, out / "ddp-epoch2", settings(epochs=5), hflip=True, resume=True, show_progress=False)
        except TrainingError as exc:
            seen["mismatch_error"] = str(exc)
    seen["group_left"] = not torch.distributed.is_initialized()
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


@pytest.fixture(scope="module")
def two_processes(tiny_dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Runs ``_scenarios`` in two processes once (after a single-process run to resume from)."""
    out = tmp_path_factory.mktemp("ddp")

    def keep_epoch_2(epoch: int, _metrics: dict[str, float]) -> None:
        if epoch == 3:
            (out / "single-epoch2").mkdir()
            shutil.copy(out / "single" / "last.pt", out / "single-epoch2" / "last.pt")

    single = train(tiny_dataset, out / "single", settings(), hflip=True, on_epoch=keep_epoch_2, show_progress=False)
    run_two_processes(_scenarios, tiny_dataset, out, out / "single-epoch2")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"out": out, "ranks": ranks, "single": single}


def without_seconds(summary: dict[str, Any]) -> dict[str, Any]:
    return {**summary, "history": [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in summary["history"]]}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path)[0].state_dict()


def test_collective_helpers_in_two_processes(two_processes):
    rank0, rank1 = two_processes["ranks"]
    assert (rank0["world"], rank1["world"]) == ([0, 2], [1, 2])
    assert rank0["sum"] == rank1["sum"] == [2.0, 1.0]
    assert rank0["from_rank0"] == rank1["from_rank0"] == "decided by rank 0"
    assert rank0["rank0_error"] == rank1["rank0_error"] == "checkpoint is unreadable"
    assert rank0["buffers"] == rank1["buffers"] == [1.0, 1.0]  # rank 0's statistics everywhere
    assert rank0["group_left"] and rank1["group_left"]


def test_two_processes_train_one_model_in_lock_step(two_processes):
    out = two_processes["out"]
    rank0, rank1 = (r["straight"] for r in two_processes["ranks"])
    # all-reduced metrics: the same history, best epoch and temperature on every rank (each keeps its own clock)
    assert without_seconds(rank0) == without_seconds(rank1)
    assert rank0["world_size"] == 2 and rank0["device"] == "cpu x2 (DDP, gloo)"
    assert rank0["epochs_run"] == 4 and [h["epoch"] for h in rank0["history"]] == [1, 2, 3, 4]
    # rank 0 alone wrote files: one checkpoint and one model, nothing else
    assert sorted(p.name for p in (out / "straight").iterdir()) == ["last.pt", "model.pt"]
    checkpoint = torch.load(out / "straight" / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 4
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # the plain module, no DDP wrapper
    model, _ = load_model(out / "straight" / "model.pt")
    assert float(model.temperature) == pytest.approx(rank0["temperature"])


def test_a_two_process_run_resumed_in_two_processes_ends_where_the_straight_run_ended(two_processes):
    out = two_processes["out"]
    resumed = two_processes["ranks"][0]["ddp_resumed"]
    straight = two_processes["ranks"][0]["straight"]
    assert resumed["resumed_from_epoch"] == 2 and resumed["epochs_run"] == 4
    assert resumed["history"] == [
        {**h, "epoch_seconds": r["epoch_seconds"]} for h, r in zip(straight["history"], resumed["history"], strict=True)
    ]
    expected, actual = weights(out / "straight" / "model.pt"), weights(out / "ddp-resumed" / "model.pt")
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_a_two_process_checkpoint_resumes_in_one_process(two_processes, tiny_dataset, tmp_path):
    out = two_processes["out"]
    straight = two_processes["ranks"][0]["straight"]
    shutil.copytree(out / "ddp-epoch2", tmp_path / "run")
    resumed = train(tiny_dataset, tmp_path / "run", settings(), hflip=True, resume=True, show_progress=False)
    assert resumed.world_size == 1 and resumed.device == "cpu"
    assert resumed.resumed_from_epoch == 2 and resumed.epochs_run == 4
    assert resumed.history[:2] == straight["history"][:2]  # the two epochs trained in two processes
    assert (tmp_path / "run" / "model.pt").is_file()
    assert all(torch.isfinite(v.float()).all() for v in weights(tmp_path / "run" / "model.pt").values())


def test_a_one_process_checkpoint_resumes_in_two_processes(two_processes):
    single = two_processes["single"]
    from_single = two_processes["ranks"][0]["from_single"]
    assert without_seconds(two_processes["ranks"][1]["from_single"]) == without_seconds(from_single)
    assert from_single["resumed_from_epoch"] == 2 and from_single["epochs_run"] == 4
    assert from_single["history"][:2] == single.history[:2]
    assert (two_processes["out"] / "from-single" / "model.pt").is_file()


def test_a_checkpoint_that_does_not_fit_fails_on_every_rank(two_processes):
    rank0, rank1 = (r["mismatch_error"] for r in two_processes["ranks"])
    assert rank0 == rank1 and "trained with epochs=4" in rank0


def _one_rank_goes_missing(rank: int, port: int, out: Path) -> None:
    _as_torchrun_would(rank, port)
    with distributed.process_group("cpu", timeout_s=1):
        if rank == 1:
            time.sleep(3)  # alive, but never joins the all-reduce
            return
        started = time.monotonic()
        try:
            distributed.all_reduce_sum(torch.ones(1))
            outcome = "returned"
        except Exception as exc:
            outcome = type(exc).__name__
        (out / "outcome.json").write_text(json.dumps([outcome, time.monotonic() - started]))


def test_a_collective_without_its_peer_times_out_instead_of_hanging(tmp_path):
    run_two_processes(_one_rank_goes_missing, tmp_path)
    outcome, seconds = json.loads((tmp_path / "outcome.json").read_text())
    assert outcome != "returned"
    assert seconds < 3  # the 1 s timeout, not the peer's return, ended the wait


# ---------------------------------------------------------------------------------- the PyTorchJob

MANIFEST = Path(__file__).resolve().parents[3] / "deploy" / "k8s" / "components" / "gpu-training" / "pytorchjob.yaml"


def manifest_documents() -> dict[str, dict[str, Any]]:
    import yaml

    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc}


def test_pytorchjob_manifest_has_what_the_training_operator_expects():
    documents = manifest_documents()
    assert set(documents) == {"ConfigMap", "PersistentVolumeClaim", "PyTorchJob"}
    job = documents["PyTorchJob"]
    assert job["apiVersion"] == "kubeflow.org/v1"
    nproc = int(job["spec"]["nprocPerNode"])
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    nodes = sum(spec["replicas"] for spec in replicas.values())
    for role, spec in replicas.items():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        # the operator finds the container and the rendezvous port by these names
        assert container["name"] == "pytorch"
        assert {"name": "pytorchjob-port", "containerPort": 23456} in container["ports"]
        assert container["image"] == "visionloop-train"  # kustomize `images:` sets registry and tag per overlay
        assert container["resources"]["limits"]["nvidia.com/gpu"] == nproc, role  # one process per GPU
        assert container["resources"]["requests"]["nvidia.com/gpu"] == nproc, role
        assert container["envFrom"] == [{"configMapRef": {"name": "visionloop-training"}}]  # equal settings
        assert spec["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
        assert "/dev/shm" in {mount["mountPath"] for mount in container["volumeMounts"]}
        script = container["args"][0]
        # the rendezvous the operator describes: node count, processes, node rank, master address and port
        for expected in (
            '--nproc-per-node "$PET_NPROC_PER_NODE"',
            '--nnodes "$PET_NNODES"',
            '--node-rank "$PET_NODE_RANK"',
            '--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"',
            "--rdzv-timeout",
        ):
            assert expected in script, (role, expected)
        # the declared steps from one command, no order written out here; rank 0 is on the Master:
        # only the Master goes on past training to register and promote the model
        assert "visionloop run --to " + ("promote" if role == "Master" else "train") in script, role
        assert "visionloop register" not in script and "visionloop train" not in script

    settings = documents["ConfigMap"]["data"]
    batch = int(settings["VISIONLOOP_TRAIN__BATCH_SIZE"])
    assert batch % (nproc * nodes) == 0  # the global batch divides among every process
    Launch(nproc, nodes, 0, "visionloop-ddp-master-0:23456", 900).check()


def test_pytorchjob_scripts_are_valid_shell_and_its_settings_valid_settings(monkeypatch):
    import subprocess

    from visionloop.config import load_settings

    documents = manifest_documents()
    for spec in documents["PyTorchJob"]["spec"]["pytorchReplicaSpecs"].values():
        script = spec["template"]["spec"]["containers"][0]["args"][0]
        result = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    for key, value in documents["ConfigMap"]["data"].items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.data.source == documents["ConfigMap"]["data"]["VISIONLOOP_DATA__SOURCE"]
    assert settings.train.dist_timeout == 600
