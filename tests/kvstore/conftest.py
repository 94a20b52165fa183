"""A real KV store server on 127.0.0.1 (its own event loop on a thread, as in the process) and a
blocking gRPC client, plus helpers that build requests."""
from __future__ import annotations

import asyncio
import threading
import zlib
from typing import Callable, Iterator

import grpc
import pytest

from tandem.kvstore.main import KVStoreServer
from tandem.kvstore.store import KVStore
from tandem.proto import kvstore_pb2 as pb
from tandem.proto import kvstore_pb2_grpc

NS = "compat0a"  # a compat_hash namespace


class Running:
    """A started KVStoreServer and a stub bound to it."""

    def __init__(self, store: KVStore, port: int = 0) -> None:
        self.store = store
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = KVStoreServer(store, port=port)
        self._call(self.server.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = kvstore_pb2_grpc.KVStoreStub(self.channel)
        self.http = f"http://127.0.0.1:{self.server.http_port}"

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def put(self, block_hash: int, payload: bytes, ns: str = NS, **extra) -> pb.PutReply:
        return self.stub.Put(put_request(block_hash, payload, ns, **extra), timeout=5)

    def get(self, block_hash: int, ns: str = NS) -> pb.GetReply:
        return self.stub.Get(pb.GetRequest(key=pb.BlockKey(compat_hash=ns, block_hash=block_hash)), timeout=5)

    def exists(self, hashes: list[int], ns: str = NS) -> pb.ExistsReply:
        return self.stub.Exists(pb.ExistsRequest(compat_hash=ns, block_hashes=hashes), timeout=5)

    def close(self) -> None:
        """Stop the server (again: nothing)."""
        if self.loop.is_closed():
            return
        self.channel.close()
        self._call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def put_request(block_hash: int, payload: bytes, ns: str = NS, crc32: int | None = None, **extra) -> pb.PutRequest:
    return pb.PutRequest(key=pb.BlockKey(compat_hash=ns, block_hash=block_hash), payload=payload,
                         crc32=zlib.crc32(payload) if crc32 is None else crc32, **extra)


def block(i: int, size: int = 1000) -> bytes:
    """A payload that differs per block (so a mixed-up answer shows)."""
    return bytes([i % 256]) * (size - 8) + i.to_bytes(8, "little")


@pytest.fixture
def kvstore() -> Iterator[Callable[..., Running]]:
    """kvstore(port=0, **KVStore kwargs) -> a running server; every one started is stopped after the test."""
    started: list[Running] = []

    def start(port: int = 0, **kwargs) -> Running:
        kwargs.setdefault("capacity_bytes", 1 << 20)
        started.append(Running(KVStore(**kwargs), port))
        return started[-1]

    yield start
    for running in started:
        running.close()
