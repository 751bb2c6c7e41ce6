"""Micro-batching of concurrent requests for ``m2-serve``.

Each modality (texts, images) has a :class:`MicroBatcher`. A request submits its items (one or
more texts, or preprocessed image tensors) and awaits a future. The batcher's loop takes the
oldest pending request, then keeps gathering until the pending items reach ``max_batch`` or the
oldest request has waited ``max_wait_ms``, runs the encoder once on the concatenated items and
hands every request its own rows, in order.

The wait is measured from the arrival of the oldest pending request, so requests that queued
while the previous forward ran go out at once: under load batches fill up without added latency,
and a lone request waits at most ``max_wait_ms``.

Every batcher of an app shares one :class:`EncoderWorker`: a single thread that runs one forward
pass at a time (the model is not thread-safe). Requests are never split: a batch holds whole
requests, at most ``max_batch`` items unless a single request is larger (then it runs alone;
the encode function may still cut it into several forwards).

Float rounding: a row computed in a batch of 8 may differ from the same row computed alone in
the last bits (the matrix kernels block and sum differently for other batch sizes); for fp32
on CPU the difference is ~1e-7, far below anything a similarity ranking can see.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

import torch

__all__ = ["EncoderWorker", "MicroBatcher", "QueueFull", "BatcherClosed"]

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More items are pending than the batcher accepts (the service is overloaded)."""


class BatcherClosed(RuntimeError):
    """The batcher was closed (the service is shutting down)."""


class EncoderWorker:
    """One thread that runs every forward pass of an app, one at a time.

    Also counts the forward calls it ran and the seconds they took (``calls``, ``busy_s``).
    """

    def __init__(self, name: str = "m2-encoder"):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self.calls = 0
        self.busy_s = 0.0

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            with self._lock:
                self.calls += 1
                self.busy_s += time.perf_counter() - t0

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the worker thread and await its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._timed, fn, *args)

    def close(self) -> None:
        """Stop accepting work; a forward already running finishes in the background."""
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Request:
    items: Sequence[Any]
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Gathers concurrent requests of one modality into batches for ``encode``.

    Args:
        encode: ``encode(items) -> Tensor [len(items), D]``, run on ``worker``'s thread. Row
            ``i`` must be item ``i``'s result.
        worker: the app's :class:`EncoderWorker` (shared by every batcher of the model).
        max_batch: most items per batch (a larger single request runs alone).
        max_wait_ms: longest time the oldest pending request waits for the batch to fill.
        max_queue: most items waiting at once; beyond it :meth:`submit` raises
            :class:`QueueFull` (0: unbounded).
        name: the modality, for logs.
    """

    def __init__(self, encode: Callable[[List[Any]], torch.Tensor], worker: EncoderWorker, *,
                 max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 0,
                 name: str = "items"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.encode, self.worker, self.name = encode, worker, name
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self._pending: Deque[_Request] = collections.deque()
        self._pending_items = 0
        self._in_flight = 0
        self._wakeup: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._closed = False
        # counters
        self.requests = 0
        self.batches = 0
        self.items = 0
        self.largest_batch = 0
        self.errors = 0

    # -- submission ----------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Items waiting for a batch."""
        return self._pending_items

    @property
    def in_flight(self) -> int:
        """Items of the batch being encoded now."""
        return self._in_flight

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            if self._task is not None and self._task.done() and not self._task.cancelled():
                exc = self._task.exception()
                if exc is not None:
                    logger.error("%s batcher loop ended with %r; restarting", self.name, exc)
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(),
                                                                name=f"batcher-{self.name}")

    async def submit(self, items: Sequence[Any]) -> torch.Tensor:
        """Queue ``items`` and wait for their rows (``[len(items), D]``, in order).

        Raises :class:`QueueFull` when the queue is at ``max_queue``, :class:`BatcherClosed`
        after :meth:`close`, or whatever ``encode`` raised for the batch.
        """
        if self._closed:
            raise BatcherClosed(f"the {self.name} batcher is closed")
        if not items:
            raise ValueError("submit() needs at least one item")
        if self.max_queue and self._pending_items + len(items) > self.max_queue:
            raise QueueFull(f"{self._pending_items} {self.name} are already waiting "
                            f"(limit {self.max_queue}); retry shortly")
        self._ensure_started()
        req = _Request(list(items), asyncio.get_running_loop().create_future())
        self._pending.append(req)
        self._pending_items += len(req.items)
        self.requests += 1
        self._wakeup.set()
        return await req.future

    # -- the loop ------------------------------------------------------------------------------
    def _take_batch(self) -> List[_Request]:
        batch: List[_Request] = []
        n = 0
        while self._pending:
            req = self._pending[0]
            if req.future.done():  # cancelled by its client: drop it
                self._pending.popleft()
                self._pending_items -= len(req.items)
                continue
            if batch and n + len(req.items) > self.max_batch:
                break
            self._pending.popleft()
            self._pending_items -= len(req.items)
            batch.append(req)
            n += len(req.items)
        return batch

    async def _wait_for_batch(self) -> None:
        """Return when the pending items fill a batch or the oldest request's wait is over."""
        while self._pending_items < self.max_batch and self._pending:
            remaining = self._pending[0].arrived + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _loop(self) -> None:
        while not self._closed:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._wait_for_batch()
            batch = self._take_batch()
            if not batch:
                continue
            items = [it for req in batch for it in req.items]
            self._in_flight = len(items)
            try:
                rows = await self.worker.run(self.encode, items)
                if rows.shape[0] != len(items):
                    raise RuntimeError(f"the {self.name} encoder returned {rows.shape[0]} rows "
                                       f"for {len(items)} items")
            except asyncio.CancelledError:
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(BatcherClosed("the service is shutting down"))
                raise
            except Exception as exc:  # noqa: BLE001 - handed to every request of the batch
                self.errors += 1
                logger.exception("%s batch of %d failed", self.name, len(items))
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(exc)
            else:
                self.batches += 1
                self.items += len(items)
                self.largest_batch = max(self.largest_batch, len(items))
                lo = 0
                for req in batch:
                    n = len(req.items)
                    if not req.future.done():
                        req.future.set_result(rows[lo:lo + n])
                    lo += n
            finally:
                self._in_flight = 0

    async def close(self) -> None:
        """Stop the loop and fail every request still waiting with :class:`BatcherClosed`."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
        while self._pending:
            req = self._pending.popleft()
            if not req.future.done():
                req.future.set_exception(BatcherClosed("the service is shutting down"))
        self._pending_items = 0

    def stats(self) -> Dict[str, Any]:
        """Counters for ``/health``: requests, batches and items run, mean and largest batch
        size, failed batches, and the items queued and in flight now."""
        return {"requests": self.requests, "batches": self.batches, "items": self.items,
                "mean_batch_size": round(self.items / self.batches, 3) if self.batches else 0.0,
                "largest_batch": self.largest_batch, "failed_batches": self.errors,
                "queued": self.queued, "in_flight": self.in_flight,
                "max_batch": self.max_batch, "max_wait_ms": self.max_wait_s * 1000.0}
