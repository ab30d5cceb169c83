"""Dynamic batching with a stand-in model: right rows back, batch limits, model separation, waiting rules."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from visionloop.serving.batcher import DynamicBatcher
from visionloop.serving.errors import ApiError
from visionloop.serving.metrics import ServingMetrics

SHAPE = (1, 2, 2)
NEVER = 60_000  # max_wait_ms long enough that a test finishing at all shows nobody waited for it
GUARD_S = 30  # only so a broken batcher fails the test instead of hanging it


class FakeRunner:
    """A test double for ONNX Runtime: answers are a function of each image; it records every batch it ran."""

    def __init__(self, delay: float = 0.0, poison: int | None = None) -> None:
        self.delay = delay
        self.poison = poison  # a pixel value that makes the whole run fail
        self.batches: list[np.ndarray] = []
        self.batch_size_args: list[int] = []

    def run(self, images: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        self.batches.append(images.copy())
        self.batch_size_args.append(batch_size)
        if self.delay:
            time.sleep(self.delay)
        if self.poison is not None and np.any(images == self.poison):
            raise ValueError("poisoned input")
        return answer(images)

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]


def answer(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = images.reshape(len(images), -1).astype(np.float32)
    return np.stack([flat.mean(axis=1), flat[:, 0]], axis=1), flat / 255.0


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(n, *SHAPE), dtype=np.uint8)


def assert_answer(result: tuple[np.ndarray, np.ndarray], pixels: np.ndarray) -> None:
    probs, embeddings = result
    expected_probs, expected_embeddings = answer(pixels)
    np.testing.assert_array_equal(probs, expected_probs)
    np.testing.assert_array_equal(embeddings, expected_embeddings)


def serve(scenario: Callable[[DynamicBatcher], Awaitable[object]], **options) -> object:
    """Run ``scenario`` against a started batcher in a fresh event loop; the batcher is closed afterwards."""
    options = {"max_batch_size": 8, "max_wait_ms": 0, **options}

    async def main() -> object:
        batcher = DynamicBatcher(**options)
        batcher.start()
        try:
            return await asyncio.wait_for(scenario(batcher), GUARD_S)
        finally:
            await batcher.close()

    return asyncio.run(main())


def test_concurrent_submits_get_their_own_rows():
    runner = FakeRunner()
    requests = [images(n, seed) for seed, n in enumerate([1, 3, 2, 1, 4, 2, 1, 3])]

    async def scenario(batcher):
        return await asyncio.gather(*(batcher.submit(runner, pixels) for pixels in requests))

    results = serve(scenario, max_batch_size=8)
    for result, pixels in zip(results, requests, strict=True):
        assert_answer(result, pixels)
    assert sum(runner.sizes) == 17
    assert runner.batch_size_args == runner.sizes  # the whole batch in one model run


def test_slow_model_lets_requests_batch_up_to_the_limit():
    runner = FakeRunner(delay=0.02)
    requests = [images(1, seed) for seed in range(20)]

    async def scenario(batcher):
        return await asyncio.gather(*(batcher.submit(runner, pixels) for pixels in requests))

    results = serve(scenario, max_batch_size=4)
    for result, pixels in zip(results, requests, strict=True):
        assert_answer(result, pixels)
    assert max(runner.sizes) > 1
    assert max(runner.sizes) <= 4
    assert sum(runner.sizes) == 20


def test_request_larger_than_max_batch_runs_alone():
    runner = FakeRunner(delay=0.01)
    big = images(6, seed=100)
    small = [images(1, seed) for seed in range(5)]

    async def scenario(batcher):
        order = [small[0], big, *small[1:]]  # the big one arrives second, among small ones
        return await asyncio.gather(*(batcher.submit(runner, pixels) for pixels in order))

    results = serve(scenario, max_batch_size=4)
    assert_answer(results[1], big)
    for result, pixels in zip([results[0], *results[2:]], small, strict=True):
        assert_answer(result, pixels)
    assert runner.sizes.count(6) == 1  # the big request, with nothing else in its run
    np.testing.assert_array_equal(runner.batches[runner.sizes.index(6)], big)
    assert all(size <= 4 for size in runner.sizes if size != 6)
    assert sum(runner.sizes) == 11


def test_two_models_never_share_a_batch():
    old, new = FakeRunner(delay=0.005), FakeRunner(delay=0.005)
    # every image of the old model is all 10s, every image of the new one all 200s
    requests = [
        (old if i % 2 else new, np.full((1 + i % 3, *SHAPE), 10 if i % 2 else 200, np.uint8)) for i in range(12)
    ]

    async def scenario(batcher):
        return await asyncio.gather(*(batcher.submit(runner, pixels) for runner, pixels in requests))

    results = serve(scenario, max_batch_size=8)
    for result, (_, pixels) in zip(results, requests, strict=True):
        assert_answer(result, pixels)
    assert all(np.all(batch == 10) for batch in old.batches)
    assert all(np.all(batch == 200) for batch in new.batches)
    assert sum(old.sizes) == sum(len(p) for r, p in requests if r is old)
    assert sum(new.sizes) == sum(len(p) for r, p in requests if r is new)
    assert max(old.sizes + new.sizes) > 1  # they did batch, each with its own kind


def test_lone_request_does_not_wait_for_max_wait():
    runner = FakeRunner()
    first, second = images(1, 1), images(2, 2)

    async def scenario(batcher):
        # a one-minute max_wait: finishing under the guard shows the batch ran as soon as nothing else was coming
        return [await batcher.submit(runner, first), await batcher.submit(runner, second)]

    results = serve(scenario, max_wait_ms=NEVER)
    assert_answer(results[0], first)
    assert_answer(results[1], second)
    assert runner.sizes == [1, 2]


def test_forming_batch_waits_for_a_request_being_decoded():
    runner = FakeRunner()
    early, late = images(1, 1), images(2, 2)
    seen_arriving = []

    async def being_decoded(batcher):
        with batcher.arriving():
            seen_arriving.append(batcher.stats()["arriving_requests"])
            await asyncio.sleep(0.05)  # reading and decoding the upload
            pixels = late
        return await batcher.submit(runner, pixels)

    async def scenario(batcher):
        decoding = asyncio.create_task(being_decoded(batcher))
        await asyncio.sleep(0)  # the second request is now being read
        return await asyncio.gather(batcher.submit(runner, early), decoding)

    results = serve(scenario, max_wait_ms=NEVER)
    assert seen_arriving == [1]
    assert_answer(results[0], early)
    assert_answer(results[1], late)
    assert runner.sizes == [3]  # one batch, and it did not wait for the one-minute deadline


def test_failed_decode_inside_arriving_releases_the_forming_batch():
    runner = FakeRunner()
    pixels = images(1, 1)

    async def bad_upload(batcher):
        with batcher.arriving():
            await asyncio.sleep(0.02)
            raise ApiError(422, "not an image")

    async def scenario(batcher):
        failing = asyncio.create_task(bad_upload(batcher))
        await asyncio.sleep(0)
        result = await batcher.submit(runner, pixels)
        with pytest.raises(ApiError):
            await failing
        return result, batcher.stats()

    result, stats = serve(scenario, max_wait_ms=NEVER)
    assert_answer(result, pixels)
    assert runner.sizes == [1]
    assert stats == {"queued_images": 0, "arriving_requests": 0}


def test_model_failure_fails_its_batch_and_the_batcher_keeps_serving():
    runner = FakeRunner(poison=255)
    poisoned = np.full((1, *SHAPE), 255, np.uint8)
    healthy, later = images(2, 1), images(1, 2)

    async def scenario(batcher):
        failed = await asyncio.gather(
            batcher.submit(runner, poisoned), batcher.submit(runner, healthy), return_exceptions=True
        )
        return failed, await batcher.submit(runner, later)

    failed, result = serve(scenario)
    assert runner.sizes == [3, 1]  # both requests were in the failing run
    for error in failed:
        assert isinstance(error, RuntimeError)
        assert str(error) == "inference failed: poisoned input"
    assert_answer(result, later)


def test_close_finishes_queued_work_then_refuses_new_requests():
    runner = FakeRunner(delay=0.01)
    requests = [images(1 + seed % 3, seed) for seed in range(6)]

    async def main():
        batcher = DynamicBatcher(max_batch_size=4, max_wait_ms=0)
        batcher.start()
        pending = [asyncio.create_task(batcher.submit(runner, pixels)) for pixels in requests]
        await asyncio.sleep(0)  # all six are queued
        await asyncio.wait_for(batcher.close(), GUARD_S)
        assert all(task.done() for task in pending)  # close returned only after every queued request ran
        with pytest.raises(ApiError) as caught:
            await batcher.submit(runner, images(1, 99))
        return [task.result() for task in pending], caught.value, batcher.stats()

    results, error, stats = asyncio.run(main())
    for result, pixels in zip(results, requests, strict=True):
        assert_answer(result, pixels)
    assert sum(runner.sizes) == sum(len(p) for p in requests)
    assert (error.status, error.reason, error.message) == (503, "shutting_down", "server is shutting down")
    assert stats["queued_images"] == 0


def test_observer_sees_every_batch_and_every_queue_wait():
    metrics = ServingMetrics()
    runner = FakeRunner(delay=0.005)
    requests = [images(n, seed) for seed, n in enumerate([2, 1, 3, 1, 1, 2, 4])]

    async def scenario(batcher):
        return await asyncio.gather(*(batcher.submit(runner, pixels) for pixels in requests))

    serve(scenario, max_batch_size=4, observer=metrics)
    sample = metrics.registry.get_sample_value
    assert sample("visionloop_batch_size_count") == len(runner.batches)
    assert sample("visionloop_batch_size_sum") == 14
    assert sample("visionloop_inference_duration_seconds_count") == len(runner.batches)
    assert sample("visionloop_inference_duration_seconds_sum") > 0
    assert sample("visionloop_batch_queue_wait_seconds_count") == len(requests)
    assert sample("visionloop_batch_size_bucket", {"le": "4.0"}) == len(runner.batches)  # none over the limit


def test_failed_batch_is_not_observed_as_a_batch():
    metrics = ServingMetrics()
    runner = FakeRunner(poison=255)

    async def scenario(batcher):
        with pytest.raises(RuntimeError):
            await batcher.submit(runner, np.full((2, *SHAPE), 255, np.uint8))
        await batcher.submit(runner, images(1, 1))

    serve(scenario, observer=metrics)
    assert metrics.registry.get_sample_value("visionloop_batch_size_count") == 1
    assert metrics.registry.get_sample_value("visionloop_batch_size_sum") == 1
    assert metrics.registry.get_sample_value("visionloop_batch_queue_wait_seconds_count") == 1
