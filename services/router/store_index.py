"""What the prefix KV store holds, as the router knows it from the store's Events stream.

Lifecycle: `follow` subscribes with a snapshot (one STORED event per layout listing every block held), then
applies each STORED and REMOVED event as it comes. When the stream ends (the store restarted or closed, the
router fell behind and was cut off, the store is unreachable), everything known is dropped, so nothing
stale is claimed, and it subscribes again after `retry` seconds, snapshot first.

The router reads it for workers that load from the same store (their WorkerInfo.kv_store): a prompt
prefix the store holds is one such a worker loads instead of computing (plugins.RoutingRequest).
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from tandem.proto import kvstore_pb2, kvstore_pb2_grpc
from tandem.rpc.grpc_util import CHANNEL_OPTIONS

log = logging.getLogger("tandem.router")
EMPTY: frozenset[int] = frozenset()


class StoreIndex:
    def __init__(self, address: str) -> None:
        self.address = address
        self.blocks: dict[str, set[int]] = {}  # compat hash -> block hashes held
        self.resubscriptions = 0

    def held(self, compat_hash: str) -> set[int] | frozenset[int]:
        return self.blocks.get(compat_hash, EMPTY)

    def serves(self, kv_store: str) -> bool:
        """Whether a worker that loads from `kv_store` loads from this store."""
        return bool(kv_store) and kv_store == self.address

    def apply(self, event: kvstore_pb2.StoreEvent) -> None:
        if event.kind == kvstore_pb2.StoreEvent.STORED:
            self.blocks.setdefault(event.compat_hash, set()).update(event.block_hashes)
        else:
            held = self.blocks.get(event.compat_hash)
            if held is not None:
                held.difference_update(event.block_hashes)

    def __len__(self) -> int:
        return sum(len(held) for held in self.blocks.values())

    async def follow(self, retry: float = 1.0) -> None:
        """Keep the index current until cancelled."""
        quiet = False  # a store that stays unreachable is logged once, not every `retry`
        while True:
            channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            try:
                async for event in kvstore_pb2_grpc.KVStoreStub(channel).Events(kvstore_pb2.EventsRequest(snapshot=True)):
                    self.apply(event)
                    quiet = False
                log.warning("KV store %s closed its event stream; subscribing again", self.address)
            except grpc.aio.AioRpcError as exc:
                if not quiet:
                    log.warning("KV store %s events: %s: %s; subscribing again every %g s", self.address,
                                exc.code().name, exc.details(), retry)
                quiet = exc.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                self.blocks.clear()
                await channel.close()
            self.resubscriptions += 1
            await asyncio.sleep(retry)
