"""Dynamic batching: concurrent requests for one model merge along the batch axis and run in a worker thread.

The policy, per model:
  - One worker thread runs one batch at a time, so the event loop stays free to receive and answer.
  - When the worker is free it takes the queued requests in arrival order, up to --max-batch rows, at
    once: under load, the requests that arrived while the last batch ran form the next one, and an idle
    server runs a lone request without waiting. It waits (at most until the oldest request has queued
    --max-delay-ms) only while the batch is not full and more requests are still being received.
  - At most --max-queue requests wait (the running batch not counted); one more is refused at once
    (QueueFullError, 503 with Retry-After) instead of piling up latency.
  - A request still unanswered --timeout-ms after it was queued gets DeadlineExceeded (504); if it
    was still queued it is dropped from the queue and never runs.
  - With batch buckets (models on CUDA), a batch is padded with zero rows up to the next bucket size,
    so onnxruntime sees a handful of shapes, all warmed up before the model is ready, instead of every
    size up to --max-batch. The padding rows are dropped from the outputs.
A batch that onnxruntime rejects is rerun one request at a time, so one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from bmc.serve_edge.metrics import ServeMetrics

log = logging.getLogger("bmc.serve")

Outputs = dict[str, np.ndarray]


class QueueFullError(Exception):
    """The model's queue holds --max-queue requests already."""


class DeadlineExceeded(Exception):
    """The request's --timeout-ms passed before its result was ready."""


class ShuttingDown(Exception):
    """The server is draining and takes no new work."""


class InferenceFailed(Exception):
    """onnxruntime refused this request's inputs (message is onnxruntime's reason, on one line)."""


@dataclass(eq=False)
class _Queued:
    inputs: dict[str, np.ndarray]
    rows: int
    signature: tuple  # every input's dtype and non-batch dims: only equal signatures can be concatenated
    future: asyncio.Future
    enqueued_s: float
    timer: asyncio.TimerHandle | None = field(default=None)


class DynamicBatcher:
    """Queues requests for one model and runs them in batches on its own worker thread."""

    def __init__(
        self,
        model_name: str,
        run_batch: Callable[[dict[str, np.ndarray]], Outputs],
        metrics: ServeMetrics,
        max_batch: int,
        max_delay_ms: float,
        max_queue: int,
        can_merge: bool,
        describe_error: Callable[[Exception], str] = str,
        batch_buckets: tuple[int, ...] = (),
    ):
        self.model_name = model_name
        self._run_batch = run_batch
        self._metrics = metrics
        self._max_rows = max_batch if can_merge else 1
        self._max_delay_s = max_delay_ms / 1000.0
        self._max_queue = max_queue
        self._describe_error = describe_error
        self._buckets = tuple(sorted(batch_buckets)) if can_merge else ()
        self._queue: deque[_Queued] = deque()
        self._queued_rows = 0
        self._arriving = 0
        self._stopping = False
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        """Start the scheduler on the running event loop and the worker thread."""
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"bmc-serve-{self.model_name}")
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name=f"batcher-{self.model_name}")

    async def stop(self) -> None:
        """Run what is queued, then stop the scheduler and the worker thread."""
        self._stopping = True
        if self._task is not None:
            self._wakeup.set()
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def arrival_started(self) -> None:
        """A request for this model is being received: worth waiting for while a batch is not full."""
        self._arriving += 1

    def arrival_finished(self) -> None:
        self._arriving -= 1
        if self._wakeup is not None and self._queue:
            self._wakeup.set()

    async def infer(self, inputs: dict[str, np.ndarray], rows: int, timeout_s: float) -> Outputs:
        """The outputs for these inputs (rows along axis 0), once their batch has run."""
        if self._stopping:
            raise ShuttingDown()
        if len(self._queue) >= self._max_queue:
            raise QueueFullError()
        loop = asyncio.get_running_loop()
        signature = tuple((name, array.dtype.str, array.shape[1:]) for name, array in inputs.items())
        item = _Queued(inputs, rows, signature, loop.create_future(), loop.time())
        self._queue.append(item)
        self._queued_rows += rows
        self._metrics.set_queue_depth(self.model_name, len(self._queue))
        self._wakeup.set()
        item.timer = loop.call_later(timeout_s, self._expire, item)
        try:
            return await item.future
        finally:
            item.timer.cancel()
            if not item.future.done() or item.future.cancelled():
                self._unqueue(item)  # the handler was cancelled (shutdown grace period over)

    def _expire(self, item: _Queued) -> None:
        if not item.future.done():
            self._unqueue(item)
            item.future.set_exception(DeadlineExceeded())

    def _unqueue(self, item: _Queued) -> None:
        try:
            self._queue.remove(item)
        except ValueError:
            return  # already taken into a batch
        self._queued_rows -= item.rows
        self._metrics.set_queue_depth(self.model_name, len(self._queue))

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            wait_s = self._wait_for_more_s(loop.time())
            if wait_s > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait_s)
                except TimeoutError:
                    pass
                continue
            batch = self._take()
            try:
                await self._run(batch, loop)
            except Exception as exc:  # the scheduler must outlive any one batch
                log.error("%s: batch of %d requests failed: %s", self.model_name, len(batch), type(exc).__name__)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(InferenceFailed("internal error while running the batch"))

    def _wait_for_more_s(self, now_s: float) -> float:
        if self._max_rows == 1 or self._queued_rows >= self._max_rows or self._arriving <= 0 or self._stopping:
            return 0.0
        return self._queue[0].enqueued_s + self._max_delay_s - now_s

    def _take(self) -> list[_Queued]:
        batch = [self._queue.popleft()]
        rows = batch[0].rows
        while self._queue:
            candidate = self._queue[0]
            if rows + candidate.rows > self._max_rows or candidate.signature != batch[0].signature:
                break
            batch.append(self._queue.popleft())
            rows += candidate.rows
        self._queued_rows -= rows
        self._metrics.set_queue_depth(self.model_name, len(self._queue))
        return batch

    def _timed_run(self, feed: dict[str, np.ndarray]) -> tuple[Outputs, int]:
        """(outputs, nanoseconds onnxruntime took), timed on the worker thread so the loop's delays do not count."""
        started_ns = time.perf_counter_ns()
        outputs = self._run_batch(feed)
        return outputs, time.perf_counter_ns() - started_ns

    async def _run(self, batch: list[_Queued], loop: asyncio.AbstractEventLoop) -> None:
        rows = sum(item.rows for item in batch)
        now_s = loop.time()
        queue_seconds = [now_s - item.enqueued_s for item in batch]
        self._metrics.batch_ran(self.model_name, rows, queue_seconds)
        padded_rows = next((b for b in self._buckets if b >= rows), rows)
        input_started_ns = time.perf_counter_ns()
        if len(batch) == 1 and padded_rows == rows:
            feed = batch[0].inputs
        else:
            feed = {name: _merge([item.inputs[name] for item in batch], padded_rows - rows) for name in batch[0].inputs}
        input_ns = time.perf_counter_ns() - input_started_ns
        try:
            outputs, infer_ns = await loop.run_in_executor(self._executor, self._timed_run, feed)
        except Exception as exc:  # onnxruntime's own error types
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(InferenceFailed(self._describe_error(exc)))
                return
            for item in batch:  # find the request that caused it; the others still get answers
                await self._run([item], loop)
            return
        output_started_ns = time.perf_counter_ns()
        if len(batch) == 1 and padded_rows == rows:
            if not batch[0].future.done():
                batch[0].future.set_result(outputs)
        elif any(array.ndim == 0 or array.shape[0] != padded_rows for array in outputs.values()):
            for item in batch:  # an output without a batch axis cannot be split: run each alone
                await self._run([item], loop)
            return
        else:
            start = 0
            for item in batch:
                stop = start + item.rows
                if not item.future.done():
                    item.future.set_result({name: array[start:stop] for name, array in outputs.items()})
                start = stop
        output_ns = time.perf_counter_ns() - output_started_ns
        queue_ns = int(sum(queue_seconds) * 1e9)
        self._metrics.batch_executed(self.model_name, len(batch), rows, padded_rows, queue_ns, input_ns, infer_ns, output_ns)


def _merge(arrays: list[np.ndarray], padding_rows: int) -> np.ndarray:
    """The requests' rows in order, then `padding_rows` rows of zeros (empty strings for a string tensor)."""
    if padding_rows:
        shape, dtype = (padding_rows, *arrays[0].shape[1:]), arrays[0].dtype
        arrays = [*arrays, np.full(shape, "", dtype) if dtype.kind == "O" else np.zeros(shape, dtype)]
    return np.concatenate(arrays)
