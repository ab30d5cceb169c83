"""Does the CUDA training path reach the same accuracy as the CPU path, and how much faster is it?

Builds the digits dataset with the real data steps (ingest → validate → preprocess), then trains the
same model with the same settings on the CPU (the baseline, measured in this run) and on CUDA
(bf16 autocast, channels_last, GPU-resident data), optionally also with ``torch.compile``. For each
it prints test accuracy, training images/s, wall time, and the ratio to the CPU run; each
CUDA-trained model is exported to ONNX and its parity with PyTorch checked.

No MLflow needed: this calls the library functions directly, so it runs on a bare GPU machine.

    python benchmarks/cuda_vs_cpu.py                 # digits, 30 epochs
    python benchmarks/cuda_vs_cpu.py --compile       # add a torch.compile run on CUDA
    python benchmarks/cuda_vs_cpu.py --source synthetic --epochs 10
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from visionloop.config import Settings, TrainSettings, ValidationPolicy
from visionloop.data.preprocess import PreprocessParams, load_dataset, preprocess
from visionloop.data.sources import ingest
from visionloop.data.synthetic import SyntheticSpec
from visionloop.data.validate import validate
from visionloop.training.export import export
from visionloop.training.train import load_model, predict_proba, train


def build_dataset(source: str, home: Path) -> Path:
    ingested = ingest(source, home, synthetic=SyntheticSpec(classes=6, per_class=400, size=32, channels=3))
    report = validate(ingested.root, ValidationPolicy())
    params = PreprocessParams(image_size=0, channels=0, val_fraction=0.1, test_fraction=0.2, seed=0)
    return preprocess(report, params, home / "datasets", source=source, hflip_ok=ingested.hflip_ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="digits", help="digits (default) or synthetic")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="also train with torch.compile on CUDA")
    args = parser.parse_args()

    console = Console()
    with tempfile.TemporaryDirectory(prefix="visionloop-bench-") as tmp:
        home = Path(tmp)
        dataset = load_dataset(build_dataset(args.source, home))
        x_test, y_test = dataset.part("test")
        base = Settings().train.model_dump()
        variants: list[tuple[str, dict]] = [("cpu (baseline)", {"device": "cpu"})]
        if torch.cuda.is_available():
            variants.append(("cuda bf16 channels_last", {"device": "cuda"}))
            if args.compile:
                variants.append(("cuda + torch.compile", {"device": "cuda", "compile": True}))
        else:
            console.print("[yellow]no CUDA device: only the CPU baseline runs[/]")
        rows = []
        for name, overrides in variants:
            settings = TrainSettings(**{**base, "epochs": args.epochs, "batch_size": args.batch_size, **overrides})
            started = time.perf_counter()
            result = train(
                dataset, home / name.split()[0] / "run", settings, hflip=dataset.manifest.hflip_ok, show_progress=False
            )
            wall = time.perf_counter() - started
            model, _ = load_model(result.model_path)
            probs = predict_proba(model, torch.from_numpy(x_test)).numpy()
            accuracy = float((probs.argmax(1) == y_test).mean())
            parity = export(result.model_path, dataset, home / f"export-{len(rows)}", tolerance=1e-4).max_abs_diff
            rows.append((name, accuracy, result.images_per_second, wall, result.epochs_run, parity))

    n_train = sum(dataset.manifest.counts["train"].values())
    table = Table(title=f"training on {args.source}: {n_train} train images, {args.epochs} epochs max")
    for column in ("variant", "test acc", "train img/s", "wall s", "epochs", "ONNX parity", "speed vs cpu"):
        table.add_column(column)
    cpu_speed = rows[0][2]
    for name, accuracy, speed, wall, epochs, parity in rows:
        table.add_row(
            name,
            f"{accuracy:.4f}",
            f"{speed:,.0f}",
            f"{wall:.1f}",
            str(epochs),
            f"{parity:.1e}",
            f"{speed / cpu_speed:.1f}x",
        )
    console.print(table)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    console.print(f"torch {torch.__version__}, CUDA device: {device}, CPU threads: {torch.get_num_threads()}")
    console.print(f"accuracy difference cuda - cpu: {np.round([r[1] - rows[0][1] for r in rows[1:]], 4).tolist()}")


if __name__ == "__main__":
    main()
