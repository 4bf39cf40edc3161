"""Bounded concurrency for the compute-heavy part of requests."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TypeVar

import anyio
import anyio.to_thread

from service.errors import Overloaded

T = TypeVar("T")


class Limiter:
    """Runs blocking work in threads, at most ``concurrency`` at once.

    Up to ``queue`` more requests wait; beyond that, ``Overloaded`` (HTTP 503 with
    Retry-After) tells clients to come back instead of piling up memory and latency.
    """

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self._slots = anyio.CapacityLimiter(concurrency)
        self.pending = 0

    def is_overloaded(self) -> bool:
        return self.pending >= self.concurrency + self.queue

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self.is_overloaded():
            raise Overloaded(
                f"{self.pending} requests are in progress or waiting; retry shortly",
                retry_after_s=1,
            )
        self.pending += 1
        try:
            return await anyio.to_thread.run_sync(partial(fn, *args), limiter=self._slots)
        finally:
            self.pending -= 1
