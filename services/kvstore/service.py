"""The KVStore gRPC service over a KVStore: request checks that need the wire format, status
codes for refusals, and the Events stream. Store operations run on worker threads (they take the
store's lock and may touch the disk); the event loop only moves messages."""
from __future__ import annotations

import asyncio

import grpc

from tandem.kvstore.events import FellBehind
from tandem.kvstore.store import KVStore, StoreError
from tandem.proto import kvstore_pb2, kvstore_pb2_grpc


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, store: KVStore) -> None:
        self.store = store

    async def Put(self, request: kvstore_pb2.PutRequest, context: grpc.aio.ServicerContext) -> kvstore_pb2.PutReply:
        key = request.key
        # the namespace is the writer's layout: a block filed under another layout's hash would be
        # handed to workers whose KV it does not fit
        if request.HasField("layout") and request.layout.compat_hash != key.compat_hash:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"layout compat_hash {request.layout.compat_hash!r} != key compat_hash "
                                f"{key.compat_hash!r}: a block is stored under its own layout's hash")
        try:
            existed = await asyncio.to_thread(self.store.put, key.compat_hash, key.block_hash, request.payload,
                                              request.crc32)
        except StoreError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        return kvstore_pb2.PutReply(existed=existed)

    async def Get(self, request: kvstore_pb2.GetRequest, context: grpc.aio.ServicerContext) -> kvstore_pb2.GetReply:
        try:
            found = await asyncio.to_thread(self.store.get, request.key.compat_hash, request.key.block_hash)
        except StoreError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        if found is None:
            return kvstore_pb2.GetReply(found=False)
        payload, crc, tier = found
        return kvstore_pb2.GetReply(found=True, payload=payload, crc32=crc, tier=tier)

    async def Exists(self, request: kvstore_pb2.ExistsRequest,
                     context: grpc.aio.ServicerContext) -> kvstore_pb2.ExistsReply:
        try:
            present = await asyncio.to_thread(self.store.exists, request.compat_hash, list(request.block_hashes))
        except StoreError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        prefix = next((i for i, p in enumerate(present) if not p), len(present))
        return kvstore_pb2.ExistsReply(present=present, prefix_blocks=prefix)

    async def Events(self, request: kvstore_pb2.EventsRequest, context: grpc.aio.ServicerContext):
        loop = asyncio.get_running_loop()
        try:
            sub = await asyncio.to_thread(self.store.subscribe, request.compat_hash, request.snapshot, loop)
        except StoreError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        try:
            while (event := await sub.next()) is not None:
                kind, compat_hash, hashes = event
                yield kvstore_pb2.StoreEvent(kind=kind, compat_hash=compat_hash, block_hashes=hashes)
        except FellBehind as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{exc}; resubscribe with snapshot=true")
        finally:  # the client went away, the store closed, or the backlog overflowed
            self.store.events.unsubscribe(sub)
