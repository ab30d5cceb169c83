"""Does a monitoring read get slower or bigger as the prediction store grows?

``store_growth(rows=(10_000, 1_000_000))`` fills a fresh SQLite store (and a fresh PostgreSQL one when
``initdb`` is on the PATH) with N predictions — bulk-inserted straight into the tables, 128-d embeddings,
10 classes, 4 model versions one after another over 30 days, a feedback label on every 10th — then
times what the monitor does per check: one ``window(name, newest version, size=200, since=last hour)``
(``since`` the start of that version's era, so
the window is 200 rows at every N) plus one ``live_accuracy(name, 200)``, the median of 20, and the process's peak RSS growth while doing
them (psutil, sampled every millisecond). It prints one table, the smallest N as the baseline and each
larger N's ratio against it. The drift benchmark calls it at its end; it also runs alone:

    .venv/bin/python benchmarks/_store_growth.py [--rows 10000 1000000] [--no-postgres] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console

from visionloop.monitoring.store import PredictionStore, feedback_table, models_table, predictions_table

MODEL = "growth"
VERSIONS = ("1", "2", "3", "4")
CLASSES = [str(i) for i in range(10)]
DIM = 128
SPAN = 30 * 86400.0  # the rows' times cover 30 days, ending now
CHUNK = 20_000
READS = 20


def fill(store: PredictionStore, n: int, seed: int = 0) -> float:
    """Insert ``n`` predictions (and a label on every 10th) straight into the tables; returns the seconds taken."""
    rng = np.random.default_rng(seed)
    end = time.time()
    start = time.perf_counter()
    with store.engine.begin() as conn:
        conn.execute(
            models_table.insert(),
            [
                {"model_name": MODEL, "model_version": v, "dataset_version": "d", "classes": json.dumps(CLASSES),
                 "first_served": end - SPAN + i * SPAN / len(VERSIONS)}
                for i, v in enumerate(VERSIONS)
            ],
        )  # fmt: skip
    for first in range(0, n, CHUNK):
        count = min(CHUNK, n - first)
        index = np.arange(first, first + count)
        times = end - SPAN + index * (SPAN / n)
        probs = rng.dirichlet(np.ones(10), count).astype("<f4")
        top = probs.argmax(axis=1)
        embeddings = rng.normal(size=(count, DIM)).astype("<f4")
        stats = rng.random((count, 3)).astype("<f4")
        rows, labels = [], []
        for k in range(count):
            i = int(index[k])
            version = VERSIONS[i * len(VERSIONS) // n]
            request_id = f"{i:016x}"
            rows.append({
                "request_id": request_id, "time": float(times[k]), "endpoint": "predict", "model_name": MODEL,
                "model_version": version, "predicted_index": int(top[k]), "predicted_label": CLASSES[top[k]],
                "confidence": float(probs[k, top[k]]), "probabilities": probs[k].tobytes(),
                "embedding": embeddings[k].tobytes(), "image_width": 28, "image_height": 28,
                "image_mean": float(stats[k, 0]), "image_std": float(stats[k, 1]), "image_sharpness": 0.1,
                "channel_means": stats[k, :1].tobytes(), "converted": None, "image_key": None,
                "instance": "bench:1",
            })  # fmt: skip
            if i % 10 == 0:
                true = int(top[k]) if rng.random() < 0.9 else int(rng.integers(10))
                labels.append({
                    "request_id": request_id, "time": float(times[k]) + 60, "model_name": MODEL,
                    "model_version": version, "true_index": true, "true_label": CLASSES[true],
                    "correct": int(true == top[k]),
                })  # fmt: skip
        with store.engine.begin() as conn:
            conn.execute(predictions_table.insert(), rows)
            if labels:
                conn.execute(feedback_table.insert(), labels)
    return time.perf_counter() - start


@contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Peak RSS growth (bytes) of this process inside the block, sampled every millisecond."""
    process = psutil.Process()
    out = {"before": process.memory_info().rss, "peak": 0}
    out["peak"] = out["before"]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            out["peak"] = max(out["peak"], process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        done.set()
        sampler.join()
        out["peak"] = max(out["peak"], process.memory_info().rss)
        out["growth"] = out["peak"] - out["before"]


def measure(url: str, backend: str, n: int) -> dict:
    """Fill a store at ``url`` with ``n`` rows, then time the monitor's reads on it."""
    writer = PredictionStore(url, writer=False)
    try:
        fill_seconds = fill(writer, n)
    finally:
        writer.close()
    reader = PredictionStore(url, writer=False)
    try:
        newest = VERSIONS[-1]
        last = reader.last_prediction_time(MODEL, newest)
        since = (last or time.time()) - SPAN / len(VERSIONS)  # the newest version's whole era: the limit decides
        reader.window(MODEL, newest, 200, since)  # first read: connections, statement caches
        reader.live_accuracy(MODEL, 200)
        seconds = []
        with peak_rss() as rss:
            for _ in range(READS):
                start = time.perf_counter()
                window = reader.window(MODEL, newest, 200, since)
                accuracy = reader.live_accuracy(MODEL, 200)
                seconds.append(time.perf_counter() - start)
        assert len(window) == min(200, n // len(VERSIONS)), len(window)
        assert [v for v, _, _ in accuracy] == list(VERSIONS)
    finally:
        reader.close()
    return {
        "backend": backend,
        "rows": n,
        "fill_seconds": round(fill_seconds, 2),
        "fill_rows_per_second": round(n / fill_seconds),
        "read_ms_median": round(statistics.median(seconds) * 1000, 2),
        "read_ms_max": round(max(seconds) * 1000, 2),
        "window_rows": len(window),
        "peak_rss_growth_mib": round(rss["growth"] / 2**20, 2),
    }


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server, the one the integration tests use (tests/integration/registry_stores.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
    from registry_stores import postgres_database

    with postgres_database() as url:
        yield url


def _fresh_database(server_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def store_growth(rows: tuple[int, ...] = (10_000, 1_000_000), postgres: bool | None = None) -> list[dict]:
    """The table described at the top of this file; ``postgres`` None: when initdb is installed."""
    results = []
    use_pg = shutil.which("initdb") is not None and shutil.which("postgres") is not None
    use_pg = use_pg if postgres is None else postgres and use_pg
    with tempfile.TemporaryDirectory(prefix="visionloop-store-growth-") as folder:
        for n in rows:
            results.append(measure(f"sqlite:///{folder}/store-{n}.db", "sqlite", n))
            Path(f"{folder}/store-{n}.db").unlink()  # a million rows are ~0.7 GB on disk
        with postgres_server() if use_pg else nullcontext() as server:
            if server is not None:
                for n in rows:
                    results.append(measure(_fresh_database(server, f"growth_{n}"), "postgresql", n))
    print_table(results)
    return results


def print_table(results: list[dict]) -> None:
    print(
        f"\nprediction store growth: one window(size=200) + live_accuracy read, median of {READS} "
        f"(128-d embeddings, 10 classes, {len(VERSIONS)} versions, a label on every 10th row)"
    )
    print(f"{'backend':<11}{'rows':>11}{'fill rows/s':>13}{'read ms':>10}{'max ms':>9}{'RSS +MiB':>10}{'vs first':>10}")
    for backend in dict.fromkeys(r["backend"] for r in results):
        mine = [r for r in results if r["backend"] == backend]
        base = mine[0]
        for r in mine:
            ratio = r["read_ms_median"] / base["read_ms_median"] if base["read_ms_median"] else float("nan")
            print(
                f"{backend:<11}{r['rows']:>11,}{r['fill_rows_per_second']:>13,}{r['read_ms_median']:>10.2f}"
                f"{r['read_ms_max']:>9.2f}{r['peak_rss_growth_mib']:>10.2f}{ratio:>9.2f}×"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only, even when initdb is installed")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    from _common import print_load  # benchmarks/ is on sys.path when a script runs

    load_start = os.getloadavg()
    results = store_growth(tuple(args.rows), postgres=False if args.no_postgres else None)
    print_load(Console(), load_start)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
