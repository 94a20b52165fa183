"""The store's change feed (blocks stored, blocks removed) fanned out to Events streams.

The store publishes while it holds its lock, from whatever thread runs the operation; each
subscriber gets the events of its namespace (or all) on its own asyncio loop, in order. A
subscriber's backlog is bounded: one that falls behind is told so once (FellBehind) and must
resubscribe with a snapshot, as with the engine's prefix-cache event log. A store never blocks
on a slow router.
"""
from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from typing import Iterable

STORED, REMOVED = 0, 1  # StoreEvent.Kind's values
MAX_HASHES_PER_EVENT = 4096  # bounds each StoreEvent message (8 bytes a hash)
Event = tuple[int, str, list[int]]  # (kind, compat_hash, block hashes)

_OVERFLOW, _CLOSED = object(), object()


class FellBehind(Exception):
    """The subscriber's backlog overflowed; events were dropped."""


class Subscription:
    """One Events stream: its namespace filter ('' for every namespace) and its queue."""

    def __init__(self, compat_hash: str, loop: asyncio.AbstractEventLoop, max_pending: int) -> None:
        self.compat_hash, self.loop, self.max_pending = compat_hash, loop, max_pending
        self._queue: asyncio.Queue = asyncio.Queue()
        self._overflowed = False

    def wants(self, compat_hash: str) -> bool:
        return not self.compat_hash or self.compat_hash == compat_hash

    def _push(self, item: object) -> None:  # on the subscriber's loop
        if item is _CLOSED:
            self._queue.put_nowait(item)
            return
        if self._overflowed:  # told once; the stream ends on it
            return
        if self._queue.qsize() >= self.max_pending:
            self._overflowed = True
            item = _OVERFLOW
        self._queue.put_nowait(item)

    async def next(self) -> Event | None:
        """The next event; None once the hub closed. Raises FellBehind after an overflow."""
        item = await self._queue.get()
        if item is _OVERFLOW:
            raise FellBehind(f"more than {self.max_pending} events waited for this subscriber")
        return None if item is _CLOSED else item  # type: ignore[return-value]


class EventHub:
    def __init__(self, max_pending: int = 1024) -> None:
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []

    def __len__(self) -> int:
        return len(self._subs)

    def subscribe(self, compat_hash: str, loop: asyncio.AbstractEventLoop) -> Subscription:
        sub = Subscription(compat_hash, loop, self.max_pending)
        with self._lock:
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def publish(self, kind: int, keys: Iterable[tuple[str, int]]) -> None:
        """Events for `keys`, one message per namespace and at most MAX_HASHES_PER_EVENT hashes."""
        if not self._subs:  # the common case: nobody listens, nothing to build
            return
        by_namespace: dict[str, list[int]] = defaultdict(list)
        for compat_hash, block_hash in keys:
            by_namespace[compat_hash].append(block_hash)
        with self._lock:
            subs = list(self._subs)
        for compat_hash, hashes in by_namespace.items():
            for sub in subs:
                if sub.wants(compat_hash):
                    self.send(sub, kind, compat_hash, hashes)

    def send(self, sub: Subscription, kind: int, compat_hash: str, hashes: list[int]) -> None:
        for start in range(0, len(hashes), MAX_HASHES_PER_EVENT):
            self._deliver(sub, (kind, compat_hash, hashes[start:start + MAX_HASHES_PER_EVENT]))

    def close(self) -> None:
        """End every stream normally (shutdown): server.stop need not wait out its grace."""
        with self._lock:
            subs, self._subs = self._subs, []
        for sub in subs:
            self._deliver(sub, _CLOSED)

    def _deliver(self, sub: Subscription, item: object) -> None:
        try:
            sub.loop.call_soon_threadsafe(sub._push, item)
        except RuntimeError:  # its loop is closed: the stream is gone
            self.unsubscribe(sub)
