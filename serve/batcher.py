"""Micro-batching of concurrent encode requests, and an LRU cache of embeddings keyed by text.

sentence-transformers encodes a list in batches but has no notion of requests arriving over time; web servers
have requests but no notion of a forward pass. This module is the missing piece: requests queue, and one worker
thread takes what has queued, up to a text and a token budget, through one ``encode`` call, and hands each request
its own rows back. Everything a request costs besides the HTTP work (counting its tokens, the forward pass) runs in
that thread, so the event loop stays free to admit, refuse and answer; and a request is checked again just before
its pass starts: one whose client has gone, or that has waited past ``drop_after_ms``, is dropped unencoded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)


class LRUCache:
    """Least-recently-used map from text to its embedding (a read-only float32 row) and its token count.
    ``capacity`` 0 = off."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._rows: OrderedDict[str, tuple[np.ndarray, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, text: str) -> tuple[np.ndarray, int] | None:
        """(row, tokens) of ``text``, or None."""
        found = self._rows.get(text)
        if found is None:
            self.misses += 1
            return None
        self._rows.move_to_end(text)
        self.hits += 1
        return found

    def put(self, text: str, row: np.ndarray, tokens: int = 0) -> None:
        if self.capacity <= 0:
            return
        row = np.array(row, dtype=np.float32)  # own copy: the batch it came from may be freed or reused
        row.flags.writeable = False
        self._rows[text] = (row, tokens)
        self._rows.move_to_end(text)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    def __len__(self) -> int:
        return len(self._rows)


class TooManyTokens(ValueError):
    """A text of a request is longer than the batcher's ``max_tokens``: the request is refused, never truncated."""

    def __init__(self, position: int, tokens: int, limit: int):
        super().__init__(f"text {position} has {tokens} tokens; at most {limit}")
        self.position, self.tokens, self.limit = position, tokens, limit


class Expired(RuntimeError):
    """A request waited longer than ``drop_after_ms`` for its forward pass and was dropped unencoded."""

    def __init__(self, waited_s: float, limit_s: float):
        super().__init__(f"waited {waited_s * 1000:.0f} ms for the model, more than {limit_s * 1000:.0f} ms")
        self.waited_s, self.limit_s = waited_s, limit_s


@dataclass
class _Request:
    texts: list[str]
    future: Future  # (rows, token counts); cancelled when the client goes away
    arrived: float  # time.monotonic()
    counts: list[int] | None = field(default=None)  # counted once, also when the request is put back


class MicroBatcher:
    """Run concurrent ``encode`` requests as shared forward passes, in one worker thread.

    Args:
        encode: blocking ``texts -> (len(texts), dim) float32``. It runs in the one worker thread, so forward passes
            never overlap (they would only fight over the same cores).
        max_batch_size: texts per forward pass. A single request larger than this is still encoded whole.
        max_wait_ms: how long the first request of a batch waits for others to join it while the encoder is idle;
            0 = start at once (requests that arrive during a pass form the next one, so batches still grow with
            the load, and a request alone pays no wait).
        enabled: False = one request per forward pass, in arrival order (the benchmark baseline).
        count_tokens: ``texts -> tokens per text``, run in the worker thread; with ``max_tokens`` a request with a
            longer text fails with :class:`TooManyTokens`. None = no counting (counts are reported as 0).
        max_tokens: the longest text accepted, in tokens (0 = any).
        max_batch_tokens: tokens per forward pass (0 = no bound): a pass costs about its tokens, so this bounds how
            long one pass holds the requests behind it. A single request larger than this is still encoded whole.
        drop_after_ms: a request still waiting for its pass this long after it arrived fails with :class:`Expired`
            instead of being encoded (0 = never).

    Example::

        batcher = MicroBatcher(bundle.encode, max_batch_size=64)
        await batcher.start()
        rows = await batcher.encode(["a query"])  # (1, dim)
        await batcher.stop()
    """

    def __init__(self, encode: Callable[[list[str]], np.ndarray], max_batch_size: int = 64,
                 max_wait_ms: float = 0.0, enabled: bool = True,
                 count_tokens: Callable[[list[str]], list[int]] | None = None, max_tokens: int = 0,
                 max_batch_tokens: int = 0, drop_after_ms: float = 0.0):
        self._encode = encode
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.enabled = enabled
        self.count_tokens, self.max_tokens, self.max_batch_tokens = count_tokens, max_tokens, max_batch_tokens
        self.drop_after = drop_after_ms / 1000.0
        self._pending: deque[_Request] = deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # For expected_wait(): texts queued, the pass in progress, and the recent cost of a text in a forward pass
        # (moving average over passes; None before the first). Written by the worker, read by the event loop.
        self._waiting_texts = 0
        self._pass_started: float | None = None
        self._pass_texts = 0
        self._seconds_per_text: float | None = None
        self.forward_passes = 0
        self.requests = 0
        self.texts = 0
        self.dropped_gone = 0
        self.dropped_late = 0

    async def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="embtune-encode", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._ready:
            self._stopping = True
            pending, self._pending = list(self._pending), deque()
            self._waiting_texts = 0
            self._ready.notify_all()
        for request in pending:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(RuntimeError("server is shutting down"))
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def submit(self, texts: list[str]) -> Future:
        """Queue ``texts``; the future gets ``(rows, token counts)``, rows (len(texts), dim). Cancel it to drop the
        request before its pass (a client that went away)."""
        if self._thread is None or self._stopping:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        future: Future = Future()
        with self._ready:
            self._pending.append(_Request(texts, future, time.monotonic()))
            self._waiting_texts += len(texts)
            self._ready.notify()
        return future

    async def encode_counted(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Embeddings of ``texts``, (len(texts), dim), and each text's tokens, from a pass shared with others."""
        return await asyncio.wrap_future(self.submit(texts))

    async def encode(self, texts: list[str]) -> np.ndarray:
        """Embeddings of ``texts``, (len(texts), dim), computed in some forward pass shared with other requests."""
        return (await self.encode_counted(texts))[0]

    def oldest_wait(self) -> float:
        """Seconds the longest-waiting request has waited for its forward pass to start (0.0 when none waits)."""
        try:
            return time.monotonic() - self._pending[0].arrived
        except IndexError:
            return 0.0

    def expected_wait(self) -> float:
        """Seconds a request arriving now would wait for its forward pass to start: the estimate from the recent
        cost per text (the rest of the pass in progress, then every text queued ahead), or the oldest request's
        wait so far, whichever is larger. The estimate is what keeps a burst from being admitted whole."""
        waited = self.oldest_wait()
        cost = self._seconds_per_text
        if cost is None:
            return waited
        current = 0.0
        started = self._pass_started
        if started is not None:
            current = max(0.0, started + self._pass_texts * cost - time.monotonic())
        return max(waited, current + self._waiting_texts * cost)

    # --- the worker thread ---

    def _take(self) -> list[_Request]:
        """Requests for the next pass, up to ``max_batch_size`` texts (the first always); waits for one."""
        with self._ready:
            while not self._pending and not self._stopping:
                self._ready.wait()
            if self._stopping:
                return []
            if self.enabled and self.max_wait > 0:
                until = self._pending[0].arrived + self.max_wait
                while self._waiting_texts < self.max_batch_size and not self._stopping:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._ready.wait(left)
            taken, size = [], 0
            while self._pending:
                request = self._pending[0]
                if taken and (not self.enabled or size + len(request.texts) > self.max_batch_size):
                    break
                taken.append(self._pending.popleft())
                size += len(request.texts)
                self._waiting_texts -= len(request.texts)
            return taken

    def _put_back(self, requests: list[_Request]) -> None:
        with self._ready:
            self._pending.extendleft(reversed(requests))
            self._waiting_texts += sum(len(r.texts) for r in requests)

    def _select(self, taken: list[_Request]) -> list[_Request]:
        """The requests of ``taken`` that this pass encodes: drops the gone, the late and the too long (failing
        their futures), counts tokens, and puts back whatever is past the token budget."""
        now = time.monotonic()
        batch: list[_Request] = []
        tokens = 0
        for i, request in enumerate(taken):
            if request.future.cancelled():
                self.dropped_gone += 1
                continue
            if self.drop_after and now - request.arrived > self.drop_after:
                if request.future.set_running_or_notify_cancel():
                    request.future.set_exception(Expired(now - request.arrived, self.drop_after))
                self.dropped_late += 1
                continue
            if request.counts is None:
                request.counts = self.count_tokens(request.texts) if self.count_tokens else [0] * len(request.texts)
            too_long = [(p, n) for p, n in enumerate(request.counts) if self.max_tokens and n > self.max_tokens]
            if too_long:
                if request.future.set_running_or_notify_cancel():
                    request.future.set_exception(TooManyTokens(*too_long[0], self.max_tokens))
                continue
            if batch and self.max_batch_tokens and tokens + sum(request.counts) > self.max_batch_tokens:
                self._put_back(taken[i:])
                break
            batch.append(request)
            tokens += sum(request.counts)
        live = []
        for request in batch:  # from here on a client that leaves no longer cancels its request
            if request.future.set_running_or_notify_cancel():
                live.append(request)
            else:
                self.dropped_gone += 1
        return live

    def _work(self) -> None:
        while not self._stopping:
            taken = self._take()
            try:
                batch = self._select(taken)
            except Exception as err:  # counting failed: every request taken gets the error
                logger.exception("counting tokens failed for %d requests", len(taken))
                for request in taken:
                    if request.future.set_running_or_notify_cancel():
                        request.future.set_exception(err)
                continue
            if not batch:
                continue
            texts = [text for request in batch for text in request.texts]
            self._pass_started, self._pass_texts = time.monotonic(), len(texts)
            try:
                rows = self._encode(texts)  # (len(texts), dim)
            except Exception as err:  # the model failed: every request of the batch gets the error
                logger.exception("encode failed for a batch of %d texts", len(texts))
                for request in batch:
                    request.future.set_exception(err)
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
            for request in batch:
                request.future.set_result((rows[start:start + len(request.texts)], request.counts))
                start += len(request.texts)

    def waiting(self) -> int:
        """Requests queued for a forward pass that has not started."""
        return len(self._pending)

    def stats(self) -> dict[str, float]:
        return {
            "waiting": self.waiting(),
            "ms_per_text": round(1000 * self._seconds_per_text, 2) if self._seconds_per_text is not None else None,
            "forward_passes": self.forward_passes,
            "requests": self.requests,
            "texts": self.texts,
            "mean_texts_per_pass": round(self.texts / self.forward_passes, 2) if self.forward_passes else 0.0,
            "dropped_client_gone": self.dropped_gone,
            "dropped_late": self.dropped_late,
        }
