"""Micro-batching of concurrent encode requests, and an LRU cache of embeddings keyed by text.

sentence-transformers encodes a list in batches but has no notion of requests arriving over time; web servers
have requests but no notion of a forward pass. This module is the missing piece: requests wait a few
milliseconds in an asyncio queue, their texts go through one ``encode`` call in a worker thread, and each
request's future gets its own rows back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)


class LRUCache:
    """Least-recently-used map from text to its embedding (a read-only float32 row). ``capacity`` 0 = off."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._rows: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, text: str) -> np.ndarray | None:
        row = self._rows.get(text)
        if row is None:
            self.misses += 1
            return None
        self._rows.move_to_end(text)
        self.hits += 1
        return row

    def put(self, text: str, row: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        row = np.array(row, dtype=np.float32)  # own copy: the batch it came from may be freed or reused
        row.flags.writeable = False
        self._rows[text] = row
        self._rows.move_to_end(text)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    def __len__(self) -> int:
        return len(self._rows)


class MicroBatcher:
    """Run concurrent ``encode`` requests as shared forward passes.

    Args:
        encode: blocking ``texts -> (len(texts), dim) float32``. It runs in one worker thread, so forward passes
            never overlap (they would only fight over the same cores).
        max_batch_size: texts per forward pass. A single request larger than this is still encoded whole.
        max_wait_ms: how long the first request of a batch waits for others to join it.
        enabled: False = one request per forward pass, in arrival order (the baseline the benchmark compares to).

    Example::

        batcher = MicroBatcher(bundle.encode, max_batch_size=64, max_wait_ms=5)
        await batcher.start()
        rows = await batcher.encode(["a query"])  # (1, dim)
        await batcher.stop()
    """

    def __init__(self, encode: Callable[[list[str]], np.ndarray], max_batch_size: int = 64,
                 max_wait_ms: float = 5.0, enabled: bool = True):
        self._encode = encode
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.enabled = enabled
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._carry: tuple[list[str], asyncio.Future] | None = None  # a request that did not fit the last batch
        # When each request still waiting for a forward pass arrived (monotonic seconds), in queue order; the
        # carried request's own: what oldest_wait() reads.
        self._arrivals: deque[float] = deque()
        self._carry_since = 0.0
        # For expected_wait(): texts queued (the carried request's included), the pass in progress, and the recent
        # cost of a text in a forward pass (moving average over passes; None before the first).
        self._waiting_texts = 0
        self._pass_started: float | None = None
        self._pass_texts = 0
        self._seconds_per_text: float | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.forward_passes = 0
        self.requests = 0
        self.texts = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embtune-encode")
        self._task = asyncio.create_task(self._run(), name="embtune-microbatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        pending = [self._carry] if self._carry else []
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for _, future in pending:
            if not future.done():
                future.set_exception(RuntimeError("server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def encode(self, texts: list[str]) -> np.ndarray:
        """Embeddings of ``texts``, (len(texts), dim), computed in some forward pass shared with other requests."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        future = asyncio.get_running_loop().create_future()
        self._arrivals.append(time.monotonic())
        self._waiting_texts += len(texts)
        await self._queue.put((texts, future))
        return await future

    def oldest_wait(self) -> float:
        """Seconds the longest-waiting request has waited for its forward pass to start (0.0 when none waits)."""
        if self._carry is not None:
            return time.monotonic() - self._carry_since
        return time.monotonic() - self._arrivals[0] if self._arrivals else 0.0

    def expected_wait(self) -> float:
        """Seconds a request arriving now would wait for its forward pass to start: the estimate from the recent
        cost per text (the rest of the pass in progress, then every text queued ahead), or the oldest request's
        wait so far, whichever is larger. The estimate is what keeps a burst from being admitted whole."""
        waited = self.oldest_wait()
        cost = self._seconds_per_text
        if cost is None:
            return waited
        current = 0.0
        if self._pass_started is not None:
            current = max(0.0, self._pass_started + self._pass_texts * cost - time.monotonic())
        return max(waited, current + self._waiting_texts * cost)

    async def _take(self) -> tuple[list[str], asyncio.Future]:
        """The carried request, else the next in the queue (waiting for one)."""
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        item = await self._queue.get()
        self._arrivals.popleft()
        return item

    def _take_nowait(self) -> tuple[list[str], asyncio.Future]:
        item = self._queue.get_nowait()
        self._arrivals.popleft()
        return item

    async def _next_batch(self) -> list[tuple[list[str], asyncio.Future]]:
        loop = asyncio.get_running_loop()
        first = await self._take()
        self._waiting_texts -= len(first[0])
        batch, size = [first], len(first[0])
        if not self.enabled:
            return batch
        deadline = loop.time() + self.max_wait
        while size < self.max_batch_size:
            try:
                arrived = self._arrivals[0] if self._arrivals else 0.0
                item = self._take_nowait()
            except asyncio.QueueEmpty:
                if loop.time() >= deadline:
                    break
                # Polling in 1 ms steps instead of wait_for(queue.get()): no item can be lost to a timeout race.
                await asyncio.sleep(min(0.001, deadline - loop.time()))
                continue
            if size + len(item[0]) > self.max_batch_size:
                self._carry, self._carry_since = item, arrived
                break
            batch.append(item)
            size += len(item[0])
            self._waiting_texts -= len(item[0])
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            batch = [(texts, fut) for texts, fut in batch if not fut.done()]  # skip requests whose client left
            if not batch:
                continue
            texts = [text for request_texts, _ in batch for text in request_texts]
            self._pass_started, self._pass_texts = time.monotonic(), len(texts)
            try:
                rows = await loop.run_in_executor(self._executor, self._encode, texts)  # (len(texts), dim)
            except Exception as err:  # the model failed: every request of the batch gets the error
                logger.exception("encode failed for a batch of %d texts", len(texts))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            finally:
                cost = (time.monotonic() - self._pass_started) / len(texts)
                previous = self._seconds_per_text
                self._seconds_per_text = cost if previous is None else 0.8 * previous + 0.2 * cost
                self._pass_started = None
            self.forward_passes += 1
            self.requests += len(batch)
            self.texts += len(texts)
            start = 0
            for request_texts, future in batch:
                if not future.done():
                    future.set_result(rows[start:start + len(request_texts)])
                start += len(request_texts)

    def waiting(self) -> int:
        """Requests queued for a forward pass that has not started."""
        return (self._queue.qsize() if self._queue is not None else 0) + (1 if self._carry else 0)

    def stats(self) -> dict[str, float]:
        return {
            "waiting": self.waiting(),
            "ms_per_text": round(1000 * self._seconds_per_text, 2) if self._seconds_per_text is not None else None,
            "forward_passes": self.forward_passes,
            "requests": self.requests,
            "texts": self.texts,
            "mean_texts_per_pass": round(self.texts / self.forward_passes, 2) if self.forward_passes else 0.0,
        }
