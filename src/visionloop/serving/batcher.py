"""Dynamic batching: images from concurrent requests run through ONNX Runtime together.

How a batch is formed (Triton's dynamic batcher, with BentoML's "is it worth waiting" test added):

1. One batch runs at a time, in a worker thread, so the event loop keeps reading requests meanwhile.
   When the model is free, everything queued is taken, up to ``max_batch_size`` images. Under load
   batches therefore grow by themselves while the previous one runs, with no waiting at all.
2. When fewer than ``max_batch_size`` images are queued, the batch is held open for requests that
   have already arrived and are still being read or decoded (they are certain to join), until the
   oldest image has waited ``max_wait_ms`` (Triton's ``max_queue_delay``). It never waits on a guess
   about requests that have not arrived yet — BentoML regresses arrival and run times to make that
   guess; we chose the rule that cannot delay a lone client, so latency at concurrency 1 is the
   model's own.
3. A request is run whole with the model that decoded it: after a hot reload, requests queued for the
   old model still run on the old model, and a batch never mixes two models.
4. The queue is bounded (``max_queued_images``): a request that would push it over is refused at once
   with ``Overloaded`` (503 + Retry-After) rather than queued behind seconds of work — a server that
   cannot keep up says so, and the client or the load balancer can go elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from visionloop.serving.admission import Overloaded
from visionloop.serving.errors import ApiError


class Runner(Protocol):
    def run(self, images: np.ndarray, batch_size: int = ...) -> tuple[np.ndarray, np.ndarray]: ...


class BatchObserver(Protocol):
    def observe_batch(self, size: int, seconds: float) -> None: ...

    def observe_queue_wait(self, seconds: float) -> None: ...


@dataclass
class _Item:
    runner: Runner
    pixels: np.ndarray
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    def __init__(
        self,
        max_batch_size: int,
        max_wait_ms: float,
        observer: BatchObserver | None = None,
        max_queued_images: int = 1024,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_queued_images = max_queued_images
        self.max_wait = max_wait_ms / 1000.0
        self.observer = observer
        self._queue: deque[_Item] = deque()
        self._arrival = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="visionloop-infer")
        self._arriving = 0  # requests being read or decoded that will submit soon
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="visionloop-batcher")

    async def submit(self, runner: Runner, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, embeddings) for ``pixels`` (N, C, H, W), run in some batch with ``runner``."""
        if self._closing:
            raise ApiError(503, "server is shutting down", "shutting_down")
        queued = self.queued_images
        if queued and queued + len(pixels) > self.max_queued_images:  # a lone request always gets in
            raise Overloaded(
                "batch", f"{queued:,} images wait for the model (limit {self.max_queued_images:,}), this request adds "
                f"{len(pixels):,}",
            )  # fmt: skip
        item = _Item(runner, pixels, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._arrival.set()
        return await item.future

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Wrap reading and decoding a request, so a batch being formed knows to wait for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._arrival.set()

    @property
    def queued_images(self) -> int:
        return sum(len(item.pixels) for item in self._queue)

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._arrival.clear()
                await self._arrival.wait()
                continue
            await self._hold_open()
            batch = self._take()
            await self._run(batch)

    async def _hold_open(self) -> None:
        first = self._queue[0]
        deadline = first.arrived + self.max_wait
        while self.queued_images < self.max_batch_size and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or self._arriving == 0:
                return
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Item]:
        """The oldest request, then younger ones for the same model while they fit in the batch."""
        first = self._queue.popleft()
        batch, rows, keep = [first], len(first.pixels), deque()
        while self._queue:
            item = self._queue.popleft()
            if item.runner is first.runner and rows + len(item.pixels) <= self.max_batch_size:
                batch.append(item)
                rows += len(item.pixels)
            else:
                keep.append(item)
        self._queue.extendleft(reversed(keep))
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        pixels = batch[0].pixels if len(batch) == 1 else np.concatenate([item.pixels for item in batch])
        runner = batch[0].runner
        try:
            probs, embeddings = await asyncio.get_running_loop().run_in_executor(
                self._executor, runner.run, pixels, max(len(pixels), 1)
            )
        except Exception as exc:  # a model fault is the server's, not the client's
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(RuntimeError(f"inference failed: {exc}"))
            return
        if self.observer is not None:
            self.observer.observe_batch(len(pixels), time.perf_counter() - started)
        offset = 0
        for item in batch:
            n = len(item.pixels)
            if self.observer is not None:
                self.observer.observe_queue_wait(started - item.arrived)
            if not item.future.done():  # the client may have gone away
                item.future.set_result((probs[offset : offset + n], embeddings[offset : offset + n]))
            offset += n

    async def close(self) -> None:
        """Refuse new work, finish everything queued, then stop the worker thread."""
        self._closing = True
        self._arrival.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def stats(self) -> dict[str, Any]:
        return {"queued_images": self.queued_images, "arriving_requests": self._arriving}
