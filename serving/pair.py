"""The (model, collection) pair the service answers with, and how it is swapped.

A request takes the current pair once, at its start, and uses it to the end, so requests in
flight during a rollout finish on the old pair. A rollout loads and warms the new model
first, then swaps the reference (one assignment), then waits for the old pair's requests to
drain before closing it: no request is dropped and none sees a half-switched pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from serving.batching import EmbeddingCache, MicroBatcher
from serving.canary import DriftMonitor
from serving.embedder import Embedder
from serving.search_batching import SearchBatcher
from serving.settings import embed_workers, torch_threads
from serving.store import (
    LEASE_PREFIX,
    META_KEY_CHARS,
    IndexSpec,
    StoreError,
    VectorStore,
    spec_from_dict,
)

log = logging.getLogger(__name__)
# The metadata key of what admin changes made of a collection since its build (its categories).
LIVE_METADATA = "live"


@dataclass
class ServingPair:
    """A loaded model and the collection its embeddings fill."""

    embedder: Embedder
    batcher: MicroBatcher
    searcher: SearchBatcher
    cache: EmbeddingCache
    collection: str
    spec: IndexSpec
    metadata: dict[str, Any]
    drift: DriftMonitor = field(default_factory=lambda: DriftMonitor(None))
    canary: dict[str, Any] | None = None  # the last canary run's result
    in_flight: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def model_version(self) -> str:
        return str(self.metadata.get("model_version", self.embedder.version))

    def describe(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "collection": self.collection,
            "index_type": self.spec.index_type,
            "index_reason": self.spec.reason,
            "rows": self.metadata.get("rows"),
            "built_at": self.metadata.get("built_at"),
        }


def lease_holder_name() -> str:
    """A name for this replica's leases that fits a metadata key: the host name (a pod's can
    be 63 characters) cut short, the process id and a random part, which keeps two replicas
    whose names share the kept prefix apart. A key too long would not be written, and the
    clean-up would drop a collection this replica answers from."""
    room = META_KEY_CHARS - len(LEASE_PREFIX) - len("-4194304-") - 8  # the largest Linux pid
    return f"{socket.gethostname()[:room]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class PairHolder:
    """Holds the current pair; hands it to requests; swaps it on rollout."""

    def __init__(self, store: VectorStore, settings: Any, on_batch=None, on_search=None) -> None:
        self.store = store
        self.settings = settings
        self.on_batch = on_batch
        self.on_search = on_search
        self.current: ServingPair | None = None
        self.last_error: str = ""
        self._rollout_lock = asyncio.Lock()
        # Admin adds, updates and removes read rows and write them back: one at a time, or a
        # delete landing between an update's read and write would be undone (in this replica;
        # replicas behind a load balancer do not share it).
        self.admin_lock = asyncio.Lock()
        # Replaced pairs still draining, and the tasks retiring them (held so that they are
        # not garbage-collected mid-way).
        self._draining: list[ServingPair] = []
        self._retiring: set[asyncio.Task[None]] = set()
        # This replica's name in the leases it holds on a server's collections (see
        # VectorStore.hold): the index step's clean-up spares what a service answers from.
        self.lease_holder = lease_holder_name()

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[ServingPair]:
        """The current pair, held for the duration of one request."""
        from serving.errors import NotReady

        pair = self.current
        if pair is None:
            raise NotReady(self.last_error or "no model and collection are loaded yet")
        pair.in_flight += 1
        pair.drained.clear()
        try:
            yield pair
        finally:
            pair.in_flight -= 1
            if pair.in_flight == 0:
                pair.drained.set()

    async def load(self, collection: str | None = None) -> ServingPair:
        """Build the pair for ``collection`` (default: the alias target) and warm it up."""
        target = collection or await asyncio.to_thread(self.store.alias_target)
        if target is None:
            raise LookupError(
                f"alias {self.store.alias} points at no collection in {self.store.uri}: run "
                "`vitrine index` (or `vitrine demo`) first"
            )
        await self._hold(target)
        try:
            await asyncio.to_thread(self.store.load, target)
            return await self._build_pair(target)
        except BaseException:
            # A refused pair must not keep its collection open: on Milvus Lite an open
            # database is a file lock that would stop the index step from cleaning it up.
            if not self._in_use(target):
                await self._let_go(target)
            raise

    def _live_collections(self) -> set[str]:
        """The collections the current pair and the draining ones answer from."""
        return {pair.collection for pair in [self.current, *self._draining] if pair}

    def _in_use(self, collection: str) -> bool:
        return collection in self._live_collections()

    async def _hold(self, collection: str) -> None:
        """Lease ``collection`` (a server's; see VectorStore.hold). A lease that cannot be
        written costs only the clean-up's protection: logged, not raised."""
        try:
            await asyncio.to_thread(self.store.hold, collection, self.lease_holder)
        except StoreError as err:
            log.warning("could not lease %s against clean-ups: %s", collection, err)

    async def _let_go(self, collection: str) -> None:
        """End this replica's lease on ``collection`` and close its client."""
        with contextlib.suppress(StoreError):  # the lease expires by itself
            await asyncio.to_thread(self.store.release_hold, collection, self.lease_holder)
        await asyncio.to_thread(self.store.forget, collection)

    async def renew_leases(self) -> None:
        """Renew the leases on every collection a pair answers from (every LEASE_EVERY_S)."""
        for collection in self._live_collections():
            await self._hold(collection)

    async def _build_pair(self, target: str) -> ServingPair:
        """The model the collection records, loaded and warmed, paired with it."""
        metadata = await asyncio.to_thread(self.store.metadata, target)
        for key in ("canary", "drift"):  # absent in collections built before they existed
            metadata[key] = await asyncio.to_thread(self.store.recorded, target, key)
        metadata.update(await self._live_catalogue(target))
        package = metadata.get("model_package")
        if not package:
            raise LookupError(f"collection {target} does not record the model that built it")
        s = self.settings
        workers = embed_workers(s)
        # Loaded, warmed and run on the same threads (see MicroBatcher.executor).
        model_threads = ThreadPoolExecutor(workers, thread_name_prefix="embed")
        lone_thread: ThreadPoolExecutor | None = None
        loop = asyncio.get_running_loop()
        try:
            embedder = await loop.run_in_executor(
                model_threads, Embedder, package, s.device, torch_threads(s), s.torchscript
            )
            if embedder.dim != int(metadata.get("dim", embedder.dim)):
                raise LookupError(
                    f"model {package} embeds in {embedder.dim} dimensions but collection "
                    f"{target} holds {metadata.get('dim')}"
                )
            await loop.run_in_executor(model_threads, embedder.warm_up)
            if workers > 1 and torch_threads(s) == 1 and s.device.startswith("cpu"):
                # Lone requests' forwards on a thread of their own (see MicroBatcher). Only at
                # one torch thread, where a forward starts no OpenMP team of its own.
                lone_thread = ThreadPoolExecutor(1, thread_name_prefix="embed-lone")
                await loop.run_in_executor(lone_thread, embedder.warm_up, (1,))
        except BaseException:
            model_threads.shutdown(wait=False)
            if lone_thread is not None:
                lone_thread.shutdown(wait=False)
            raise
        batcher = MicroBatcher(
            embedder.embed_prepared,
            s.max_batch,
            s.max_wait_ms,
            on_batch=self.on_batch,
            workers=workers,
            executor=model_threads,
            lone_executor=lone_thread,
        )
        return ServingPair(
            embedder=embedder,
            batcher=batcher,
            searcher=SearchBatcher(self.store.search, s.max_batch, on_call=self.on_search),
            cache=EmbeddingCache(s.cache_size),
            collection=target,
            spec=spec_from_dict(metadata.get("index", {"index_type": "", "metric_type": "IP"})),
            metadata=metadata,
            drift=DriftMonitor(metadata.get("drift")),
        )

    async def rollout(
        self, collection: str | None = None
    ) -> tuple[ServingPair, ServingPair | None]:
        """Load the new pair, swap it in, drain and close the old one.

        Raises whatever loading raises; the old pair then keeps serving untouched.
        """
        async with self._rollout_lock:
            new = await self.load(collection)
            try:
                # Admin changes made while the model loaded went into the collection but not
                # into what the new pair read of it before: read again, with them held off
                # until the swap (they take the admin lock), so none falls in between.
                async with self.admin_lock:
                    await self._reread_catalogue(new)
                    old, self.current = self.current, new
            except BaseException:  # (Milvus went away meanwhile): the old pair goes on
                await self._close_pair(new)
                if not self._in_use(new.collection):
                    await self._let_go(new.collection)
                raise
            self.last_error = ""
            if old is not None:
                self._draining.append(old)
            log.info("serving %s on %s", new.model_version, new.collection)
        if old is not None:
            task = asyncio.get_running_loop().create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return new, old

    async def _reread_catalogue(self, pair: ServingPair) -> None:
        """The pair's row count and categories as the collection has them now."""
        rows = await asyncio.to_thread(self.store.count, pair.collection)
        live = await self._live_catalogue(pair.collection)
        pair.metadata = {**pair.metadata, "rows": rows, **live}

    async def _live_catalogue(self, collection: str) -> dict[str, Any]:
        """The categories admin changes recorded since the build (``{}`` if none)."""
        live = await asyncio.to_thread(self.store.recorded, collection, LIVE_METADATA)
        return {"categories": live["categories"]} if "categories" in live else {}

    async def _retire(self, old: ServingPair) -> None:
        if old.in_flight:
            await old.drained.wait()
        await self._close_pair(old)
        # Release the collection's client only when no pair answers from it and no rollout is
        # loading it: after A -> B -> A, the first A's retirement must not close the client
        # the second A uses.
        async with self._rollout_lock:
            self._draining = [pair for pair in self._draining if pair is not old]
            if not self._in_use(old.collection):
                await self._let_go(old.collection)

    @staticmethod
    async def _close_pair(pair: ServingPair) -> None:
        """Stop the pair's model threads and wait for its searches: what a request that gave
        up left running (a lone job, a search call) still uses the pair's collection."""
        await pair.batcher.close()
        await pair.searcher.drain()

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for pair in [self.current, *self._draining]:
            if pair is not None:
                await self._close_pair(pair)
        for collection in self._live_collections():
            with contextlib.suppress(StoreError):
                await asyncio.to_thread(self.store.release_hold, collection, self.lease_holder)
        await asyncio.to_thread(self.store.close)
