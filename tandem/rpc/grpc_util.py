"""gRPC settings every Tandem service uses: bounded messages, keepalive pings that find a peer
which stopped answering, no port sharing, one channel per peer address."""
from __future__ import annotations

import grpc

MAX_MESSAGE_BYTES = 64 << 20  # KV chunks are bounded far below this (1 MiB by default)

_COMMON = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
CHANNEL_OPTIONS = _COMMON + [("grpc.enable_retries", 0)]
SERVER_OPTIONS = _COMMON + [
    ("grpc.so_reuseport", 0),  # two servers must never share a port silently
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
]


class ChannelPool:
    """One insecure aio channel per address, created on first use, closed together."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return channel

    async def drop(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close(grace=None)

    async def close(self) -> None:
        for address in list(self._channels):
            await self.drop(address)


class SyncChannelPool:
    """One blocking channel per address, for work that runs on threads of its own (KV sends)."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.Channel] = {}

    def get(self, address: str) -> grpc.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        return channel

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


def make_server() -> grpc.aio.Server:
    return grpc.aio.server(options=SERVER_OPTIONS)


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Bind host:port (port 0: any free one); the port bound. A taken port is a clear error."""
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise OSError(f"cannot bind gRPC server to {host}:{port}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port} (in use?)")
    return bound


def keep_bulk_buffers_mapped() -> bool:
    """Let glibc reuse freed megabyte buffers instead of unmapping them (KV workers call this once).

    By default glibc serves an allocation of a megabyte or more with a fresh mmap and gives the
    memory back when it is freed, so every KV chunk a transfer copies (gRPC's buffers, the encoded
    and decoded bytes) page-faults its memory in again: on these VMs that made the copies run at
    about 2 GB/s instead of 10, and a 46 MB loopback transfer take 100 ms instead of 70. The cost is
    that up to TRIM bytes of freed heap stay with the process. False where glibc is not the libc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    trim, top_pad, mmap_threshold = -1, -2, -3  # M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD
    return all(mallopt(option, value) == 1 for option, value in (
        (mmap_threshold, 32 << 20), (trim, 256 << 20), (top_pad, 64 << 20)))
