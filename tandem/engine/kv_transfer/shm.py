"""Same-host KV staging in shared memory: a file under /dev/shm per lease, next to the gRPC stream
that keeps the control (open, per-chunk offset + checksum, acks, close).

- Consumer side (decode, worker side of the lease): `StagingArea.create` makes the file when a lease
  is reserved, sized for the lease's bytes (every wanted token of every layer, in (layer, token)
  order, so a chunk's place is fixed and a retransmit rewrites it); `read` copies a chunk's bytes
  out (the checksum is checked on that copy, so a writer cannot change bytes between check and use) and
  `close` unmaps and unlinks it when the lease ends (complete, expired, released, worker stopping).
  `sweep` removes files that a killed worker left. Prefill never touches decode's KV cache tensors:
  decode copies verified staged bytes into its blocks only while the lease is alive.
- Producer side (prefill, a transport's sending thread): `StagingArea.attach` maps the file the
  ticket names, or returns None (another host, no such file, wrong size): the transfer then sends
  its bytes over gRPC. `write` puts a chunk's bytes at its offset.
"""
from __future__ import annotations

import mmap
import os
import socket
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "tandem-kv-"
MAX_LEASE_BYTES = 2 << 30  # a larger lease is not staged (its transfer goes over gRPC)


def host_id() -> str:
    """This machine's identity: hostname plus boot id (equal on the same host and boot only)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def usable() -> bool:
    """Whether this process can create staging files."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK | os.X_OK)


def offset(layer: int, token_start: int, skip_tokens: int, num_tokens: int, token_bytes: int) -> int:
    """Where the chunk starting at (layer, token_start) lies in a lease's staging area: (layer,
    token) order over the lease's wanted tokens [skip_tokens, num_tokens)."""
    return (layer * (num_tokens - skip_tokens) + token_start - skip_tokens) * token_bytes


class StagingArea:
    def __init__(self, path: str, size: int, mm: mmap.mmap, owner: bool) -> None:
        self.path, self.size, self._mm, self.owner = path, size, mm, owner

    @classmethod
    def create(cls, name: str, size: int) -> "StagingArea":
        """Consumer: a new file of `size` bytes (sparse: tmpfs pages are taken as chunks land)."""
        path = str(SHM_DIR / f"{PREFIX}{os.getpid()}-{name}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(path, size, mm, owner=True)

    @classmethod
    def attach(cls, path: str, size: int) -> "StagingArea | None":
        """Producer: map the consumer's file, or None when it cannot be (the caller uses gRPC)."""
        if not path or size <= 0 or not Path(path).name.startswith(PREFIX):
            return None
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size != size:
                return None
            return cls(path, size, mmap.mmap(fd, size), owner=False)
        except OSError:
            return None
        finally:
            os.close(fd)

    def _check(self, offset: int, length: int) -> None:
        if self._mm is None:
            raise ValueError(f"staging area {self.path} is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"[{offset}, {offset + length}) is outside staging area {self.path} of {self.size} B")

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self._mm[offset:offset + len(data)] = data

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return self._mm[offset:offset + length]

    def close(self) -> None:
        """Unmap; the owner (consumer) also unlinks the file. Idempotent."""
        mm, self._mm = self._mm, None
        if mm is not None:
            mm.close()
        if self.owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.owner = False


def staged_files(pid: int | None = None) -> list[Path]:
    """Staging files of `pid` (every process's when None)."""
    if not SHM_DIR.is_dir():
        return []
    return sorted(SHM_DIR.glob(f"{PREFIX}{pid}-*" if pid is not None else f"{PREFIX}*"))


def sweep() -> int:
    """Remove staging files whose creating process is gone (a killed worker's); how many."""
    removed = 0
    for path in staged_files():
        pid = path.name[len(PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (its own leases end its files)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed
