"""KV staging over NIXL: the shm transport's protocol (chunks at fixed places in a lease's staging area, the
gRPC stream carrying only their control), with the area in decode's memory registered with a NIXL agent, so
prefill writes into it from any host NIXL reaches (UCX: RDMA, TCP, or shared memory on one host).

- Consumer side (decode): one `NixlStagingPool` per worker registers one buffer once (registration and
  the agent's metadata are per buffer, and a peer loads the metadata once) and hands each lease a range of
  it. An area's `path` is its address for the ticket: "nixl:<the agent's metadata, base64>:<address>".
  `view` exposes staged bytes in place, as shm's areas do, for decode to copy into its blocks and check.
- Producer side (prefill): `NixlRemoteArea.attach` reads a ticket's address, loads that agent's metadata
  into this process's agent (once per peer) and `write`s a chunk by copying it into a registered send
  buffer and WRITE-ing it to its place, waiting for the write to complete before the stream says so.

NIXL's UCX backend reads its environment (UCX_TLS, UCX_NET_DEVICES) when an agent is made. Prefill's agent
has no progress thread: its writes are polled to completion, which on a few cores is two to three times
faster (bench/nixl_probe.py); decode's, the target, needs one, since nothing there polls.
"""
from __future__ import annotations

import base64
import importlib.util
import itertools
import os
import threading

import numpy as np
import torch

PREFIX = "nixl:"
SEND_BUFFER_BYTES = 80 << 20  # one staged write at most (the sender merges a layer's chunks up to 64 MiB)


def available() -> bool:
    """Whether NIXL is installed, without importing it: its UCX libraries hook the process's memory calls
    when loaded, which no process that does not transfer over NIXL should carry."""
    return importlib.util.find_spec("nixl") is not None


def _agent(name: str, progress_thread: bool):
    from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

    # several transfer threads share one agent: its own locking
    return nixl_agent(name, nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"],
                                              sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT))


def _descs(address: int, length: int) -> np.ndarray:
    return np.array([[address, length, 0]], dtype=np.uint64)


class NixlArea:
    """A lease's range of the pool's registered buffer (StagingArea's consumer half)."""

    def __init__(self, pool: "NixlStagingPool", start: int, size: int) -> None:
        self.pool, self.start, self.size = pool, start, size
        self.path = f"{pool.address}:{pool.base + start}"

    def view(self, offset: int, length: int) -> memoryview:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"[{offset}, {offset + length}) is outside a staging area of {self.size} B")
        return self.pool.bytes[self.start + offset:self.start + offset + length]

    def close(self) -> None:
        self.pool.give_back(self)


class NixlStagingPool:
    """Decode's registered staging buffer, in ranges per lease (StagingPool's interface: take, give_back,
    close). A lease that finds no free range gets no staging area: its transfer goes over gRPC."""

    def __init__(self, size: int) -> None:
        # the target of every write: nothing here polls, so its agent makes progress on a thread of its own
        self.agent = _agent(f"tandem-decode-{os.getpid()}-{next(_ids)}", progress_thread=True)
        self.buffer = torch.zeros(size, dtype=torch.uint8)
        self.registration = self.agent.register_memory(self.buffer)
        self.base = self.buffer.data_ptr()
        self.bytes = memoryview(self.buffer.numpy())
        self.address = PREFIX + base64.b64encode(self.agent.get_agent_metadata()).decode()
        self.free = [(0, size)]  # (start, size), by start
        self._lock = threading.Lock()

    def take(self, name: str, size: int) -> NixlArea:
        with self._lock:
            for i, (start, room) in enumerate(self.free):
                if room >= size:
                    self.free[i:i + 1] = [(start + size, room - size)] if room > size else []
                    return NixlArea(self, start, size)
        raise OSError(f"no {size} B free in the NIXL staging buffer")

    def give_back(self, area: NixlArea) -> None:
        with self._lock:
            self.free.append((area.start, area.size))
            self.free.sort()
            merged = [self.free[0]]
            for start, size in self.free[1:]:
                last_start, last_size = merged[-1]
                if last_start + last_size == start:
                    merged[-1] = (last_start, last_size + size)
                else:
                    merged.append((start, size))
            self.free = merged

    def close(self) -> None:
        self.agent.deregister_memory(self.registration)


_ids = itertools.count()
_sender: "_Sender | None" = None
_sender_lock = threading.Lock()


class _Sender:
    """Prefill's agent, its registered send buffer, and the peers whose metadata it loaded."""

    def __init__(self) -> None:
        self.agent = _agent(f"tandem-prefill-{os.getpid()}", progress_thread=False)  # its writes are polled
        self.buffer = torch.zeros(SEND_BUFFER_BYTES, dtype=torch.uint8)
        self.registration = self.agent.register_memory(self.buffer)
        self.peers: dict[str, str] = {}  # metadata (base64) -> the peer's agent name
        self.lock = threading.Lock()  # one write at a time through the send buffer

    def peer(self, metadata: str) -> str:
        with self.lock:
            if metadata not in self.peers:
                name = self.agent.add_remote_agent(base64.b64decode(metadata))
                self.peers[metadata] = name.decode() if isinstance(name, bytes) else name
            return self.peers[metadata]


class NixlRemoteArea:
    """Prefill's handle on a lease's area in decode's memory (StagingArea's producer half: write, close)."""

    def __init__(self, peer: str, address: int, size: int) -> None:
        self.peer, self.address, self.size = peer, address, size

    @classmethod
    def attach(cls, path: str, size: int) -> "NixlRemoteArea | None":
        """The area a ticket names, or None (not a NIXL address, or NIXL is not installed here)."""
        global _sender
        if not path.startswith(PREFIX) or size <= 0 or not available():
            return None
        metadata, _, address = path[len(PREFIX):].rpartition(":")
        with _sender_lock:
            _sender = _sender or _Sender()
        return cls(_sender.peer(metadata), int(address), size)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        n = len(data)
        if offset < 0 or offset + n > self.size or n > SEND_BUFFER_BYTES:
            raise ValueError(f"[{offset}, {offset + n}) is outside a staging area of {self.size} B (or over "
                             f"{SEND_BUFFER_BYTES} B at once)")
        s = _sender
        with s.lock:
            s.buffer[:n].copy_(torch.frombuffer(data, dtype=torch.uint8))
            local = s.agent.get_xfer_descs(_descs(s.buffer.data_ptr(), n), "DRAM")
            remote = s.agent.get_xfer_descs(_descs(self.address + offset, n), "DRAM")
            handle = s.agent.initialize_xfer("WRITE", local, remote, self.peer)
            try:
                state = s.agent.transfer(handle)
                while state == "PROC":
                    state = s.agent.check_xfer_state(handle)
                if state != "DONE":
                    raise OSError(f"a NIXL write to {self.peer} failed ({state})")
            finally:
                s.agent.release_xfer_handle(handle)

    def close(self) -> None:
        pass
