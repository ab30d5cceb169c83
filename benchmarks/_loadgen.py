"""A closed-loop HTTP/1.1 load generator cheap enough to share two cores with the server it measures.

Each of ``concurrency`` workers keeps one keep-alive connection and sends the same pre-built request
again as soon as the answer is in, so at most ``concurrency`` requests are in flight. Requests are
bytes built once; answers are read by Content-Length, with no JSON parsing. A Python client such
as httpx spends ~10x more CPU per request, which on this 2-core machine would be taken away from
the server under test. Only 127.0.0.1 targets are expected.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np


def build_request(path: str, body: bytes, headers: dict[str, str], host: str = "127.0.0.1") -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def multipart(files: list[tuple[str, bytes]], boundary: str = "visionloopbench") -> tuple[bytes, dict[str, str]]:
    parts = []
    for name, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    images_per_request: int = 1

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def images_per_second(self) -> float:
        return self.requests * self.images_per_request / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1e3) if self.latencies else float("nan")

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length)
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, body
        body += chunk[:-2]


async def _worker(
    port: int, request: bytes, stop_at: float, record_from: float, result: LoadResult, max_requests: int | None
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    try:
        while time.perf_counter() < stop_at and (max_requests is None or sent < max_requests):
            started = time.perf_counter()
            writer.write(request)
            try:
                status, _ = await _read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                result.errors[type(exc).__name__] = result.errors.get(type(exc).__name__, 0) + 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            sent += 1
            if started >= record_from:
                if status == 200:
                    result.latencies.append(time.perf_counter() - started)
                else:
                    result.errors[str(status)] = result.errors.get(str(status), 0) + 1
    finally:
        writer.close()


async def _load(
    port: int, request: bytes, concurrency: int, seconds: float, warmup: float, images: int, max_requests: int | None
) -> LoadResult:
    now = time.perf_counter()
    result = LoadResult(concurrency, seconds, images_per_request=images)
    record_from, stop_at = now + warmup, now + warmup + seconds
    await asyncio.gather(
        *(_worker(port, request, stop_at, record_from, result, max_requests) for _ in range(concurrency))
    )
    result.seconds = max(time.perf_counter() - record_from, 1e-9)
    return result


def run_load(
    port: int,
    request: bytes,
    concurrency: int,
    seconds: float,
    warmup: float = 0.5,
    images: int = 1,
    max_requests: int | None = None,
) -> LoadResult:
    """Hammer 127.0.0.1:``port`` with ``request`` for ``warmup`` + ``seconds``; only the last part is kept."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is pinned, but the generator works without it
        runner = asyncio.run
    return runner(_load(port, request, concurrency, seconds, warmup, images, max_requests))
