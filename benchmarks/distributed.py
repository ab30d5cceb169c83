"""How well does training scale from one process to N data-parallel processes (DDP) on this machine?

Trains the same model on the same in-memory data (``train_throughput.build_dataset``: synthetic
shapes or digits) with the same global batch and seed, each variant in fresh processes started by
torchrun exactly as ``visionloop train --nproc-per-node N`` starts them, calling the real
``visionloop.training.train.train()``:

- baseline: 1 process with the resources of one of the N (one GPU; on CPU, cores / N threads);
- DDP: N processes (one GPU each, NCCL; on CPU, cores / N threads each, gloo);
- on CPU also 1 process with every core, which is what a single-process run would use.

It prints training images/s (all ranks together: rank 0's ``TrainResult.images_per_second`` and the
steady figure from epoch 2 on), the speed-up of DDP over the baseline and the scaling efficiency
(speed-up / N), all measured in the same run. Each variant runs ``--trials`` times in alternating
order and the best trial is reported; the load average is printed, since a shared machine is noisy.
``--nproc`` defaults to the GPU count on a GPU machine, 2 on CPU.

    .venv/bin/python benchmarks/distributed.py                         # CPU, 2 processes: about 100 s on 2 cores
    python benchmarks/distributed.py --device cuda --images 65536 --batch-size 2048   # every GPU of the machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from _common import print_load  # benchmarks/ is on sys.path when a script runs
from visionloop.training.train import pick_device

console = Console()


@dataclass
class Measurement:
    name: str
    processes: int
    threads_per_process: int | None  # None on CUDA
    device: str
    epochs: int
    train_images: int
    images_per_second: float  # TrainResult: every epoch, all ranks' images
    steady_images_per_second: float | None  # epochs after the first
    launch_to_exit_seconds: float  # torchrun start to the last process's exit (imports included)
    best_val_accuracy: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="DDP scaling of visionloop's train(): 1 process against N, measured in the same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="training device")
    parser.add_argument("--nproc", type=int, default=0, help="DDP processes; 0: the GPU count on CUDA, 2 on CPU")
    parser.add_argument("--data", choices=("synthetic", "digits"), default="synthetic", help="image generator")
    parser.add_argument("--image-size", type=int, default=32, help="synthetic image side (digits are 8x8)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3, help="synthetic channels")
    parser.add_argument("--classes", type=int, default=4, help="synthetic classes")
    parser.add_argument("--images", type=int, default=1024, help="training images")
    parser.add_argument("--val-images", type=int, default=256, help="validation images")
    parser.add_argument("--batch-size", type=int, default=0, help="global batch; 0: 64 x nproc")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per variant (>= 2 gives a steady figure)")
    parser.add_argument("--width", type=int, default=0, help="model width; 0 lets the package size it")
    parser.add_argument("--depth", type=int, default=0, help="model stages; 0 lets the package size it")
    parser.add_argument("--trials", type=int, default=2, help="measurements per variant, best one reported")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed")
    parser.add_argument("--json-out", type=Path, default=None, help="write every number to this JSON file")
    # internal: one training run, in a process torchrun started
    parser.add_argument("--worker-result", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.images, args.val_images, args.epochs, args.trials) < 1 or args.nproc < 0 or args.batch_size < 0:
        parser.error("--images, --val-images, --epochs and --trials must be at least 1")
    return args


# ------------------------------------------------------------------------------------ one run (a worker)


def run_worker(args: argparse.Namespace) -> int:
    """Train once; rank 0 writes the figures. Every process torchrun started runs this."""
    from train_throughput import bench_settings, build_dataset
    from visionloop.training.train import train

    dataset = build_dataset(args)
    settings = bench_settings(args, args.device, threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="visionloop-ddp-bench-") as out:
        result = train(dataset, Path(out), settings, hflip=dataset.manifest.hflip_ok, show_progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        n = int((dataset.split == 0).sum())
        later = [h["epoch_seconds"] for h in result.history[1:]]
        args.worker_result.write_text(
            json.dumps(
                {
                    "device": result.device,
                    "epochs": result.epochs_run,
                    "train_images": n,
                    "images_per_second": result.images_per_second,
                    "steady_images_per_second": n * len(later) / sum(later) if later else None,
                    "best_val_accuracy": result.best_val_accuracy,
                }
            )
        )
    return 0


# ------------------------------------------------------------------------------------ the launcher


# what a worker needs to build the same data and model as every other variant
WORKER_OPTIONS = ("device", "data", "image_size", "channels", "classes", "images", "val_images", "batch_size")
WORKER_OPTIONS += ("epochs", "width", "depth", "seed")


def measure(name: str, args: argparse.Namespace, processes: int, threads: int | None) -> Measurement:
    """One variant: ``processes`` training processes under torchrun, as `visionloop train` starts them."""
    with tempfile.TemporaryDirectory(prefix="visionloop-ddp-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
        command += [str(Path(__file__).resolve()), "--worker-result", str(result_path), "--threads", str(threads or 0)]
        for option in WORKER_OPTIONS:
            command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads or 1)}
        started = time.perf_counter()
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if completed.returncode != 0:
            raise SystemExit(f"{name}: training failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
        worker = json.loads(result_path.read_text())
    return Measurement(
        name=name,
        processes=processes,
        threads_per_process=threads,
        device=worker["device"],
        epochs=worker["epochs"],
        train_images=worker["train_images"],
        images_per_second=worker["images_per_second"],
        steady_images_per_second=worker["steady_images_per_second"],
        launch_to_exit_seconds=seconds,
        best_val_accuracy=worker["best_val_accuracy"],
    )


def threads_label(threads: int) -> str:
    return f"{threads} thread" + ("s" if threads > 1 else "")


def speed(m: Measurement) -> float:
    return m.steady_images_per_second or m.images_per_second


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def results_table(measurements: list[Measurement], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for m in measurements:
        table.add_column(m.name, justify="right")
    rows = [
        ("processes", [str(m.processes) for m in measurements]),
        (
            "threads / process",
            ["-" if m.threads_per_process is None else str(m.threads_per_process) for m in measurements],
        ),
        ("device", [m.device for m in measurements]),
        ("img/s steady (epoch 2+)", [fmt(m.steady_images_per_second) for m in measurements]),
        ("img/s TrainResult", [fmt(m.images_per_second) for m in measurements]),
        ("launch to exit, s", [f"{m.launch_to_exit_seconds:.1f}" for m in measurements]),
        ("best val accuracy", [f"{m.best_val_accuracy:.4f}" for m in measurements]),
    ]
    for label, cells in rows:
        table.add_row(label, *cells)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_result is not None:
        return run_worker(args)
    load_start = os.getloadavg()
    device = pick_device(args.device)
    args.device = device.type
    cores = os.cpu_count() or 1
    if args.nproc == 0:
        args.nproc = torch.cuda.device_count() if device.type == "cuda" else 2
    if device.type == "cuda" and args.nproc > torch.cuda.device_count():
        raise SystemExit(f"--nproc {args.nproc} but this machine has {torch.cuda.device_count()} GPUs")
    args.batch_size = args.batch_size or 64 * args.nproc
    if args.batch_size % args.nproc:
        raise SystemExit(
            f"--batch-size {args.batch_size} (the global batch) must be a multiple of --nproc {args.nproc}"
        )
    n = args.nproc
    if device.type == "cuda":
        device_name = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        per_process = None
    else:
        device_name = f"CPU ({cores} logical cores)"
        per_process = max(1, cores // n)
    console.print(
        f"[bold]visionloop DDP scaling[/]  {device_name}  torch={torch.__version__}  "
        f"data={args.data} {args.images} train + {args.val_images} val images  "
        f"global batch={args.batch_size} ({args.batch_size // n} per process at N={n})  epochs={args.epochs}"
    )
    baseline_name = "1 GPU" if device.type == "cuda" else f"1 process x {threads_label(per_process)}"
    variants: list[tuple[str, int, int | None]] = [
        (baseline_name, 1, per_process),
        (f"DDP {n} processes", n, per_process),
    ]
    if device.type == "cpu" and per_process != cores:
        variants.append((f"1 process x {threads_label(cores)}", 1, cores))

    trials: dict[str, list[Measurement]] = {name: [] for name, _, _ in variants}
    for trial in range(args.trials):
        for name, processes, threads in variants if trial % 2 == 0 else variants[::-1]:
            m = measure(name, args, processes, threads)
            trials[name].append(m)
            console.print(
                f"  trial {trial + 1}/{args.trials}  {name:<26} {fmt(speed(m))} img/s steady, "
                f"{m.launch_to_exit_seconds:.1f} s launch to exit"
            )
    best = {name: max(items, key=speed) for name, items in trials.items()}
    console.print(results_table(list(best.values()), f"training throughput, 1 process vs {n} (DDP) on {device_name}"))
    load_end = print_load(console, load_start)

    base, ddp = best[baseline_name], best[f"DDP {n} processes"]
    speedup = speed(ddp) / speed(base)
    efficiency = speedup / n
    console.print(
        f"[bold]DDP speed-up[/] over {baseline_name}: {speedup:.2f}x steady "
        f"({ddp.images_per_second / base.images_per_second:.2f}x TrainResult); "
        f"scaling efficiency {100 * efficiency:.0f}% (speed-up / {n})"
    )
    ratios: dict[str, Any] = {"speedup_steady": speedup, "scaling_efficiency": efficiency}
    if device.type == "cpu" and f"1 process x {threads_label(cores)}" in best:
        whole = best[f"1 process x {threads_label(cores)}"]
        ratios["ddp_vs_one_process_all_cores"] = speed(ddp) / speed(whole)
        console.print(
            f"DDP {n} processes vs 1 process with all {cores} cores: {speed(ddp) / speed(whole):.2f}x steady "
            "(on one CPU both share the same cores)"
        )
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(
            json.dumps(
                {
                    "question": "how well does training scale from 1 process to N (DDP)?",
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "device_name": device_name,
                    "torch": torch.__version__,
                    "load_average_1min": {"start": load_start[0], "end": load_end[0]},
                    "best": [asdict(m) for m in best.values()],
                    "trials": {name: [asdict(m) for m in items] for name, items in trials.items()},
                    "ratios": ratios,
                },
                indent=2,
            )
        )
        console.print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
