"""How fast is `visionloop serve`, against the ceiling, the beginner's server, and KServe?

On one model and one machine, in one run, this starts and measures:

1. the ceiling: raw ONNX Runtime, batched (``serve.max_batch_size`` images per call), in-process,
   with the same intra-op threads as every server below — no HTTP at all;
2. the baseline a beginner writes (``benchmarks/naive_server.py``): FastAPI + ONNX Runtime, one model
   run per request, in both tutorial styles (``async def`` inline, and plain ``def`` in the thread pool);
3. ``visionloop serve``: ``POST /predict`` with the same multipart PNG as the baseline, and the V2
   protocol with one raw UINT8 image per request in binary framing (what tritonclient sends);
4. KServe's own Python model server on the same ONNX model (``benchmarks/kserve_server.py``) with the
   same V2 binary request, when a Python with ``kserve`` installed is given (``--kserve-python``).

For concurrency 1, 8, 32 and 64 (closed loop, keep-alive, ``benchmarks/_loadgen.py``) it prints
images/s, p50 and p99 latency, errors, and the ratios: against the better naive variant at the same
concurrency, and against the ceiling. Load generator, servers and ceiling share this machine's cores.

The model: by default a fresh one trained for one epoch on the synthetic source at 64x64 RGB with
width 32 (about 5M parameters: a small but real image classifier; accuracy does not matter here),
registered in a temporary store. ``--home DIR`` serves the champion of an existing store instead,
e.g. the digits model `make run` leaves in ``.visionloop`` (a 16x16 grey model so small that HTTP,
not the model, is the whole cost).

    .venv/bin/python benchmarks/serve.py
    .venv/bin/python benchmarks/serve.py --home .visionloop --seconds 3 --json-out serve.json
    python3.11 -m venv /work/kserve-venv && /work/kserve-venv/bin/pip install kserve onnxruntime==1.32.0
    .venv/bin/python benchmarks/serve.py --kserve-python /work/kserve-venv/bin/python
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from _common import print_load  # benchmarks/ is on sys.path when a script runs
from _loadgen import LoadResult, build_request, multipart, run_load
from visionloop import registry
from visionloop.config import load_settings
from visionloop.data.preprocess import to_array
from visionloop.inference import OnnxClassifier

HERE = Path(__file__).resolve().parent
VISIONLOOP = Path(sys.executable).with_name("visionloop")
DEFAULT_KSERVE = Path("/work/kserve-venv/bin/python")
console = Console(width=150)  # the table is wide; keep it unwrapped in logs and pipes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Serving throughput and latency: ceiling vs naive FastAPI vs visionloop serve vs KServe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--home", type=Path, help="serve the champion of this store instead of training a model")
    parser.add_argument("--image-size", type=int, default=64, help="side of the fresh model's input")
    parser.add_argument("--width", type=int, default=32, help="channels of the fresh model's first stage")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads everywhere (0 = all)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="visionloop's batch limit; the ceiling's batch")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="visionloop's batching wait")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per point (after 0.5 s warm-up)")
    parser.add_argument(
        "--kserve-python",
        type=Path,
        default=DEFAULT_KSERVE if DEFAULT_KSERVE.is_file() else None,
        help="a Python with kserve installed (skipped when absent)",
    )
    parser.add_argument("--json-out", type=Path, help="also write every figure as JSON here")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------ the model
def fresh_model(home: Path, image_size: int, width: int) -> None:
    from visionloop.pipeline.runner import run_pipeline

    settings = load_settings(
        None,
        {
            "home": home,
            "data.source": "synthetic",
            "data.synthetic_size": image_size,
            "data.synthetic_classes": 8,
            "data.synthetic_per_class": 20,
            "train.epochs": 1,
            "train.width": width,
            "gate.min_accuracy": 0.0,
        },
    )
    console.print(f"training a {image_size}x{image_size} RGB model (width {width}) in {home} …")
    run_pipeline(settings, show_progress=False)


@dataclass
class Model:
    onnx: Path
    card: Path
    name: str
    classifier: OnnxClassifier
    png: bytes  # one real image from the data set, as PNG


def champion(home: Path, threads: int, dest: Path) -> Model:
    settings = load_settings(None, {"home": home})
    version = registry.resolve(settings, "champion")
    if version is None:
        raise SystemExit(f"no champion in {home}; run `visionloop run` first or leave out --home")
    onnx, card = registry.download_version(settings, version, dest)
    classifier = OnnxClassifier.load(onnx, card, threads=threads)
    root = Path(json.loads((home / "latest" / "ingest.json").read_text())["root"])
    image = next(p for p in sorted(root.rglob("*.png")))
    return Model(onnx, card, settings.registry.model_name, classifier, image.read_bytes())


def ceiling(classifier: OnnxClassifier, batch: int, seconds: float = 3.0) -> float:
    x = np.random.default_rng(0).integers(0, 256, (batch, *classifier.input_shape), dtype=np.uint8)
    for _ in range(3):
        classifier.run(x, batch)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        classifier.run(x, batch)
        done += batch
    return done / (time.perf_counter() - started)


# ------------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(process: subprocess.Popen, url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout:.0f} s")


@dataclass
class Server:
    label: str
    port: int


@contextlib.contextmanager
def started(label: str, command: list[str], ready_path: str, env: dict[str, str]) -> Iterator[Server]:
    """Start a server on a free port (``{port}`` in ``command``), wait until ``ready_path`` answers, stop it after."""
    port = free_port()
    process = subprocess.Popen(
        [part.format(port=port) for part in command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_ready(process, f"http://127.0.0.1:{port}{ready_path}")
        yield Server(label, port)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def measure(
    server: Server, endpoint: str, request: bytes, args: argparse.Namespace, rows: list[dict], images: int = 1
) -> None:
    for concurrency in args.concurrency:
        result: LoadResult = run_load(server.port, request, concurrency, args.seconds, images=images)
        rows.append(
            {
                "server": server.label,
                "endpoint": endpoint,
                "concurrency": concurrency,
                "images_per_s": result.images_per_second,
                "p50_ms": result.percentile_ms(50),
                "p99_ms": result.percentile_ms(99),
                "requests": result.requests,
                "errors": result.error_count,
            }
        )
        console.print(
            f"  {server.label:<22} {endpoint:<16} c={concurrency:<3} {result.images_per_second:8.0f} img/s  "
            f"p50 {result.percentile_ms(50):6.2f} ms  p99 {result.percentile_ms(99):7.2f} ms  "
            f"errors {result.error_count}"
        )


def v2_binary_request(model: Model) -> bytes:
    card = model.classifier.card
    pixels = to_array(Image.open(io.BytesIO(model.png)), card["image_size"], card["channels"])[None]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(pixels.shape),
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": pixels.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return build_request(
        f"/v2/models/{model.name}/infer",
        header + pixels.tobytes(),
        {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )


# ------------------------------------------------------------------------------------ report
def report(rows: list[dict], ceiling_rate: float, ceiling_one: float, args: argparse.Namespace) -> dict[str, Any]:
    naive = {}
    for row in rows:
        if row["server"].startswith("naive"):
            c = row["concurrency"]
            naive[c] = max(naive.get(c, 0.0), row["images_per_s"])
    table = Table(title="serving throughput and latency (images/s; ratios at the same concurrency)")
    for column in ("server", "endpoint", "conc.", "img/s", "p50 ms", "p99 ms", "errors", "× naive best", "÷ ceiling"):
        table.add_column(column, justify="left" if column in ("server", "endpoint") else "right")
    for row in rows:
        base = naive.get(row["concurrency"])
        row["vs_naive"] = row["images_per_s"] / base if base else None
        row["vs_ceiling"] = row["images_per_s"] / ceiling_rate
        table.add_row(
            row["server"], row["endpoint"], str(row["concurrency"]), f"{row['images_per_s']:.0f}",
            f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}", str(row["errors"]),
            "—" if row["vs_naive"] is None else f"{row['vs_naive']:.2f}×", f"{row['vs_ceiling']:.0%}",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"ceiling (raw ONNX Runtime, batch {args.max_batch_size}, same threads): {ceiling_rate:.0f} img/s; "
        f"batch 1: {ceiling_one:.0f} img/s"
    )

    def pick(server: str, endpoint: str, concurrency: int | None = None) -> list[dict]:
        return [
            r
            for r in rows
            if r["server"] == server
            and r["endpoint"] == endpoint
            and (concurrency is None or r["concurrency"] == concurrency)
        ]

    if naive.get(32):
        console.print(
            f"bound: at concurrency 32 no server can beat the naive one by more than ceiling ÷ naive = "
            f"{ceiling_rate / naive[32]:.2f}× here; batching itself can gain at most ceiling ÷ batch-1 = "
            f"{ceiling_rate / ceiling_one:.2f}× in model time"
        )
    targets = {}
    ours32 = pick("visionloop serve", "/predict", 32)
    if ours32 and ours32[0]["vs_naive"]:
        targets["predict_c32_vs_naive"] = (ours32[0]["vs_naive"], 3.0, "≥ 3× the naive server at concurrency 32")
    v2 = pick("visionloop serve", "v2 binary")
    if v2:
        best = max(v2, key=lambda r: r["images_per_s"])
        targets["v2_binary_vs_ceiling"] = (
            best["vs_ceiling"],
            0.6,
            f"V2 binary ≥ 60% of the ceiling (c={best['concurrency']})",
        )
    one = pick("visionloop serve", "v2 binary", 1) or pick("visionloop serve", "/predict", 1)
    if one:
        targets["p99_c1_ms"] = (one[0]["p99_ms"], 10.0, "p99 at concurrency 1 under 10 ms")
    for key, (value, goal, text) in targets.items():
        met = value < goal if key.endswith("_ms") else value >= goal
        shown = f"{value:.2f} ms" if key.endswith("_ms") else (f"{value:.2f}×" if "naive" in key else f"{value:.0%}")
        console.print(f"target {text}: {shown} — " + ("[green]met[/]" if met else "[red]not met[/]"))
    return {k: {"value": v, "goal": g, "what": t} for k, (v, g, t) in targets.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_start = os.getloadavg()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISIONLOOP_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    with tempfile.TemporaryDirectory(prefix="visionloop-bench-serve-") as tmp:
        home = args.home
        if home is None:
            home = Path(tmp) / "home"
            fresh_model(home, args.image_size, args.width)
        model = champion(home.resolve(), args.threads, Path(tmp) / "model")
        card = model.classifier.card
        console.print(
            f"model: {model.name}, input {card['channels']}x{card['image_size']}x{card['image_size']}, "
            f"{card['architecture'].get('parameters', '?')} parameters; ONNX Runtime threads "
            f"{args.threads or 'all'} ({os.cpu_count()} cores)"
        )
        ceiling_rate = ceiling(model.classifier, args.max_batch_size)
        ceiling_one = ceiling(model.classifier, 1)
        console.print(f"ceiling: {ceiling_rate:.0f} img/s at batch {args.max_batch_size}, {ceiling_one:.0f} at batch 1")

        body, headers = multipart([("image.png", model.png)])
        predict = build_request("/predict", body, headers)
        v2 = v2_binary_request(model)
        rows: list[dict] = []
        common = ["--threads", str(args.threads), "--port", "{port}"]
        for style in ("async", "sync"):
            naive = [
                sys.executable,
                str(HERE / "naive_server.py"),
                "--model",
                str(model.onnx),
                "--card",
                str(model.card),
            ]
            with started(f"naive FastAPI ({style})", [*naive, *common, "--style", style], "/docs", env) as server:
                measure(server, "/predict", predict, args, rows)
        ours = [str(VISIONLOOP), "--home", str(home), "serve", "--max-batch-size", str(args.max_batch_size),
                "--max-wait-ms", str(args.max_wait_ms), "--poll-seconds", "0"]  # fmt: skip
        with started("visionloop serve", [*ours, *common], "/readyz", env) as server:
            measure(server, "/predict", predict, args, rows)
            measure(server, "v2 binary", v2, args, rows)
        if args.kserve_python is not None:
            kserve = [str(args.kserve_python), str(HERE / "kserve_server.py"), "--model", str(model.onnx),
                      "--card", str(model.card), "--name", model.name]  # fmt: skip
            with started("KServe ModelServer", [*kserve, *common], "/v2/health/ready", env) as server:
                measure(server, "v2 binary", v2, args, rows)
        else:
            console.print("KServe: skipped (no --kserve-python with kserve installed; see the docstring)")
        targets = report(rows, ceiling_rate, ceiling_one, args)
        load_end = print_load(console, load_start)
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "model": {"input": [card["channels"], card["image_size"], card["image_size"]]},
                    "threads": args.threads,
                    "ceiling_images_per_s": ceiling_rate,
                    "ceiling_batch1_images_per_s": ceiling_one,
                    "rows": rows,
                    "targets": targets,
                    "load_average": {"start": load_start, "end": load_end},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
