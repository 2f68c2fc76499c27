"""Server-side dynamic batching: concurrent requests merged into one inference batch.

Requests that arrive within ``window_s`` of the first waiting one (like Triton's
``max_queue_delay``) are merged, in arrival order, up to ``max_batch_size`` items, and
run by one call of the model in a worker thread, so the event loop keeps accepting
calls while the model runs. Only requests with the same ``key`` merge (a detector's
options, say). A request is never split: callers check it fits ``max_batch_size``.
Results are the same however requests were merged, because models compute each item
independently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from facestage import metrics
from facestage.errors import ResourceExhaustedError, UnavailableError

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass
class _Pending(Generic[ItemT, ResultT]):
    items: Sequence[ItemT]
    key: Hashable
    future: asyncio.Future[list[ResultT]]
    enqueued_at: float = field(default_factory=time.monotonic)


class DynamicBatcher(Generic[ItemT, ResultT]):
    """Merges concurrent ``submit`` calls into batches for ``run_batch``.

    ``run_batch(items, key)`` runs in a worker thread and must return one result per
    item, in order.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[ItemT], Hashable], Sequence[ResultT]],
        *,
        stage: str,
        model_name: str,
        max_batch_size: int,
        window_s: float,
        max_queue_items: int,
        threads: int = 1,
    ) -> None:
        self._run_batch = run_batch
        self.stage = stage
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self.max_queue_items = max_queue_items
        self._threads = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=stage)
        self._pending: deque[_Pending[ItemT, ResultT]] = deque()
        self._queued_items = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(threads)
        self._worker: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        self._queue_gauge = metrics.BATCHER_QUEUE_DEPTH.labels(stage)
        self._batch_hist = metrics.BATCH_SIZE.labels(stage)
        self._infer_hist = metrics.INFERENCE_DURATION.labels(stage, model_name)
        self._items_counter = metrics.ITEMS_PROCESSED.labels(stage)
        self._queue_gauge.set(0)

    def start(self) -> None:
        """Starts the worker on the running event loop."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="batcher")

    async def close(self) -> None:
        """Fails waiting requests with UNAVAILABLE and stops the worker."""
        self._closed = True
        while self._pending:
            pending = self._pending.popleft()
            if not pending.future.done():
                pending.future.set_exception(UnavailableError("server is shutting down"))
        self._queued_items = 0
        self._queue_gauge.set(0)
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, items: Sequence[ItemT], key: Hashable = None) -> list[ResultT]:
        """Queues ``items`` for the model and waits for their results, in order."""
        if not items:
            return []
        if self._closed:
            raise UnavailableError("server is shutting down")
        if len(items) > self.max_batch_size:
            raise ResourceExhaustedError(
                f"{len(items)} items in one call exceed the maximum batch size "
                f"{self.max_batch_size}"
            )
        if self._queued_items + len(items) > self.max_queue_items:
            raise ResourceExhaustedError(
                f"{self.stage} queue is full ({self._queued_items} items waiting); retry later"
            )
        self.start()
        future: asyncio.Future[list[ResultT]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(items, key, future))
        self._queued_items += len(items)
        self._queue_gauge.set(self._queued_items)
        self._wakeup.set()
        return await future

    def _take_batch(self) -> list[_Pending[ItemT, ResultT]]:
        """Pops the oldest request and every later one with its key that still fits."""
        first = self._pending.popleft()
        batch, size = [first], len(first.items)
        keep: deque[_Pending[ItemT, ResultT]] = deque()
        while self._pending:
            candidate = self._pending.popleft()
            if candidate.key == first.key and size + len(candidate.items) <= self.max_batch_size:
                batch.append(candidate)
                size += len(candidate.items)
            else:
                keep.append(candidate)
        self._pending.extendleft(reversed(keep))
        self._queued_items -= size
        self._queue_gauge.set(self._queued_items)
        return batch

    def _ready_items(self, key: Hashable) -> int:
        return sum(len(p.items) for p in self._pending if p.key == key)

    async def _work(self) -> None:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._slots.acquire()
            # Give later requests until the window closes to join the oldest one.
            deadline = self._pending[0].enqueued_at + self.window_s if self._pending else 0.0
            while self._pending and self._ready_items(self._pending[0].key) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            if not self._pending:
                self._slots.release()
                continue
            batch = [p for p in self._take_batch() if not p.future.cancelled()]
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Pending[ItemT, ResultT]]) -> None:
        try:
            items = [item for pending in batch for item in pending.items]
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            try:
                results = await loop.run_in_executor(
                    self._executor, self._run_batch, items, batch[0].key
                )
            except Exception as exc:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                return
            self._infer_hist.observe(time.perf_counter() - started)
            self._batch_hist.observe(len(items))
            self._items_counter.inc(len(items))
            if len(results) != len(items):
                error = RuntimeError(f"model returned {len(results)} results for {len(items)}")
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                return
            offset = 0
            for pending in batch:
                count = len(pending.items)
                if not pending.future.done():
                    pending.future.set_result(list(results[offset : offset + count]))
                offset += count
        finally:
            self._slots.release()
