"""Dynamic batching (Triton's max batch size + max queue delay): concurrent requests share one forward pass.

A batched forward pass costs far less per image than one pass per request, so the server queues
requests and a single worker thread runs whatever has arrived together: it starts as soon as
`max_batch` images are waiting or the oldest request has waited `max_delay_s`. The queue is bounded:
when it is full, a request is refused at once (the server answers 503 with Retry-After) instead of
waiting without limit.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Batching:
    """How concurrent requests share forward passes, and how long one may wait."""

    max_batch: int = 32
    """Most images in one forward pass."""
    max_delay_ms: float = 0.0
    """How long the oldest waiting request waits for others to join its forward pass; 0: none, a
    batch is whatever queued while the previous pass ran (under load that is already a batch)."""
    max_queue: int = 256
    """Requests that may wait; past this the server answers 503 with Retry-After."""
    timeout_s: float = 30.0
    """A request still unanswered after this many seconds gets 504."""


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


@dataclass
class Request:
    images: np.ndarray  # N x H x W x C uint8
    future: Future = field(default_factory=Future)
    arrived: float = 0.0


@dataclass
class BatchStats:
    """What the worker did: batches run, the images in each, and where a request's time went between
    submit and answer (waiting in the queue, then its batch's forward pass), for /model and the benchmark."""

    batches: int = 0
    images: int = 0
    largest: int = 0
    requests: int = 0
    forward_s: float = 0.0  # summed over batches
    request_queue_s: float = 0.0  # summed over requests: submit -> its batch starts
    request_forward_s: float = 0.0  # summed over requests: its batch's forward pass

    def add(self, size: int, waits: list[float], seconds: float) -> None:
        self.batches += 1
        self.images += size
        self.largest = max(self.largest, size)
        self.requests += len(waits)
        self.forward_s += seconds
        self.request_queue_s += sum(waits)
        self.request_forward_s += seconds * len(waits)

    def to_json(self) -> dict:
        def mean_ms(total: float, count: int) -> float:
            return round(1000 * total / count, 3) if count else 0.0
        return {"batches": self.batches, "images": self.images, "largest": self.largest,
                "mean_batch": round(self.images / self.batches, 2) if self.batches else 0.0,
                "forward_ms_per_batch": mean_ms(self.forward_s, self.batches),
                "requests": self.requests, "queue_ms_per_request": mean_ms(self.request_queue_s, self.requests),
                "forward_ms_per_request": mean_ms(self.request_forward_s, self.requests)}


class DynamicBatcher:
    """Runs `run_batch` (images -> one row of outputs per image) over requests queued together."""

    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], *, max_batch: int = 32,
                 max_delay_s: float = 0.0, max_queue: int = 256):
        if max_batch < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_delay_s >= 0")
        self.run_batch = run_batch
        self.max_batch, self.max_delay_s = max_batch, max_delay_s
        self.queue: queue.Queue[Request | None] = queue.Queue(maxsize=max_queue)
        self.stats = BatchStats()
        self._carry: Request | None = None  # a request that did not fit the last batch
        self._worker = threading.Thread(target=self._work, name="imgcls-batcher", daemon=True)
        self._worker.start()

    def submit(self, images: np.ndarray) -> Future:
        """Queue one request's images; the future's result is their outputs, in order."""
        request = Request(np.asarray(images), arrived=time.monotonic())
        try:
            self.queue.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} requests are already waiting") from None
        return request.future

    def close(self) -> None:
        """Stop the worker after the requests already queued."""
        self.queue.put(None)
        self._worker.join()

    def _work(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            self._run(batch)

    def _collect(self) -> list[Request] | None:
        """The next batch: the oldest request plus whatever fits before its deadline."""
        first = self._carry if self._carry is not None else self.queue.get()
        self._carry = None
        if first is None:
            return None
        batch, size = [first], len(first.images)
        deadline = first.arrived + self.max_delay_s
        while size < self.max_batch:
            try:
                wait = deadline - time.monotonic()
                item = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.queue.put(None)  # seen again after this batch: close() waits for the queue
                break
            if size + len(item.images) > self.max_batch:
                self._carry = item
                break
            batch.append(item)
            size += len(item.images)
        return batch

    def _run(self, batch: list[Request]) -> None:
        """One forward pass for the batch; if it fails, each request alone, so one bad request
        cannot fail its batch-mates. Requests whose caller gave up (cancelled) are dropped."""
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            outputs = self._timed(live)
        except Exception as exc:  # noqa: BLE001 - retried one request at a time below
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            for request in live:
                self._run_alone(request)
            return
        start = 0
        for request in live:
            request.future.set_result(outputs[start:start + len(request.images)])
            start += len(request.images)

    def _timed(self, requests: list[Request]) -> np.ndarray:
        """run_batch over the requests' images, counted in the stats when it succeeds."""
        started = time.monotonic()
        outputs = self.run_batch(np.concatenate([r.images for r in requests]))
        self.stats.add(len(outputs), [started - r.arrived for r in requests], time.monotonic() - started)
        return outputs

    def _run_alone(self, request: Request) -> None:
        try:
            outputs = self._timed([request])
        except Exception as exc:  # noqa: BLE001 - handed to the caller through its future
            request.future.set_exception(exc)
            return
        request.future.set_result(outputs)
