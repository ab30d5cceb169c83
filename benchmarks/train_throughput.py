"""How fast does the training loop go on this device?

Builds an in-memory dataset (the synthetic shapes from ``visionloop.data.synthetic.make_arrays``, or
scikit-learn's 8x8 digits), wraps it in the package's ``Dataset`` / ``DatasetManifest`` types and
calls the real ``visionloop.training.train.train()`` on it. For each variant it prints training
images/s three ways:

- ``TrainResult``: the figure ``train()`` reports (training steps only, every epoch, the first
  one's warm-up included);
- steady: the same, from the second epoch on (``history[*].epoch_seconds``), so one-off costs
  (cuDNN kernel choice, ``torch.compile``) drop out;
- end-to-end: training images x epochs / wall time of the whole call (model build, data to the
  device, per-epoch validation and checkpoints included).

The achieved model FLOP/s is 3 x ``flops_per_image`` (forward + backward ≈ 3 x forward) x steady
images/s. On CUDA it is divided by the device's datasheet peak of dense bf16 tensor FLOP/s (a small
table keyed by the device name; an estimate of the peak, not a measurement) to give the model FLOP
utilisation (MFU).

The baseline, measured in the same run:
- on CPU: the same ``train()`` with ``train.threads=1`` against every thread (the default);
- on CUDA: ``train()`` offers no switch to turn off bf16 autocast and channels_last, so the baseline
  is a plain eager PyTorch loop written here: the same ``ResidualCNN`` and model size, the same
  batch size, optimiser and GPU-resident data, fp32 in NCHW, no augmentation, no validation.
  (PyTorch lets cuDNN use TF32 for fp32 convolutions by default; the flag is printed.)
``--baseline eager`` uses the eager loop on CPU too, to see what ``train()`` adds around the steps.
``--compile`` adds a ``train.compile=true`` run (``train()`` compiles on CUDA only).
Each variant runs ``--trials`` times in alternating order (A B, B A, ...) and its best trial is
reported, since a shared machine makes single timings noisy; the load average is printed too.

    .venv/bin/python benchmarks/train_throughput.py                      # small: under a minute on 2 CPU cores
    .venv/bin/python benchmarks/train_throughput.py --images 50000 --batch-size 512 --epochs 4 --compile
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from _common import print_load  # benchmarks/ is on sys.path when a script runs
from visionloop.config import TrainSettings
from visionloop.data.preprocess import Dataset, DatasetManifest
from visionloop.data.synthetic import MAX_CLASSES, SyntheticSpec, class_names, make_arrays
from visionloop.training.model import ModelSpec, ResidualCNN, flops_per_image
from visionloop.training.train import pick_device, to_float, train

# Datasheet dense (no sparsity) bf16 tensor-core FLOP/s, matched in order as substrings of
# torch.cuda.get_device_name(); more specific names first.
PEAK_BF16_DENSE_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
)

console = Console()


@dataclass
class Measurement:
    name: str
    device: str
    precision: str
    threads: int | None
    epochs: int
    train_images: int
    wall_seconds: float
    images_per_second: float  # TrainResult's definition: training steps of every epoch
    steady_images_per_second: float | None  # epochs after the first
    end_to_end_images_per_second: float
    achieved_flops: float | None = None  # 3 x forward FLOPs x steady (or all-epoch) images/s
    mfu: float | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training images/s of visionloop's train() on this device, against a baseline run here.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", choices=("synthetic", "digits"), default="synthetic", help="image generator")
    parser.add_argument("--image-size", type=int, default=32, help="synthetic image side (digits are 8x8)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3, help="synthetic channels (digits: 1)")
    parser.add_argument("--classes", type=int, default=4, help=f"synthetic classes, 2..{MAX_CLASSES} (digits: 10)")
    parser.add_argument("--images", type=int, default=1024, help="training images (digits: at most 1797 - val)")
    parser.add_argument("--val-images", type=int, default=256, help="validation images (train() needs some)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per optimisation step")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per variant (>= 2 gives a steady figure)")
    parser.add_argument("--width", type=int, default=0, help="model width; 0 lets the package size it")
    parser.add_argument("--depth", type=int, default=0, help="model stages; 0 lets the package size it")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="training device")
    parser.add_argument(
        "--baseline",
        choices=("auto", "threads", "eager", "none"),
        default="auto",
        help="auto: threads=1 on CPU, the fp32 eager loop on CUDA",
    )
    parser.add_argument("--compile", action="store_true", help="also run train() with torch.compile (CUDA only)")
    parser.add_argument("--trials", type=int, default=2, help="measurements per variant, best one reported")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed")
    parser.add_argument("--json-out", type=Path, default=None, help="write every number to this JSON file")
    args = parser.parse_args(argv)
    if min(args.images, args.val_images, args.epochs, args.batch_size, args.trials) < 1:
        parser.error("--images, --val-images, --epochs, --batch-size and --trials must be at least 1")
    return args


# ------------------------------------------------------------------------------------ the data


def build_dataset(args: argparse.Namespace) -> Dataset:
    """Train + val images in the package's in-memory dataset type (no files written)."""
    total = args.images + args.val_images
    if args.data == "synthetic":
        per_class = math.ceil(total / args.classes)
        spec = SyntheticSpec(
            classes=args.classes, per_class=per_class, size=args.image_size, channels=args.channels, seed=args.seed
        )
        images, labels = make_arrays(spec)
        classes = class_names(args.classes)
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        if total > len(digits.target):
            raise SystemExit(f"digits has {len(digits.target)} images; --images + --val-images is {total}")
        images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
        labels = digits.target.astype(np.int64)
        classes = [str(d) for d in range(10)]
    order = np.random.default_rng(args.seed).permutation(len(labels))[:total]
    images, labels = images[order], labels[order]
    split = np.zeros(total, dtype=np.int8)
    split[args.images :] = 1  # val

    train_pixels = images[split == 0].astype(np.float64) / 255.0
    manifest = DatasetManifest(
        version=f"bench-{args.data}-{images.shape[2]}px-{len(labels)}",
        classes=classes,
        image_size=images.shape[2],
        channels=images.shape[1],
        mean=[float(m) for m in train_pixels.mean(axis=(0, 2, 3))],
        std=[float(max(s, 1e-3)) for s in train_pixels.std(axis=(0, 2, 3))],
        counts={
            name: {c: int(((split == s) & (labels == i)).sum()) for i, c in enumerate(classes)}
            for s, name in enumerate(("train", "val"))
        },
        params={},
        source=args.data,
        hflip_ok=args.data == "synthetic",
    )
    hashes = np.asarray([f"bench-{i}" for i in range(total)])
    return Dataset(manifest, images, labels, split, hashes)


# ------------------------------------------------------------------------------------ the runs


def bench_settings(args: argparse.Namespace, device: str, **extra: Any) -> TrainSettings:
    """The training settings every throughput variant shares: the script's options, no early stopping."""
    return TrainSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        width=args.width,
        depth=args.depth,
        device=device,
        seed=args.seed,
        patience=args.epochs + 1,  # no early stop: every variant runs every epoch
        **extra,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_train(
    name: str, dataset: Dataset, settings: TrainSettings, device: torch.device
) -> tuple[Measurement, Any]:
    """One call of the package's ``train()``; returns the measurement and the TrainResult."""
    with tempfile.TemporaryDirectory(prefix="visionloop-throughput-") as out:
        started = time.perf_counter()
        result = train(dataset, Path(out), settings, hflip=dataset.manifest.hflip_ok, show_progress=False)
        sync(device)
        wall = time.perf_counter() - started
    n = int((dataset.split == 0).sum())
    later = [h["epoch_seconds"] for h in result.history[1:]]
    on_cuda = device.type == "cuda"
    return (
        Measurement(
            name=name,
            device=result.device,
            precision="bf16 autocast, channels_last" if on_cuda else "fp32",
            threads=None if on_cuda else torch.get_num_threads(),
            epochs=result.epochs_run,
            train_images=n,
            wall_seconds=wall,
            images_per_second=result.images_per_second,
            steady_images_per_second=n * len(later) / sum(later) if later else None,
            end_to_end_images_per_second=n * result.epochs_run / wall,
        ),
        result,
    )


def measure_eager(
    name: str, dataset: Dataset, spec: ModelSpec, settings: TrainSettings, device: torch.device, seed: int
) -> Measurement:
    """The baseline loop: same model and batch size, fp32 NCHW, no augmentation, no validation."""
    if device.type == "cpu":
        torch.set_num_threads(settings.threads or os.cpu_count() or 1)  # as train() does
    started = time.perf_counter()
    torch.manual_seed(seed)
    images, labels = (torch.from_numpy(a).to(device) for a in dataset.part("train"))
    model = ResidualCNN(spec).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    epoch_seconds = []
    for _ in range(settings.epochs):
        sync(device)
        epoch_started = time.perf_counter()
        order = torch.randperm(len(images), generator=generator).to(device)
        for start in range(0, len(order), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            loss = F.cross_entropy(model(to_float(images[idx])), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)
        epoch_seconds.append(time.perf_counter() - epoch_started)
    wall = time.perf_counter() - started
    n = len(images)
    later = epoch_seconds[1:]
    return Measurement(
        name=name,
        device=str(device),
        precision="fp32, NCHW",
        threads=None if device.type == "cuda" else torch.get_num_threads(),
        epochs=settings.epochs,
        train_images=n,
        wall_seconds=wall,
        images_per_second=n * len(epoch_seconds) / sum(epoch_seconds),
        steady_images_per_second=n * len(later) / sum(later) if later else None,
        end_to_end_images_per_second=n * settings.epochs / wall,
    )


def peak_bf16_flops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_DENSE_FLOPS:
        if key in device_name:
            return peak
    return None


def speed(m: Measurement) -> float:
    """The figure variants are compared on: steady images/s, or all epochs' when there is one epoch."""
    return m.steady_images_per_second or m.images_per_second


def add_flops(m: Measurement, forward_flops: int, peak: float | None) -> None:
    m.achieved_flops = 3 * forward_flops * speed(m)
    if peak is not None and m.precision.startswith("bf16"):
        m.mfu = m.achieved_flops / peak


# ------------------------------------------------------------------------------------ report


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def results_table(measurements: list[Measurement], title: str) -> Table:
    """One column per variant, one row per figure (stays narrow in an 80-column log)."""
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for m in measurements:
        table.add_column(m.name, justify="right")
    rows: list[tuple[str, list[str]]] = [
        ("precision", [m.precision for m in measurements]),
        ("CPU threads", ["-" if m.threads is None else str(m.threads) for m in measurements]),
        ("img/s TrainResult", [fmt(m.images_per_second) for m in measurements]),
        ("img/s steady (epoch 2+)", [fmt(m.steady_images_per_second) for m in measurements]),
        ("img/s end-to-end", [fmt(m.end_to_end_images_per_second) for m in measurements]),
        ("wall s", [f"{m.wall_seconds:.2f}" for m in measurements]),
        (
            "model GFLOP/s",
            [fmt(None if m.achieved_flops is None else m.achieved_flops / 1e9, ",.1f") for m in measurements],
        ),
        (
            "MFU (est. peak)",
            [fmt(None if m.mfu is None else 100 * m.mfu, ".2f") + ("%" if m.mfu else "") for m in measurements],
        ),
    ]
    for label, cells in rows:
        table.add_row(label, *cells)
    return table


def ratio_line(label: str, fast: Measurement, slow: Measurement) -> dict[str, float | None]:
    ratios = {
        "trainresult": fast.images_per_second / slow.images_per_second,
        "steady": (
            fast.steady_images_per_second / slow.steady_images_per_second
            if fast.steady_images_per_second and slow.steady_images_per_second
            else None
        ),
        "end_to_end": fast.end_to_end_images_per_second / slow.end_to_end_images_per_second,
    }
    console.print(
        f"[bold]{label}[/]: {fmt(ratios['steady'], '.2f')}× steady, {ratios['trainresult']:.2f}× TrainResult, "
        f"{ratios['end_to_end']:.2f}× end-to-end"
    )
    return ratios


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()  # 1, 5, 15 minutes: how busy the machine was before we started
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # create the CUDA context before anything is timed
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({os.cpu_count()} logical cores)"
    baseline = args.baseline
    if baseline == "auto":
        baseline = "eager" if device.type == "cuda" else "threads"
    if baseline == "threads" and device.type == "cuda":
        raise SystemExit("--baseline threads compares CPU thread counts; on CUDA use eager (or auto)")

    started = time.perf_counter()
    dataset = build_dataset(args)
    data_seconds = time.perf_counter() - started
    manifest = dataset.manifest
    console.print(
        f"[bold]visionloop training throughput[/]  device={device_name}  torch={torch.__version__}  "
        f"data={args.data} {manifest.channels}x{manifest.image_size}x{manifest.image_size}, "
        f"{len(manifest.classes)} classes, "
        f"{args.images} train + {args.val_images} val images (built in {data_seconds:.2f} s)  "
        f"batch={args.batch_size}  epochs={args.epochs}"
    )
    if device.type == "cuda":
        console.print(f"cuDNN may use TF32 for fp32 convolutions: {torch.backends.cudnn.allow_tf32}")

    settings = bench_settings(args, device.type)
    # (name, "train" or "eager", settings); the train() default comes first, the eager loop takes its model spec.
    variants: list[tuple[str, str, TrainSettings]] = [("train()", "train", settings)]
    if args.compile and device.type == "cuda":
        variants.append(("train() compiled", "train", settings.model_copy(update={"compile": True})))
    elif args.compile:
        console.print("note: --compile skipped: train() only compiles on CUDA")
    if baseline == "threads":
        variants.append(("baseline: train() 1 thread", "train", settings.model_copy(update={"threads": 1})))
    elif baseline == "eager":
        variants.append(("baseline: eager fp32 loop", "eager", settings))

    # Trials alternate the order of the variants (A B, B A, ...) so that neither always runs first;
    # each variant's best trial is reported, the usual defence against a machine shared with others.
    trials: dict[str, list[Measurement]] = {name: [] for name, _, _ in variants}
    spec: ModelSpec | None = None
    failed: dict[str, str] = {}
    for trial in range(args.trials):
        for name, kind, variant_settings in variants if trial % 2 == 0 else variants[::-1]:
            if name in failed:
                continue
            if kind == "train" and variant_settings.compile:
                try:  # torch.compile needs a working Triton/compiler toolchain; report, don't abort the rest
                    measurement, _ = measure_train(name, dataset, variant_settings, device)
                except Exception as exc:
                    failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    console.print(f"  {name} failed: {failed[name]}")
                    del trials[name]
                    continue
            elif kind == "train":
                measurement, result = measure_train(name, dataset, variant_settings, device)
                spec = spec or result.spec
            else:
                assert spec is not None  # the train() default ran first in trial 1
                measurement = measure_eager(name, dataset, spec, variant_settings, device, args.seed)
            trials[name].append(measurement)
            console.print(
                f"  trial {trial + 1}/{args.trials}  {name:<28} {fmt(speed(measurement))} img/s steady, "
                f"{measurement.wall_seconds:.2f} s wall"
            )
    assert spec is not None
    forward_flops = flops_per_image(spec)
    best = {name: max(items, key=speed) for name, items in trials.items()}
    measurements = list(best.values())

    peak = peak_bf16_flops(device_name) if device.type == "cuda" else None
    for item in measurements:
        add_flops(item, forward_flops, peak)

    console.print(
        f"model: ResidualCNN width={spec.width} depth={spec.depth}, "
        f"{forward_flops / 1e6:.1f} MFLOP forward per image ({3 * forward_flops / 1e6:.1f} MFLOP train step per image)"
    )
    console.print(results_table(measurements, f"training throughput on {device_name}"))
    if device.type == "cuda":
        if peak is None:
            console.print(f"MFU: unknown peak for '{device_name}' (add it to PEAK_BF16_DENSE_FLOPS)")
        else:
            console.print(
                f"MFU = 3 x forward FLOPs x steady img/s / {peak / 1e12:.0f} TFLOP/s, the datasheet dense bf16 "
                f"peak of '{device_name}' (an estimate of peak, not measured); fp32 rows have no MFU"
            )
    else:
        console.print("model GFLOP/s = 3 x forward FLOPs x steady img/s; no MFU on CPU (no peak table)")

    load_end = print_load(console, load_start)
    ratios: dict[str, Any] = {}
    default = best["train()"]
    base = next((best[name] for name in best if name.startswith("baseline")), None)
    if base is not None:
        label = (
            f"all {default.threads} threads vs 1 thread"
            if baseline == "threads"
            else "train() default vs plain eager fp32 loop"
        )
        ratios["default_vs_baseline"] = ratio_line(label, default, base)
    if "train() compiled" in best:
        ratios["compiled_vs_default"] = ratio_line("train() compiled vs not", best["train() compiled"], default)

    if args.json_out is not None:
        result_json = {
            "question": "how fast does the training loop go on this device?",
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "device_name": device_name,
            "load_average_1min": {"start": load_start[0], "end": load_end[0]},
            "torch": torch.__version__,
            "data_build_seconds": data_seconds,
            "model": {**spec.to_dict(), "forward_flops_per_image": forward_flops},
            "peak_bf16_dense_flops": peak,
            "best": [asdict(item) for item in measurements],
            "trials": {name: [asdict(item) for item in items] for name, items in trials.items()},
            "ratios": ratios,
            "failed": failed,
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result_json, indent=2))
        console.print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
