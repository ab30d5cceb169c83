"""Where expensive request work runs, and how much of it may wait: bounded pools that answer 503 when full.

The event loop serves every request, /healthz and /readyz included, so anything that holds it for long
makes the whole server look dead (on Kubernetes: a liveness restart loop). What a request will cost is
known before the work starts — an image header states width x height, a body its length — so the
route decides from that:

- cheap work (a small image, a small V2 body) runs inline: handing it over costs more than it saves;
- expensive work from clients — decoding a large image, parsing a large V2 JSON body — runs in a small
  pool of worker *processes* at a lower CPU priority (``nice`` +10). A process, because ``json.loads``
  holds the GIL for its whole run (a 16 MB body: seconds) and even Pillow's decoder takes the GIL back
  between chunks, so a thread would still slow the loop; a lower priority, because on a 2-core machine
  the kernel should give the cores to the loop and the model first and to a flood of 4900x4900 PNGs only
  what is left. Only the bytes go in and only the model-sized pixels come back, so the transfer is small;
- each pool admits work up to a cost limit (pixels, bytes or calls: what the memory held scales with)
  and refuses the rest at once with ``Overloaded``: 503 with ``Retry-After``, as Triton and KServe do,
  instead of letting latency (and memory) grow without limit. A client that retries after a second
  finds the queue drained; a legitimate small request never waits behind the flood.

Admission is counted on the event loop (one thread), so the counters need no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, TypeVar

from visionloop.serving.errors import ApiError

T = TypeVar("T")
RETRY_AFTER_SECONDS = 1  # the queues drain in well under a second when the flood stops; clients back off
RETRY_LATER = {"Retry-After": str(RETRY_AFTER_SECONDS)}  # the header of every 503 that asks the client back
WORKER_NICE = 10  # worker processes yield the CPU to the server's own process (nice 0) when both want it


class Overloaded(ApiError):
    """A bounded queue is full: 503 with Retry-After; ``queue`` labels visionloop_overloaded_total."""

    def __init__(self, queue: str, message: str) -> None:
        super().__init__(503, f"server busy: {message}; retry after {RETRY_AFTER_SECONDS} s", "overloaded", RETRY_LATER)
        self.queue = queue


class Admission:
    """A cost budget for work admitted and not yet finished (waiting plus running)."""

    def __init__(self, queue: str, limit: int, unit: str) -> None:
        self.queue = queue
        self.limit = limit
        self.unit = unit
        self.admitted = 0  # cost of the work admitted and not finished
        self.jobs = 0

    @contextlib.contextmanager
    def admit(self, cost: int) -> Iterator[None]:
        """Hold ``cost`` for the block; ``Overloaded`` when it does not fit. A job larger than the whole limit
        is still taken when nothing else is in flight, or it could never run (max_pixels bounds it)."""
        if self.jobs and self.admitted + cost > self.limit:
            raise Overloaded(
                self.queue,
                f"the {self.queue} queue holds {self.admitted:,} of {self.limit:,} {self.unit}; "
                f"this request needs {cost:,} more",
            )
        self.admitted += cost
        self.jobs += 1
        try:
            yield
        finally:
            self.admitted -= cost
            self.jobs -= 1


class Pool:
    """An executor with an ``Admission`` in front: ``await pool.run(cost, fn, *args)``."""

    def __init__(self, queue: str, make_executor: Callable[[], Executor], limit: int, unit: str) -> None:
        self.admission = Admission(queue, limit, unit)
        self._make_executor = make_executor
        self._executor = make_executor()

    async def run(self, cost: int, fn: Callable[..., T], *args: Any) -> T:
        with self.admission.admit(cost):
            executor = self._executor
            try:
                return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
            except BrokenExecutor:  # a worker process died (killed for memory?): start fresh ones for the next job
                if self._executor is executor:
                    self._executor = self._make_executor()
                    executor.shutdown(wait=False, cancel_futures=True)
                raise ApiError(503, f"the {self.admission.queue} worker stopped; try again", "worker_lost") from None

    def warm(self) -> None:
        """Start the workers now (a spawned process imports for a second), not on the first large request."""
        self._executor.submit(int)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def thread_pool(queue: str, workers: int, limit: int, unit: str) -> Pool:
    return Pool(
        queue, lambda: ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"visionloop-{queue}"), limit, unit
    )


def init_worker() -> None:
    """A worker process's initializer: run at a lower CPU priority than the server (where the OS allows), and
    exit when the server does — a server killed with SIGKILL (OOM killer, a test's teardown) runs no cleanup,
    and a worker left behind would hold its memory for ever."""
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: no os.nice (Windows)
        os.nice(WORKER_NICE)
    server = os.getppid()

    def exit_with_server() -> None:
        while os.getppid() == server:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_with_server, name="visionloop-worker-watchdog", daemon=True).start()


def process_pool(queue: str, workers: int, limit: int, unit: str) -> Pool:
    """Worker processes started with ``spawn``: the server already runs threads (ONNX Runtime, the store
    writer), and forking a threaded process can deadlock the child."""
    context = multiprocessing.get_context("spawn")

    def make() -> Executor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=init_worker)

    return Pool(queue, make, limit, unit)
