"""Micro-batching of concurrent query embeddings, and a cache of recent ones.

A model embeds a batch of 8 images in far less than 8 times the time of one, so concurrent
requests are worth grouping. :class:`MicroBatcher` queues each request's image; one background
task takes up to ``max_batch`` of them, waiting at most ``max_wait_ms`` after the oldest one
arrived, and runs the embedding function on the whole batch in a worker thread, so the event
loop keeps accepting requests meanwhile. With ``workers`` > 1, that many batches run at once:
on a CPU with torch at one thread, two forwards use two cores, and the next batch forms while
the previous one is still embedding. A request that finds the batcher idle gains nothing
from batching: :meth:`MicroBatcher.run_alone` runs its whole work (decode, embed, search) as
one job on a model thread, without the hand-offs between threads of the batched path.
:class:`EmbeddingCache` answers
repeated uploads of the same bytes without running the model at all.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EmbedFn = Callable[[list[Any]], np.ndarray]
BatchCallback = Callable[[int, float], None]


@dataclass
class _Request:
    image: Any
    future: asyncio.Future[np.ndarray]
    queued_at: float  # event-loop time


class MicroBatcher:
    """Groups concurrent :meth:`embed` calls into batches for one embedding function.

    Use it from one event loop (the service's). The background task starts on the first
    :meth:`embed` (or :meth:`start`); :meth:`close` stops it.

    Args:
        embed_fn: Embeds a list of images as one batch, returning ``[len(images), dim]``; it
            runs in a worker thread, at most ``workers`` calls at once.
        max_batch: Most images per call of ``embed_fn``.
        max_wait_ms: Longest time the oldest queued request waits for others to join its
            batch; 0 batches only what is already queued.
        workers: Batches embedded at the same time (threads calling ``embed_fn``).
        executor: The threads to call ``embed_fn`` on, ``workers`` of them; the batcher then
            owns it (:meth:`close` shuts it down). Default: new threads. Pass the threads that
            loaded and warmed the model: see :attr:`executor`.
        lone_executor: A thread of its own for :meth:`run_alone`'s jobs (owned too), which
            then still take a model thread's turn; default: ``executor``. A thread that only
            ever forwards one image stays fast: one that also forwards large batches forwards
            one image 15-30 % slower for minutes after a burst of them.
        on_batch: Called after each call of ``embed_fn`` (successful or not) with the batch
            size and the seconds the call took, e.g. to feed Prometheus histograms. Errors it
            raises are logged and ignored.
    """

    def __init__(
        self,
        embed_fn: EmbedFn,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        on_batch: BatchCallback | None = None,
        workers: int = 1,
        executor: concurrent.futures.ThreadPoolExecutor | None = None,
        lone_executor: concurrent.futures.ThreadPoolExecutor | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {max_wait_ms}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.embed_fn = embed_fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._pending: collections.deque[_Request] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.workers = workers
        self._in_flight: set[asyncio.Task[None]] = set()
        self._lone_jobs: set[concurrent.futures.Future[Any]] = set()  # run_alone's, running
        self._free: asyncio.Semaphore | None = None  # model threads not embedding (or alone)
        self._spare = workers  # the same count, readable (a semaphore's is private)
        # The model's own threads: forwards never queue behind decodes and searches, which
        # share the event loop's default executor.
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="embed"
        )
        # Where run_alone's jobs run (default: the model threads); owned like ``executor``.
        self._lone_executor = lone_executor or self._executor

    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """The model's threads. Run every other use of the model on them too (loading,
        warm-up, the recall canary): libgomp gives each thread that starts an OpenMP-parallel
        forward a team of its own, and once its teams hold more threads than there are cores
        it stops spinning between parallel regions. A forward at 2 torch threads on 2 cores
        then took 13.7 ms instead of 7.3 ms."""
        return self._executor

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting the batch being embedded)."""
        return len(self._pending)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    async def start(self) -> None:
        """Start the background task now rather than on the first request.

        Raises:
            RuntimeError: The batcher is closed.
        """
        self._ensure_running()

    async def embed(self, image: Any) -> np.ndarray:
        """Embed one image as part of whatever batch it joins.

        Args:
            image: Passed to ``embed_fn`` inside a list.

        Returns:
            This image's row of the batch's embeddings (a copy).

        Raises:
            RuntimeError: The batcher is closed, or was closed before this image was embedded.
            Exception: Whatever ``embed_fn`` raised for this image's batch.
        """
        self._ensure_running()
        loop = asyncio.get_running_loop()
        request = _Request(image, loop.create_future(), loop.time())
        self._pending.append(request)
        assert self._wakeup is not None
        self._wakeup.set()
        return await request.future

    async def close(self) -> None:
        """Stop the background task after the batch in flight, failing queued requests.

        A batch already handed to ``embed_fn`` completes (its thread cannot be interrupted),
        and so does a :meth:`run_alone` job whose caller gave up: once this returns, nothing
        of this batcher runs (a job searches the collection the caller must close after it).
        Requests still queued fail with :class:`RuntimeError`. Safe to call more than once.
        """
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        while self._lone_jobs:
            jobs = [asyncio.wrap_future(job) for job in list(self._lone_jobs)]
            await asyncio.gather(*jobs, return_exceptions=True)
        self._fail_pending()
        self._executor.shutdown(wait=False)
        self._lone_executor.shutdown(wait=False)

    def _ensure_running(self) -> None:
        if self._closed:
            raise RuntimeError("MicroBatcher is closed; no more images can be embedded")
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            if self._free is None:  # (lone jobs may hold it across a restart of the task)
                self._free = asyncio.Semaphore(self.workers)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def run_alone(self, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """Run ``fn(*args)`` on a model thread at once if this batcher is idle (nothing
        queued, a model thread free), as a batch of one that ``fn`` embeds itself.

        A lone request gains nothing from batching, and doing its whole work (decode, embed,
        search) as one job spares it the hand-offs between threads that the batched path
        makes. It is done so only while another model thread stays free, so that requests
        arriving meanwhile batch at once, as usual: never with one worker, whose one thread
        would then idle through the job's decoding and search.

        Returns:
            ``(True, what fn returned)``, or ``(False, None)`` without running it when the
            batcher is busy or has one model thread: then embed through :meth:`embed`.

        Raises:
            Exception: Whatever ``fn`` raised.
        """
        self._ensure_running()
        assert self._free is not None
        if self._pending or self._spare < 2:
            return False, None
        await self._take()  # spare: does not wait
        loop = asyncio.get_running_loop()
        job = self._lone_executor.submit(fn, *args)
        self._lone_jobs.add(job)
        # The thread is given back when the job has really ended: a caller cancelled while
        # it runs (a client gone, a shutdown) leaves the thread busy until then.
        job.add_done_callback(self._lone_jobs.discard)
        job.add_done_callback(lambda _: _call_soon(loop, self._give))
        return True, await asyncio.wrap_future(job)

    async def _take(self) -> None:
        assert self._free is not None
        await self._free.acquire()
        self._spare -= 1

    def _give(self) -> None:
        assert self._free is not None
        self._spare += 1
        self._free.release()

    async def _run(self) -> None:
        """Form and embed batches until closed; queued requests never outlive this task."""
        try:
            while not self._closed:
                await self._wait_for_request()
                await self._take()  # a worker is free: form the next batch for it
                batch = await self._next_batch()
                if not batch:
                    self._give()
                    continue
                task = asyncio.get_running_loop().create_task(self._embed_batch(batch))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
                task.add_done_callback(lambda _: self._give())
        finally:
            if self._in_flight:  # batches already handed to a worker complete
                await asyncio.gather(*self._in_flight, return_exceptions=True)
            self._fail_pending()

    async def _wait_for_request(self) -> None:
        """Until a request is queued (or the batcher closed). Model threads are taken only
        then, so that an idle batcher leaves them all free for :meth:`run_alone`."""
        assert self._wakeup is not None
        while not self._pending and not self._closed:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _next_batch(self) -> list[_Request]:
        """Wait for a first request, then for more until the batch is full or its time is up."""
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        await self._wait_for_request()
        if not self._pending:
            return []
        deadline = self._pending[0].queued_at + self.max_wait
        while len(self._pending) < self.max_batch and not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        if self._closed:
            return []
        batch = []
        while self._pending and len(batch) < self.max_batch:
            request = self._pending.popleft()
            if not request.future.done():  # a caller that gave up (cancelled) is skipped
                batch.append(request)
        return batch

    async def _embed_batch(self, batch: list[_Request]) -> None:
        """Run ``embed_fn`` on one batch in a worker thread and resolve its futures."""
        start = time.perf_counter()
        try:
            images = [r.image for r in batch]
            loop = asyncio.get_running_loop()
            vectors = await loop.run_in_executor(self._executor, self.embed_fn, images)
            if len(vectors) != len(batch):
                raise RuntimeError(
                    f"embed_fn returned {len(vectors)} rows for a batch of {len(batch)} images"
                )
        except Exception as err:
            _fail(batch, err)
        except asyncio.CancelledError:  # the loop is shutting down under this batch
            _fail(batch, RuntimeError("MicroBatcher was stopped while embedding this image"))
            raise
        else:
            for request, row in zip(batch, vectors, strict=True):
                if not request.future.done():
                    request.future.set_result(np.array(row, copy=True))
        finally:
            notify(self.on_batch, len(batch), time.perf_counter() - start)

    def _fail_pending(self) -> None:
        while self._pending:
            request = self._pending.popleft()
            if not request.future.done():
                request.future.set_exception(
                    RuntimeError("MicroBatcher was closed before this image was embedded")
                )


def _fail(batch: list[_Request], err: BaseException) -> None:
    for request in batch:
        if not request.future.done():
            request.future.set_exception(err)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """``callback`` on ``loop`` from any thread; nothing once the loop is closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


def notify(callback: Callable[..., None] | None, *args: Any) -> None:
    """Call an observer (a metrics callback) if there is one; what it raises is logged, not
    passed on: a broken metric must not fail the requests it measures."""
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:
        log.exception("callback %r failed", callback)


def digest(data: bytes) -> str:
    """The cache key of an upload: the SHA-256 hex digest of its bytes."""
    return hashlib.sha256(data).hexdigest()


class EmbeddingCache:
    """A thread-safe LRU cache of recent query embeddings, keyed by :func:`digest`.

    Embeddings belong to one model: clear the cache (or build a new one) when the model
    changes. Stored arrays are read-only copies, so no caller can alter another's result.

    Args:
        maxsize: Most embeddings kept; 0 disables the cache (every ``get`` misses).

    Attributes:
        hits: ``get`` calls that found an embedding.
        misses: ``get`` calls that did not.
    """

    def __init__(self, maxsize: int = 1024) -> None:
        if maxsize < 0:
            raise ValueError(f"maxsize must not be negative, got {maxsize}")
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._items: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Number of embeddings held."""
        with self._lock:
            return len(self._items)

    def get(self, key: str) -> np.ndarray | None:
        """The embedding stored under ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        """Store ``value`` under ``key``, evicting the least recently used beyond ``maxsize``."""
        if self.maxsize == 0:
            return
        stored = np.array(value, copy=True)
        stored.flags.writeable = False
        with self._lock:
            self._items[key] = stored
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)

    def clear(self) -> None:
        """Drop every embedding (counters are kept)."""
        with self._lock:
            self._items.clear()
