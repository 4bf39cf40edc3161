"""Where requests compute: a bounded pool for their CPU work (decode, preprocess, render)
and one compute stream per device, which batches requests per model.

The compute stream is Triton's dynamic batcher in small: each model has a bounded queue;
one thread per device takes the model whose oldest request waited longest, up to
``max_batch_size`` of its queued requests (waiting at most ``max_queue_delay_ms`` for more
when fewer are queued; 0 takes what is there), and computes them as one batch. So no two
batches ever share the device's cores, while decode and render of other requests run in the
pool beside it. Every request gets its own answer or its own error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import cv2

from service.errors import Overloaded
from service.runtime import metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

# One batch of one model: payloads in, one result (or the exception to raise) per payload.
Execute = Callable[[str, Sequence[Any]], Sequence[Any]]


class Limiter:
    """Admission and the request pool.

    ``pending`` counts admitted requests, from decoding to their answer; at most
    ``concurrency + queue`` at once, beyond that ``Overloaded`` (HTTP 503 with Retry-After)
    tells clients to come back instead of piling up memory and latency. Their CPU work runs
    in threads, at most ``concurrency`` at once.
    """

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self._slots = anyio.CapacityLimiter(concurrency)
        self.pending = 0

    def is_overloaded(self) -> bool:
        return self.pending >= self.concurrency + self.queue

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold one of the admitted places for the request's lifetime.

        Raises:
            Overloaded: when all are taken.
        """
        if self.is_overloaded():
            raise Overloaded(
                f"{self.pending} requests are in progress or waiting; retry shortly",
                retry_after_s=1,
            )
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in a pool thread."""
        return await anyio.to_thread.run_sync(partial(fn, *args), limiter=self._slots)


def serial_pool_kernels() -> None:
    """Run OpenCV's functions on the calling thread only (process-wide).

    The request pool already runs several requests' decode and render at once, beside the
    compute stream, whose ONNX Runtime threads hold the cores; OpenCV's own thread pool on
    top oversubscribed them: at 16 concurrent requests with batches of 8 on the demo model,
    the regions step took 73 ms instead of 3.6, and the service answered 16.6 req/s instead
    of 49.5 with OpenCV single-threaded (BENCHMARKS.md, Throughput).
    """
    cv2.setNumThreads(1)


@dataclass
class _Job:
    model: str
    payload: Any
    future: Future[Any] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


class ComputeStream:
    """One thread computing batches, one at a time, for the models of one device.

    Args:
        execute: computes one batch of one model (service.pipeline.compute).
        max_batch_size: requests per batch at most.
        max_queue_delay_ms: how long a request may wait for batch-mates; 0: never wait.
        capacity: requests each model's queue holds; beyond, ``Overloaded``.
        device: a name for the thread and the logs.
    """

    def __init__(self, execute: Execute, *, max_batch_size: int, max_queue_delay_ms: float,
                 capacity: int, device: str = "cpu") -> None:
        self._execute = execute
        self.max_batch_size = max(1, max_batch_size)
        self.max_queue_delay_s = max(0.0, max_queue_delay_ms) / 1e3
        self.capacity = max(1, capacity)
        self.device = device
        self._queues: dict[str, deque[_Job]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"compute-{device}", daemon=True)

    def start(self) -> ComputeStream:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop after the batch in progress; requests still queued get ``Overloaded``."""
        with self._cond:
            self._closed = True
            left = [job for q in self._queues.values() for job in q]
            self._queues.clear()
            self._cond.notify_all()
        for job in left:
            metrics.PENDING.labels(job.model).dec()
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(Overloaded("the service is shutting down"))
        if self._thread.is_alive():
            self._thread.join()

    def queued(self, model: str) -> int:
        with self._cond:
            return len(self._queues.get(model, ()))

    def submit(self, model: str, payload: Any) -> Future[Any]:
        """Queue one request of ``model``; the future holds its result or its error.

        Raises:
            Overloaded: when the model's queue is full or the stream is closed.
        """
        job = _Job(model, payload)
        with self._cond:
            if self._closed:
                raise Overloaded("the service is shutting down")
            queue = self._queues.setdefault(model, deque())
            if len(queue) >= self.capacity:
                raise Overloaded(f"{len(queue)} requests for model {model!r} are waiting to "
                                 "compute; retry shortly", retry_after_s=1)
            queue.append(job)
            self._cond.notify_all()
        metrics.PENDING.labels(model).inc()
        return job.future

    async def run(self, model: str, payload: Any) -> Any:
        """Queue one request and wait for its answer (raising its own error).

        Cancelled (its client went away), a request still queued leaves its batch unmade;
        one whose batch is computing is waited for before the cancellation goes on, so that
        what the request holds stays counted (service.api.admission) until it is freed.
        """
        future = self.submit(model, payload)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # wrap_future has tried future.cancel(): it fails once the batch has started.
            if not future.cancelled():
                with contextlib.suppress(Exception):
                    await asyncio.wrap_future(future)
            raise

    def _next(self) -> list[_Job] | None:
        """The next batch: the model whose oldest request is oldest, up to the batch size."""
        with self._cond:
            while True:
                while not self._closed and not any(self._queues.values()):
                    self._cond.wait()
                if self._closed:
                    return None
                model, queue = min(((m, q) for m, q in self._queues.items() if q),
                                   key=lambda item: item[1][0].enqueued)
                deadline = queue[0].enqueued + self.max_queue_delay_s
                while (len(queue) < self.max_batch_size and not self._closed
                       and (wait := deadline - time.perf_counter()) > 0):
                    self._cond.wait(wait)
                if self._closed:
                    return None
                taken = [queue.popleft() for _ in range(min(len(queue), self.max_batch_size))]
                # A request whose client went away before its batch started is dropped.
                batch = [job for job in taken if job.future.set_running_or_notify_cancel()]
                for job in taken:
                    metrics.PENDING.labels(model).dec()
                if batch:
                    return batch

    def _loop(self) -> None:
        while (batch := self._next()) is not None:
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        model = batch[0].model
        start = time.perf_counter()
        results = self._results(model, [job.payload for job in batch])
        elapsed = time.perf_counter() - start
        metrics.EXEC_COUNT.labels(model).inc()
        metrics.BATCH_SIZE.labels(model).observe(len(batch))
        metrics.INFERENCE_COUNT.labels(model).inc(len(batch))
        metrics.QUEUE_DURATION_US.labels(model).inc(
            sum(start - job.enqueued for job in batch) * 1e6)
        metrics.COMPUTE_DURATION_US.labels(model).inc(elapsed * 1e6 * len(batch))
        for job, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _results(self, model: str, payloads: list[Any]) -> list[Any]:
        """One result or exception per payload. A batch that fails as a whole is computed
        again request by request, so only the request that failed gets the error."""
        try:
            results = list(self._execute(model, payloads))
        # Whatever a request raised is handed to that request (its future raises it in the
        # request's own handler), never swallowed; the stream itself must keep running.
        except Exception as exc:  # noqa: BLE001
            if len(payloads) == 1:
                return [exc]
            log.info("a batch of %d for %s failed (%s); computing its requests one by one",
                     len(payloads), model, type(exc).__name__)
            return [self._results(model, [p])[0] for p in payloads]
        if len(results) != len(payloads):
            wrong = RuntimeError(f"{len(results)} results for {len(payloads)} requests")
            return [wrong] * len(payloads)
        return results


class Scheduler:
    """One compute stream per device, started and closed together."""

    def __init__(self, execute: Execute, devices: Sequence[str], *, max_batch_size: int,
                 max_queue_delay_ms: float, capacity: int) -> None:
        self.streams = {d: ComputeStream(execute, max_batch_size=max_batch_size,
                                         max_queue_delay_ms=max_queue_delay_ms,
                                         capacity=capacity, device=d)
                        for d in dict.fromkeys(devices)}

    def start(self) -> Scheduler:
        for stream in self.streams.values():
            stream.start()
        return self

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()

    async def run(self, model: str, device: str, payload: Any) -> Any:
        return await self.streams[device].run(model, payload)


__all__ = ["ComputeStream", "Execute", "Limiter", "Scheduler", "serial_pool_kernels"]
