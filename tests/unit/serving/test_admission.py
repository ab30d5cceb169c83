"""Bounded queues: work over the limit is refused at once (Overloaded: 503 + Retry-After), never queued for ever."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from visionloop.serving.admission import RETRY_AFTER_SECONDS, Admission, Overloaded, thread_pool
from visionloop.serving.app import error_response
from visionloop.serving.batcher import DynamicBatcher
from visionloop.serving.metrics import ServingMetrics

GUARD_S = 30  # only so a broken pool fails the test instead of hanging it


def test_admission_refuses_what_does_not_fit_and_frees_what_finished() -> None:
    admission = Admission("decode", 100, "pixels")
    with admission.admit(60):
        with pytest.raises(Overloaded, match="holds 60 of 100 pixels; this request needs 50 more") as refused:
            admission.admit(50).__enter__()
        with admission.admit(40):
            assert admission.admitted == 100
    assert admission.admitted == 0 and admission.jobs == 0
    assert refused.value.status == 503 and refused.value.queue == "decode"


def test_a_lone_job_larger_than_the_limit_still_runs() -> None:
    admission = Admission("decode", 10, "pixels")
    with admission.admit(1_000):
        assert admission.jobs == 1


def test_the_503_carries_retry_after_and_is_counted() -> None:
    metrics = ServingMetrics()
    response = error_response(Overloaded("batch", "full"), metrics)
    counted = {
        queue: metrics.overloaded.labels(queue)._value.get() for queue in ("decode", "parse", "batch", "feedback")
    }
    assert response.status_code == 503
    assert response.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
    assert b"server busy: full" in response.body and counted == {"decode": 0, "parse": 0, "batch": 1, "feedback": 0}


def test_a_full_pool_refuses_while_its_worker_is_busy() -> None:
    release = threading.Event()

    async def scenario() -> list[object]:
        pool = thread_pool("decode", 1, 100, "pixels")
        first = asyncio.ensure_future(pool.run(80, release.wait, GUARD_S))
        await asyncio.sleep(0)  # let the first job be admitted
        try:
            with pytest.raises(Overloaded):
                await pool.run(30, lambda: None)
            small = await asyncio.wait_for(
                asyncio.ensure_future(_release_then(release, pool.run(20, lambda: 7))), GUARD_S
            )
            return [await asyncio.wait_for(first, GUARD_S), small]
        finally:
            pool.shutdown()

    assert asyncio.run(scenario()) == [True, 7]


async def _release_then(release: threading.Event, job: object) -> object:
    release.set()
    return await job  # type: ignore[misc]


class SlowRunner:
    """A test double for ONNX Runtime that holds each batch until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()

    def run(self, images: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        self.started.set()
        self.release.wait(GUARD_S)
        return np.zeros((len(images), 2), np.float32), np.zeros((len(images), 3), np.float32)


def test_the_batcher_queue_is_bounded() -> None:
    async def scenario() -> int:
        runner = SlowRunner()
        batcher = DynamicBatcher(max_batch_size=4, max_wait_ms=0, max_queued_images=6)
        batcher.start()
        pixels = np.zeros((4, 1, 2, 2), np.uint8)
        running = asyncio.ensure_future(batcher.submit(runner, pixels))  # taken by the model, which now waits
        for _ in range(GUARD_S * 100):  # until the model holds the first batch
            if runner.started.is_set():
                break
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(batcher.submit(runner, pixels))  # waits in the queue: 4 of 6
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="4 images wait for the model"):
            await batcher.submit(runner, pixels)
        runner.release.set()
        answers = await asyncio.wait_for(asyncio.gather(running, queued), GUARD_S)
        await batcher.close()
        return len(answers)

    assert asyncio.run(scenario()) == 2


def test_a_progressive_jpeg_is_never_counted_cheap() -> None:
    """Its scans each pass over the pixels: the pixel count does not bound its cost, so it leaves the loop."""
    import io

    from PIL import Image

    from visionloop.data.transform import InputTransform
    from visionloop.serving.images import open_upload

    def jpeg(progressive: bool) -> bytes:
        buffer = io.BytesIO()
        Image.new("L", (32, 32), 128).save(buffer, format="JPEG", progressive=progressive)
        return buffer.getvalue()

    transform = InputTransform("L", 8)
    assert open_upload(jpeg(True), transform, 10_000, True, "p.jpg").unbounded_per_pixel
    assert not open_upload(jpeg(False), transform, 10_000, True, "b.jpg").unbounded_per_pixel
