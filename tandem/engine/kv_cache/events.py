"""The prefix cache's change log: block hashes stored and removed, numbered, for routers.

The block pool reports every hash it publishes (stored) and every cached block it evicts
(removed); the worker ships the log in its heartbeats, and the router keeps a per-worker set of
cached hashes to score prefix overlap. The log is bounded: a reader that fell behind the oldest
entry kept gets `None` and must ask for a snapshot (every hash cached now) instead.
"""
from __future__ import annotations

import collections
import threading

STORED, REMOVED = 0, 1


class KVEventLog:
    def __init__(self, max_events: int = 200_000) -> None:
        self._lock = threading.Lock()
        self._events: collections.deque[tuple[int, int]] = collections.deque()  # (kind, hash)
        self._first = 0  # sequence number of _events[0]
        self.max_events = max_events

    @property
    def next_seq(self) -> int:
        return self._first + len(self._events)

    def stored(self, block_hash: int) -> None:
        self._add(STORED, block_hash)

    def removed(self, block_hash: int) -> None:
        self._add(REMOVED, block_hash)

    def _add(self, kind: int, block_hash: int) -> None:
        with self._lock:
            self._events.append((kind, block_hash))
            if len(self._events) > self.max_events:
                self._events.popleft()
                self._first += 1

    def since(self, seq: int) -> tuple[int, list[tuple[int, int]]] | None:
        """(first sequence number, events from `seq` on), or None if some were dropped already."""
        with self._lock:
            if seq < self._first:
                return None
            return max(seq, self._first), list(self._events)[seq - self._first:] if seq < self.next_seq else []

    def drop_before(self, seq: int) -> None:
        """The reader has everything before `seq`."""
        with self._lock:
            while self._events and self._first < seq:
                self._events.popleft()
                self._first += 1
