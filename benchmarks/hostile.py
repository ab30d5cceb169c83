"""Does `visionloop serve` stay alive and fast for legitimate clients while hostile ones flood it?

One server, one model, one machine, one run. For each mix it runs the same legitimate load (closed loop,
keep-alive, ``--concurrency`` clients posting one small PNG to ``/predict``, ``benchmarks/_loadgen.py``)
and a prober asking ``/healthz`` every ``--probe-interval`` seconds with a one-second timeout (what a
Kubernetes liveness probe does by default). The mixes:

1. ``quiet``: the legitimate load alone — the baseline every other row is compared to;
2. ``huge PNG``: plus three clients posting 4900x4900 PNGs (about 200 KB each, mostly flat: cheap to send,
   a quarter of a second of CPU to decode) back to back;
3. ``big V2 JSON``: plus two clients posting 15.9 MiB V2 JSON bodies (a pixel value every two bytes);
4. ``half-open``: plus ``--half-open`` connections that send half a request header and then nothing;
5. ``all``: all of the hostile clients at once.

It prints, per mix, the failed one-second probes, the legitimate p50/p99 and errors, the legitimate
p99 divided by the quiet run's, and what the hostile requests were answered (status counts; "closed
unread": refused from its Content-Length, the connection closed before the body was sent; "half-open let
go": connections the server closed or answered, e.g. after its header timeout). Targets
(issue 17): 0 failed probes, legitimate p99 within 3x of quiet. Everything shares this machine's cores:
the load generator, the hostile clients and the server.

The model: a fresh one trained for one epoch on the synthetic source (``--image-size``, ``--width``, as in
``benchmarks/serve.py``), or the champion of ``--home``.

    .venv/bin/python benchmarks/hostile.py
    .venv/bin/python benchmarks/hostile.py --home .visionloop --seconds 5 --json-out hostile.json
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from _common import print_load  # benchmarks/ is on sys.path when a script runs
from _loadgen import build_request, multipart, run_load
from serve import champion, fresh_model, started

VISIONLOOP = Path(sys.executable).with_name("visionloop")
MIXES = ("quiet", "huge PNG", "big V2 JSON", "half-open", "all")
console = Console(width=150)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Health probes and legitimate latency under hostile traffic, against the same load alone.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--home", type=Path, help="serve the champion of this store instead of training a model")
    parser.add_argument("--image-size", type=int, default=32, help="side of the fresh model's input")
    parser.add_argument("--width", type=int, default=16, help="channels of the fresh model's first stage")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per mix (after 0.5 s warm-up)")
    parser.add_argument("--concurrency", type=int, default=4, help="legitimate clients")
    parser.add_argument("--threads", type=int, default=0, help="the server's ONNX Runtime threads (0 = all cores)")
    parser.add_argument("--probe-interval", type=float, default=0.5, help="seconds between /healthz probes")
    parser.add_argument("--half-open", type=int, default=500, help="half-open connections in those mixes")
    parser.add_argument("--mixes", nargs="+", default=list(MIXES), choices=MIXES, help="which mixes to run")
    parser.add_argument("--json-out", type=Path, help="also write every figure as JSON here")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------ hostile payloads
def huge_png(side: int = 4900) -> bytes:
    rgb = np.zeros((side, side, 3), np.uint8)
    rgb[:200, :200] = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def big_v2_json(shape: list[int], mebibytes: float = 15.9) -> bytes:
    count = int(mebibytes * 2**20) // 2
    head = '{"inputs":[{"name":"input","shape":' + json.dumps(shape) + ',"datatype":"UINT8","data":['
    return (head + "0," * (count - 1) + "0]}]}").encode()


class Hostile:
    """Background clients that keep posting ``body`` until stopped; answers counted by status."""

    def __init__(self, port: int, stop: threading.Event, answers: Counter) -> None:
        self.port, self.stop, self.answers = port, stop, answers

    def poster(self, label: str, path: str, body: bytes, headers: dict[str, str]) -> Callable[[], None]:
        def run() -> None:
            while not self.stop.is_set():
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                try:
                    connection.request("POST", path, body=body, headers=headers)
                    self.answers[f"{label} {connection.getresponse().status}"] += 1
                except (BrokenPipeError, ConnectionResetError):
                    # refused from its Content-Length before the body was read, then the connection closed:
                    # http.client sends the whole body before it reads an answer, so it sees the close, not the 413
                    self.answers[f"{label} closed unread"] += 1
                except OSError as exc:
                    self.answers[f"{label} {type(exc).__name__}"] += 1
                finally:
                    connection.close()

        return run

    def half_open(self, count: int) -> Callable[[], None]:
        def run() -> None:
            sockets: list[socket.socket] = []
            try:
                for _ in range(count):
                    if self.stop.is_set():
                        break
                    try:
                        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
                        sockets.append(sock)
                    except OSError as exc:
                        self.answers[f"half-open {type(exc).__name__}"] += 1
                self.answers["half-open opened"] += len(sockets)
                self.stop.wait()
                closed = 0
                for sock in sockets:  # the server may have given up on them (a header timeout): count those
                    sock.setblocking(False)
                    try:
                        sock.recv(1)  # b"" (closed) or the first byte of an answer such as 408: either way, let go
                        closed += 1
                    except BlockingIOError:
                        pass  # still open, still waiting for the rest of the header
                    except OSError:
                        closed += 1
                self.answers["half-open let go by server"] += closed
            finally:
                for sock in sockets:
                    sock.close()

        return run


def prober(port: int, interval: float, stop: threading.Event, results: list[bool]) -> None:
    while not stop.is_set():
        started_at = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            connection.request("GET", "/healthz")
            results.append(connection.getresponse().status == 200)
        except OSError:
            results.append(False)
        finally:
            connection.close()
        stop.wait(max(0.0, interval - (time.monotonic() - started_at)))


# ------------------------------------------------------------------------------------ one mix
def run_mix(mix: str, port: int, legit: bytes, payloads: dict, args: argparse.Namespace) -> dict:
    stop, answers, probes = threading.Event(), Counter(), []
    hostile = Hostile(port, stop, answers)
    threads = [threading.Thread(target=prober, args=(port, args.probe_interval, stop, probes), daemon=True)]
    if mix in ("huge PNG", "all"):
        body, headers = payloads["png"]
        threads += [threading.Thread(target=hostile.poster("png", "/predict", body, headers)) for _ in range(3)]
    if mix in ("big V2 JSON", "all"):
        path, body = payloads["v2"]
        post = hostile.poster("v2", path, body, {"Content-Type": "application/json"})
        threads += [threading.Thread(target=post) for _ in range(2)]
    if mix in ("half-open", "all"):
        threads.append(threading.Thread(target=hostile.half_open(args.half_open)))
    for thread in threads:
        thread.start()
    try:
        result = run_load(port, legit, args.concurrency, args.seconds)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
    return {
        "mix": mix,
        "probes": len(probes),
        "probes_failed": probes.count(False),
        "p50_ms": result.percentile_ms(50),
        "p99_ms": result.percentile_ms(99),
        "requests": result.requests,
        "errors": result.error_count,
        "hostile": dict(sorted(answers.items())),
    }


def report(rows: list[dict]) -> dict:
    quiet = next((r for r in rows if r["mix"] == "quiet"), None)
    table = Table(title="legitimate /predict and one-second /healthz probes under hostile traffic")
    for column in ("mix", "probes failed", "p50 ms", "p99 ms", "p99 ÷ quiet", "requests", "errors", "hostile answers"):
        table.add_column(column, justify="left" if column in ("mix", "hostile answers") else "right")
    worst_ratio, failed = 0.0, 0
    for row in rows:
        ratio = row["p99_ms"] / quiet["p99_ms"] if quiet and quiet["p99_ms"] else float("nan")
        row["p99_vs_quiet"] = ratio
        if row["mix"] != "quiet":
            worst_ratio = max(worst_ratio, ratio)
        failed += row["probes_failed"]
        hostile = ", ".join(f"{k}: {v}" for k, v in row["hostile"].items()) or "—"
        table.add_row(
            row["mix"], f"{row['probes_failed']}/{row['probes']}", f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}",
            f"{ratio:.2f}×", str(row["requests"]), str(row["errors"]), hostile,
        )  # fmt: skip
    console.print(table)
    targets = {
        "failed_probes": (failed, "0 failed one-second /healthz probes", failed == 0),
        "p99_vs_quiet": (worst_ratio, "legitimate p99 within 3× of quiet", worst_ratio <= 3.0),
    }
    for value, text, met in targets.values():
        shown = f"{value:.2f}×" if isinstance(value, float) else str(value)
        console.print(f"target {text}: {shown} — " + ("[green]met[/]" if met else "[red]not met[/]"))
    return {k: {"value": v, "what": t, "met": m} for k, (v, t, m) in targets.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_start = os.getloadavg()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISIONLOOP_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    with tempfile.TemporaryDirectory(prefix="visionloop-bench-hostile-") as tmp:
        home = args.home
        if home is None:
            home = Path(tmp) / "home"
            fresh_model(home, args.image_size, args.width)
        model = champion(home.resolve(), 1, Path(tmp) / "model")
        card = model.classifier.card
        shape = [1, card["channels"], card["image_size"], card["image_size"]]
        console.print(f"model: {model.name}, input {shape[1:]}; {os.cpu_count()} cores; building hostile payloads …")
        body, headers = multipart([("image.png", model.png)])
        legit = build_request("/predict", body, headers)
        payloads = {
            "png": multipart([("huge.png", huge_png())]),
            "v2": (f"/v2/models/{model.name}/infer", big_v2_json(shape)),
        }
        rows: list[dict] = []
        command = [str(VISIONLOOP), "--home", str(home), "serve", "--poll-seconds", "0", "--port", "{port}",
                   "--threads", str(args.threads)]  # fmt: skip
        with started("visionloop serve", command, "/readyz", env) as server:
            for mix in args.mixes:
                rows.append(run_mix(mix, server.port, legit, payloads, args))
                row = rows[-1]
                console.print(
                    f"  {mix:<12} probes failed {row['probes_failed']}/{row['probes']}  p50 {row['p50_ms']:.1f} ms  "
                    f"p99 {row['p99_ms']:.1f} ms  errors {row['errors']}  hostile {row['hostile']}"
                )
        targets = report(rows)
        load_end = print_load(console, load_start)
    if args.json_out:
        figures = {"model": {"input": shape[1:]}, "rows": rows, "targets": targets}
        figures["load_average"] = {"start": load_start, "end": load_end}
        args.json_out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
