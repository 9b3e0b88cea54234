"""Dynamic batching: concurrent scoring calls coalesced into one model call.

Owns only the coalescing. A worker thread takes the first waiting request, then keeps collecting requests
until `max_batch` items are gathered or `max_wait_s` has passed since the first, runs the model function once
on all of them and hands each caller its own slice. A request is never split, so one larger than
`max_batch` runs as a batch of its own. An exception from the model fails exactly the requests of that batch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class DynamicBatcher(Generic[Item, Result]):
    """`batcher(items)` returns `fn(items)`, computed in a batch with whatever else arrived meanwhile."""

    def __init__(self, fn: Callable[[list[Item]], list[Result]], *, max_batch: int = 64,
                 max_wait_s: float = 0.005) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
        self.fn, self.max_batch, self.max_wait_s = fn, max_batch, max_wait_s
        self._queue: queue.Queue[tuple[list[Item], Future[list[Result]]] | None] = queue.Queue()
        self._carry: tuple[list[Item], Future[list[Result]]] | None = None  # did not fit the last batch
        self.batches = 0
        self.items = 0
        self._thread = threading.Thread(target=self._run, name="saferl-batcher", daemon=True)
        self._thread.start()

    def submit(self, items: list[Item]) -> Future[list[Result]]:
        future: Future[list[Result]] = Future()
        if not items:
            future.set_result([])
        else:
            self._queue.put((list(items), future))
        return future

    def __call__(self, items: list[Item], timeout: float | None = None) -> list[Result]:
        return self.submit(items).result(timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def stats(self) -> dict[str, float]:
        return {"batches": float(self.batches), "items": float(self.items),
                "mean_batch": self.items / self.batches if self.batches else 0.0}

    def _collect(self, first: tuple[list[Item], Future[list[Result]]]) -> tuple[list, bool]:
        """The first request plus those arriving within the wait, up to max_batch items; and whether to stop."""
        pending, size = [first], len(first[0])
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch:
            try:
                request = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if request is None:
                return pending, True
            if size + len(request[0]) > self.max_batch:
                self._carry = request  # goes first into the next batch
                break
            pending.append(request)
            size += len(request[0])
        return pending, False

    def _run(self) -> None:
        while True:
            first, self._carry = (self._carry, None) if self._carry is not None else (self._queue.get(), None)
            if first is None:
                return
            pending, stop = self._collect(first)
            items: list[Any] = [x for request, _ in pending for x in request]
            try:
                results = self.fn(items)
                if len(results) != len(items):
                    raise RuntimeError(f"scorer returned {len(results)} results for {len(items)} items")
            except Exception as e:  # noqa: BLE001 - handed to the callers of this batch
                for _, future in pending:
                    future.set_exception(e)
            else:
                self.batches += 1
                self.items += len(items)
                start = 0
                for request, future in pending:
                    future.set_result(results[start:start + len(request)])
                    start += len(request)
            if stop:
                return
