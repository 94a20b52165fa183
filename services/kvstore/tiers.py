"""The store's two tiers, each an LRU map with a hard limit in bytes. Neither is thread-safe: the
store serializes every call under its lock.

DRAM holds (payload, crc32) in memory. Disk holds one file per block, `DIR/COMPAT/HASH.kvb`: a
header (magic, version, CRC-32, payload length) then the payload, written to a temporary name and
renamed into place, so a reader never sees half a block under the real name.
"""
from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger("tandem.kvstore")

Key = tuple[str, int]  # (compat_hash, block_hash)
Block = tuple[bytes, int]  # (payload, crc32)

COMPAT_HASH = re.compile(r"[A-Za-z0-9_-]{1,64}")  # also a directory name: never a path


class DramTier:
    """Blocks in memory, least recently used first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._blocks: OrderedDict[Key, Block] = OrderedDict()

    def __contains__(self, key: Key) -> bool:
        return key in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self) -> list[Key]:
        """Least recently used first."""
        return list(self._blocks)

    def get(self, key: Key) -> Block | None:
        block = self._blocks.get(key)
        if block is not None:
            self._blocks.move_to_end(key)
        return block

    def pop(self, key: Key) -> Block | None:
        block = self._blocks.pop(key, None)
        if block is not None:
            self.used -= len(block[0])
        return block

    def put(self, key: Key, block: Block) -> list[tuple[Key, Block]]:
        """Insert `block` as the most recent; returns the blocks evicted to make room, oldest first.
        The caller guarantees that the block alone fits."""
        assert len(block[0]) <= self.capacity and key not in self._blocks
        self._blocks[key] = block
        self.used += len(block[0])
        evicted = []
        while self.used > self.capacity:
            old_key, old = self._blocks.popitem(last=False)
            self.used -= len(old[0])
            evicted.append((old_key, old))
        return evicted


class CorruptBlock(Exception):
    """A disk file that is not the block it claims to be (the file is gone already)."""


_HEADER = struct.Struct("<4sB3xIQ")  # magic, format version, crc32, payload length
_MAGIC, _VERSION, _SUFFIX = b"TKVB", 1, ".kvb"


class DiskTier:
    """Blocks in files under one directory, least recently used first. Files left by an earlier run
    are adopted (oldest modification first) and checked when read: a disk tier is a cache, so
    nothing is fsynced and a torn file is simply a corrupt block."""

    def __init__(self, directory: Path, capacity: int) -> None:
        self.directory, self.capacity = Path(directory), capacity
        self.used = 0
        self._sizes: OrderedDict[Key, int] = OrderedDict()  # file sizes, header included
        self.directory.mkdir(parents=True, exist_ok=True)
        self._adopt()

    def __contains__(self, key: Key) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def keys(self) -> list[Key]:
        return list(self._sizes)

    def path(self, key: Key) -> Path:
        return self.directory / key[0] / f"{key[1]:016x}{_SUFFIX}"

    def fits(self, payload_bytes: int) -> bool:
        return _HEADER.size + payload_bytes <= self.capacity

    def put(self, key: Key, block: Block) -> list[Key]:
        """Write `block` as the most recent; returns the keys evicted for room, with `key` itself last
        when it could not be kept (larger than the tier, or the write failed: a full or broken disk
        loses the block, never the store)."""
        payload, crc = block
        self.pop(key)
        if not self.fits(len(payload)):
            return [key]
        size = _HEADER.size + len(payload)
        evicted = []
        while self._sizes and self.used + size > self.capacity:
            evicted.append(self._evict_oldest())
        path = self.path(key)
        tmp = path.with_suffix(".tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(_MAGIC, _VERSION, crc, len(payload)))
                f.write(payload)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("kvstore: cannot write %s, block dropped: %s", path, exc)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # the same broken disk (read-only, a file where the folder goes): nothing to clean
                pass
            return [*evicted, key]
        self._sizes[key] = size
        self.used += size
        return evicted

    def read(self, key: Key) -> Block:
        """The block, its checksum verified (recency is the caller's: a read promotes it). Raises
        CorruptBlock, after dropping the file, when the file is not intact."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.pop(key)
            raise CorruptBlock(f"{path}: {exc}") from None
        problem = _check(data)
        if problem:
            self.pop(key)
            raise CorruptBlock(f"{path}: {problem}")
        _, _, crc, _ = _HEADER.unpack_from(data)
        return data[_HEADER.size:], crc

    def touch(self, key: Key) -> None:
        self._sizes.move_to_end(key)

    def pop(self, key: Key) -> bool:
        size = self._sizes.pop(key, None)
        if size is None:
            return False
        self.used -= size
        self._remove(key)
        return True

    def _remove(self, key: Key) -> None:
        """Delete the file (the caller did the accounting)."""
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("kvstore: cannot delete %s: %s", self.path(key), exc)

    def _evict_oldest(self) -> Key:
        old, size = self._sizes.popitem(last=False)
        self.used -= size
        self._remove(old)
        return old

    def _adopt(self) -> None:
        found = []
        for path in self.directory.glob("*/*"):
            if path.suffix == ".tmp":  # a write that never finished
                path.unlink(missing_ok=True)
                continue
            name = path.name.removesuffix(_SUFFIX)
            if path.suffix != _SUFFIX or not COMPAT_HASH.fullmatch(path.parent.name) or not _is_hex16(name):
                continue
            stat = path.stat()
            found.append((stat.st_mtime_ns, (path.parent.name, int(name, 16)), stat.st_size))
        for _, key, size in sorted(found):
            self._sizes[key] = size
            self.used += size
        while self.used > self.capacity:  # a smaller capacity than last time
            self._evict_oldest()
        if found:
            log.info("kvstore: adopted %d blocks (%d bytes) from %s", len(self._sizes), self.used, self.directory)


def _is_hex16(name: str) -> bool:
    return len(name) == 16 and all(c in "0123456789abcdef" for c in name)


def _check(data: bytes) -> str | None:
    """Why `data` is not an intact block file, or None."""
    if len(data) < _HEADER.size:
        return f"{len(data)} bytes, shorter than the header"
    magic, version, crc, length = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        return f"not a block file (magic {magic!r}, version {version})"
    if len(data) != _HEADER.size + length:
        return f"payload of {len(data) - _HEADER.size} bytes, header says {length}"
    actual = zlib.crc32(memoryview(data)[_HEADER.size:])
    if actual != crc:
        return f"checksum mismatch: crc32 {actual:#010x}, header says {crc:#010x}"
    return None
