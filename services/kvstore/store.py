"""The block store: put, get and exists by (compat_hash, block_hash) over a DRAM tier and an
optional disk tier, with the counters its metrics export and the events routers consume.

Every operation runs under one lock (callers run them on worker threads, so disk I/O never
blocks an event loop). The tiers are exclusive: a block is in DRAM or on disk, never both, so
each byte counts against exactly one capacity.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tandem.kvstore.events import REMOVED, STORED, EventHub, Subscription
from tandem.kvstore.sizes import format_bytes
from tandem.kvstore.tiers import COMPAT_HASH, Block, CorruptBlock, DiskTier, DramTier, Key

log = logging.getLogger("tandem.kvstore")

MAX_BLOCK_BYTES = 32 << 20  # far under gRPC's 64 MiB messages: a Get reply always fits
MAX_EXISTS_HASHES = 65536  # 512 KiB of hashes: a 1M-token prompt at 16 tokens a block


class StoreError(Exception):
    """A request the store refuses; `code` is the gRPC status name the service answers with,
    `outcome` the label its put counter gets."""
    code, outcome = "INVALID_ARGUMENT", "invalid"


class ChecksumMismatch(StoreError):
    outcome = "checksum_mismatch"


class BlockTooLarge(StoreError):
    code, outcome = "RESOURCE_EXHAUSTED", "too_large"


@dataclass
class StoreStats:
    """A snapshot for /metrics. Tier maps are keyed "dram" and, with a disk tier, "disk"."""
    capacity_bytes: dict[str, int]
    used_bytes: dict[str, int]
    blocks: dict[str, int]
    hits: dict[str, int]
    evictions: dict[str, int]
    misses: int
    corrupt_reads: int
    puts: dict[str, int] = field(default_factory=dict)  # by outcome
    subscribers: int = 0


class KVStore:
    def __init__(self, capacity_bytes: int, disk_dir: str | Path | None = None, disk_capacity_bytes: int = 0,
                 max_block_bytes: int = MAX_BLOCK_BYTES, max_pending_events: int = 1024) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be over 0, got {capacity_bytes}")
        if disk_dir is not None and disk_capacity_bytes <= 0:
            raise ValueError("a disk tier needs disk_capacity_bytes over 0")
        self.max_block_bytes = max_block_bytes
        self.dram = DramTier(capacity_bytes)
        self.disk = DiskTier(Path(disk_dir), disk_capacity_bytes) if disk_dir is not None else None
        self.events = EventHub(max_pending_events)
        self.closed = False
        self._lock = threading.Lock()
        self._hits: Counter[str] = Counter()
        self._evictions: Counter[str] = Counter()
        self._puts: Counter[str] = Counter()
        self._misses = self._corrupt = 0

    # --- operations -------------------------------------------------------------------------

    def put(self, compat_hash: str, block_hash: int, payload: bytes, crc32: int) -> bool:
        """Store a block as the most recent; True if it was stored already (it is replaced)."""
        try:
            _check_key(compat_hash, block_hash)
            if not payload:
                raise StoreError("empty payload: a block has KV bytes")
            if len(payload) > self.max_block_bytes:
                raise BlockTooLarge(f"block of {format_bytes(len(payload))} exceeds the largest block the store "
                                    f"takes, {format_bytes(self.max_block_bytes)}")
            if len(payload) > self.dram.capacity:
                raise BlockTooLarge(f"block of {format_bytes(len(payload))} exceeds the store's DRAM capacity "
                                    f"of {format_bytes(self.dram.capacity)}")
            actual = zlib.crc32(payload)  # outside the lock: the slowest part of a put
            if actual != crc32:
                raise ChecksumMismatch(f"checksum mismatch: crc32 of the payload is {actual:#010x}, the request "
                                       f"says {crc32:#010x}")
        except StoreError as exc:
            with self._lock:  # counters are read by scrapes on other threads
                self._puts[exc.outcome] += 1
            raise
        key = (compat_hash, block_hash)
        with self._lock:
            existed = self.dram.pop(key) is not None
            if self.disk is not None:
                existed = self.disk.pop(key) or existed
            removed = self._into_dram(key, (payload, crc32))
            self._puts["replaced" if existed else "stored"] += 1
            if not existed:
                self.events.publish(STORED, [key])
            self.events.publish(REMOVED, removed)
        return existed

    def get(self, compat_hash: str, block_hash: int) -> tuple[bytes, int, str] | None:
        """(payload, crc32, tier it came from), or None. A disk hit moves the block to DRAM."""
        _check_key(compat_hash, block_hash)
        key = (compat_hash, block_hash)
        with self._lock:
            block = self.dram.get(key)
            if block is not None:
                self._hits["dram"] += 1
                return block[0], block[1], "dram"
            if self.disk is None or key not in self.disk:
                self._misses += 1
                return None
            try:
                block = self.disk.read(key)
            except CorruptBlock as exc:
                log.warning("kvstore: dropped a corrupt block: %s", exc)
                self._corrupt += 1
                self._misses += 1
                self.events.publish(REMOVED, [key])
                return None
            self._hits["disk"] += 1
            if len(block[0]) <= self.dram.capacity:  # promote: it is hot again
                self.disk.pop(key)
                self.events.publish(REMOVED, self._into_dram(key, block))
            else:  # adopted from a run with more DRAM: serve it from disk
                self.disk.touch(key)
            return block[0], block[1], "disk"

    def exists(self, compat_hash: str, block_hashes: list[int]) -> list[bool]:
        """Which hashes are held, in any tier. Recency is left alone (see ExistsRequest)."""
        if len(block_hashes) > MAX_EXISTS_HASHES:
            raise StoreError(f"{len(block_hashes)} hashes in one exists call; at most {MAX_EXISTS_HASHES}")
        _check_key(compat_hash, 0)
        with self._lock:
            return [(compat_hash, h) in self.dram or (self.disk is not None and (compat_hash, h) in self.disk)
                    for h in block_hashes]

    def subscribe(self, compat_hash: str, snapshot: bool, loop: asyncio.AbstractEventLoop) -> Subscription:
        """A subscription to events of `compat_hash` ('' for all), first (with `snapshot`) one STORED
        event per namespace listing what is held now. Under the lock, so no event is missed or doubled."""
        if compat_hash:
            _check_key(compat_hash, 0)
        with self._lock:
            sub = self.events.subscribe(compat_hash, loop)
            if snapshot:
                held: dict[str, list[int]] = {}
                for ns, h in [*(self.disk.keys() if self.disk is not None else []), *self.dram.keys()]:
                    if sub.wants(ns):
                        held.setdefault(ns, []).append(h)
                for ns, hashes in held.items():
                    self.events.send(sub, STORED, ns, hashes)
        return sub

    def close(self) -> None:
        """Stop: health turns 503 and every event stream ends."""
        self.closed = True
        self.events.close()

    def stats(self) -> StoreStats:
        with self._lock:
            tiers = {"dram": self.dram, **({"disk": self.disk} if self.disk is not None else {})}
            return StoreStats(capacity_bytes={n: t.capacity for n, t in tiers.items()},
                              used_bytes={n: t.used for n, t in tiers.items()},
                              blocks={n: len(t) for n, t in tiers.items()},
                              hits={n: self._hits[n] for n in tiers}, evictions={n: self._evictions[n] for n in tiers},
                              misses=self._misses, corrupt_reads=self._corrupt, puts=dict(self._puts),
                              subscribers=len(self.events))

    # --- internals ------------------------------------------------------------------------

    def _into_dram(self, key: Key, block: Block) -> list[Key]:
        """Insert into DRAM, spilling its least recent blocks to disk; the keys no tier holds now."""
        removed = []
        for victim, victim_block in self.dram.put(key, block):
            self._evictions["dram"] += 1
            if self.disk is None:
                removed.append(victim)
                continue
            dropped = self.disk.put(victim, victim_block)
            self._evictions["disk"] += sum(1 for k in dropped if k != victim)
            removed += dropped
        return removed


def _check_key(compat_hash: str, block_hash: int) -> None:
    if not COMPAT_HASH.fullmatch(compat_hash or ""):
        raise StoreError(f"compat_hash {compat_hash!r} must be 1 to 64 of [A-Za-z0-9_-] (the layout's "
                         f"compatibility hash)")
    if not 0 <= block_hash < 1 << 64:
        raise StoreError(f"block_hash {block_hash} is not a 64-bit unsigned hash")
