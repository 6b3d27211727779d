"""The dynamic batcher: right answer to the right request, batches formed, delay and queue bounds kept."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import HANG_S
from imgcls.serve.batching import DynamicBatcher, QueueFull


def per_image_sum(images: np.ndarray) -> np.ndarray:
    """A stand-in model: one output row per image that identifies the image."""
    return images.reshape(len(images), -1).sum(1, keepdims=True).astype(np.float64)


def request_images(i: int, n: int = 1) -> np.ndarray:
    return np.full((n, 2, 2, 1), i, dtype=np.int64)


def test_concurrent_requests_get_their_own_outputs_and_share_batches() -> None:
    sizes: list[int] = []
    gate = threading.Event()

    def model(images: np.ndarray) -> np.ndarray:
        gate.wait(HANG_S)  # the first batch waits until every request is queued
        sizes.append(len(images))
        return per_image_sum(images)

    batcher = DynamicBatcher(model, max_batch=16, max_delay_s=0.05, max_queue=100)
    with ThreadPoolExecutor(8) as pool:
        futures = [batcher.submit(request_images(i, 1 + i % 3)) for i in range(40)]
        gate.set()
        results = list(pool.map(lambda f: f.result(timeout=HANG_S), futures))
    batcher.close()
    for i, out in enumerate(results):
        assert out.shape == (1 + i % 3, 1) and (out == 4 * i).all()
    assert sum(sizes) == sum(1 + i % 3 for i in range(40))
    assert max(sizes) > 3 and max(sizes) <= 16  # requests were merged, never past max_batch
    assert batcher.stats.batches == len(sizes)


def test_a_lone_request_is_answered_after_the_delay_without_waiting_for_a_full_batch() -> None:
    batcher = DynamicBatcher(per_image_sum, max_batch=1000, max_delay_s=0.01)
    assert batcher.submit(request_images(3)).result(timeout=HANG_S).tolist() == [[12.0]]
    batcher.close()
    assert batcher.stats.largest == 1


def test_a_full_queue_refuses_at_once() -> None:
    gate = threading.Event()
    batcher = DynamicBatcher(lambda x: (gate.wait(HANG_S), per_image_sum(x))[1], max_batch=1, max_delay_s=0,
                             max_queue=2)
    first = batcher.submit(request_images(0))
    while batcher.queue.qsize():  # the worker has taken the first request and is blocked in it
        threading.Event().wait(0.001)
    batcher.submit(request_images(1))
    batcher.submit(request_images(2))
    with pytest.raises(QueueFull):
        batcher.submit(request_images(3))
    gate.set()
    assert first.result(timeout=HANG_S).tolist() == [[0.0]]
    batcher.close()


def test_a_failing_request_does_not_fail_its_batch_mates() -> None:
    gate = threading.Event()

    def model(images: np.ndarray) -> np.ndarray:
        gate.wait(HANG_S)
        if (images == 13).any():
            raise ValueError("bad input")
        return per_image_sum(images)

    batcher = DynamicBatcher(model, max_batch=64, max_delay_s=0.05)
    futures = [batcher.submit(request_images(i)) for i in (11, 12, 13, 14)]
    gate.set()
    assert futures[0].result(timeout=HANG_S).tolist() == [[44.0]]
    assert futures[3].result(timeout=HANG_S).tolist() == [[56.0]]
    with pytest.raises(ValueError, match="bad input"):
        futures[2].result(timeout=HANG_S)
    batcher.close()


def test_a_cancelled_request_is_skipped() -> None:
    gate, seen = threading.Event(), []

    def model(images: np.ndarray) -> np.ndarray:
        gate.wait(HANG_S)
        seen.extend(images[:, 0, 0, 0].tolist())
        return per_image_sum(images)

    batcher = DynamicBatcher(model, max_batch=1, max_delay_s=0)
    first = batcher.submit(request_images(1))
    gone = batcher.submit(request_images(2))
    assert gone.cancel()
    last = batcher.submit(request_images(3))
    gate.set()
    first.result(timeout=HANG_S), last.result(timeout=HANG_S)
    batcher.close()
    assert seen == [1, 3]
