"""A bounded load test: 60 s at concurrency 64 against 127.0.0.1 — no errors, no memory growth.

The server's resident memory is sampled once a second; the baseline is taken after a warm-up (the
first requests allocate ONNX Runtime's arenas, uvicorn's buffers, the metric series), and at the end
it may be at most 10% above it. ``VISIONLOOP_LOAD_SECONDS`` shortens the run for local iteration.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import numpy as np
import psutil

SECONDS = float(os.environ.get("VISIONLOOP_LOAD_SECONDS", "60"))
CONCURRENCY = 64
WARMUP = min(10.0, SECONDS / 4)


def v2_binary(name: str, pixels: np.ndarray) -> tuple[str, bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": list(pixels.shape), "datatype": "UINT8",
                 "parameters": {"binary_data_size": pixels.nbytes}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()  # fmt: skip
    return f"/v2/models/{name}/infer", header + pixels.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


async def drive(url: str, requests: list[tuple[str, dict]], stop_at: float, counts: dict, errors: list) -> None:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:

        async def worker(offset: int) -> None:
            i = offset
            while time.monotonic() < stop_at:
                path, kwargs = requests[i % len(requests)]
                i += 1
                try:
                    response = await http.post(path, **kwargs)
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                    continue
                if response.status_code != 200:
                    errors.append(f"{path}: {response.status_code} {response.text[:200]}")
                counts[path] = counts.get(path, 0) + 1

        await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))


def test_one_minute_at_concurrency_64_has_no_errors_and_no_memory_growth(
    champion_server, champion_settings, digit_png, digits_dataset
):
    png, _ = digit_png
    x_test, _ = digits_dataset.part("test")
    name = champion_settings.registry.model_name
    path, body, headers = v2_binary(name, np.ascontiguousarray(x_test[:1]))
    requests = [
        ("/predict", {"files": {"file": ("x.png", png)}}),
        (path, {"content": body, "headers": headers}),
        (f"/v2/models/{name}/infer", {"json": {"inputs": [{"name": "input", "shape": [2, 1, 16, 16], "datatype": "UINT8", "data": x_test[:2].reshape(-1).tolist()}]}}),
    ]  # fmt: skip
    process = psutil.Process(champion_server.process.pid)
    samples: list[tuple[float, int]] = []
    counts: dict[str, int] = {}
    errors: list[str] = []
    started = time.monotonic()

    async def sample_memory() -> None:
        while time.monotonic() < started + SECONDS:
            samples.append((time.monotonic() - started, process.memory_info().rss))
            await asyncio.sleep(1.0)

    async def main() -> None:
        await asyncio.gather(drive(champion_server.url, requests, started + SECONDS, counts, errors), sample_memory())

    asyncio.run(main())
    elapsed = time.monotonic() - started
    baseline = next(rss for t, rss in samples if t >= WARMUP)
    final = process.memory_info().rss
    total = sum(counts.values())
    print(
        f"\nload: {total} requests in {elapsed:.1f} s ({total / elapsed:.0f}/s) at concurrency {CONCURRENCY}, "
        f"{len(errors)} errors; by endpoint {counts}; server RSS {baseline / 2**20:.1f} MiB after {WARMUP:.0f} s "
        f"-> {final / 2**20:.1f} MiB at the end ({final / baseline - 1:+.1%}); peak {max(r for _, r in samples) / 2**20:.1f} MiB"
    )
    assert errors == [], errors[:5]
    assert all(counts.get(p, 0) > 0 for p, _ in requests)
    assert final <= baseline * 1.10, f"RSS grew from {baseline} to {final} bytes"
    with httpx.Client(base_url=champion_server.url) as http:
        assert http.get("/readyz").status_code == 200
