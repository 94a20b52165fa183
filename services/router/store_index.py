"""What the prefix KV store holds, as the router knows it from the store's Events streams.

Lifecycle of one replica's stream: subscribe with a snapshot (one STORED event per layout listing every
block held), then apply each STORED and REMOVED event as it comes. When the stream ends (the replica
restarted or closed, the router fell behind and was cut off, the replica is unreachable), everything known
of that replica is dropped, so nothing stale is claimed, and it subscribes again after `retry` seconds,
snapshot first. A store of several replicas (kvstore/replicas.py) is followed replica by replica, each
address its DNS name resolves to as it comes and goes; a block counts where its clients look for it, on
the replica that owns it.

The router reads it for workers that load from the same store (their WorkerInfo.kv_store): a prompt
prefix the store holds is one such a worker loads instead of computing (plugins.RoutingRequest).
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from tandem.kvstore.replicas import Replicas
from tandem.proto import kvstore_pb2, kvstore_pb2_grpc
from tandem.rpc.grpc_util import CHANNEL_OPTIONS

log = logging.getLogger("tandem.router")


class Held:
    """The blocks of one layout that the store holds where its clients look for them: on their owner replica
    (a block left on another replica after the set changed is never loaded, so it does not count)."""

    def __init__(self, index: "StoreIndex", compat_hash: str) -> None:
        self.index, self.compat_hash = index, compat_hash

    def __contains__(self, block_hash: int) -> bool:
        owner = self.index.replicas.owner(block_hash)
        return block_hash in self.index.blocks.get(owner, {}).get(self.compat_hash, ())


class StoreIndex:
    def __init__(self, address: str) -> None:
        self.address = address
        self.replicas = Replicas(address)
        self.blocks: dict[str, dict[str, set[int]]] = {}  # replica -> compat hash -> block hashes held
        self.resubscriptions = 0

    def held(self, compat_hash: str) -> Held:
        return Held(self, compat_hash)

    def serves(self, kv_store: str) -> bool:
        """Whether a worker that loads from `kv_store` loads from this store."""
        return bool(kv_store) and kv_store == self.address

    def apply(self, event: kvstore_pb2.StoreEvent, replica: str) -> None:
        per = self.blocks.setdefault(replica, {})
        if event.kind == kvstore_pb2.StoreEvent.STORED:
            per.setdefault(event.compat_hash, set()).update(event.block_hashes)
        elif event.compat_hash in per:
            per[event.compat_hash].difference_update(event.block_hashes)

    def __len__(self) -> int:
        return sum(len(held) for per in self.blocks.values() for held in per.values())

    async def follow(self, retry: float = 1.0, interval: float = 5.0) -> None:
        """Keep the index current until cancelled: one follower per replica, as the replica set changes."""
        followers: dict[str, asyncio.Task] = {}
        try:
            while True:
                await self.replicas.refresh()
                for gone in followers.keys() - set(self.replicas.addresses):
                    followers.pop(gone).cancel()
                    self.blocks.pop(gone, None)
                for new in set(self.replicas.addresses) - followers.keys():
                    followers[new] = asyncio.ensure_future(self._follow_replica(new, retry))
                await asyncio.sleep(interval)
        finally:
            for task in followers.values():
                task.cancel()
            await asyncio.gather(*followers.values(), return_exceptions=True)

    async def _follow_replica(self, replica: str, retry: float) -> None:
        quiet = False  # a replica that stays unreachable is logged once, not every `retry`
        while True:
            channel = grpc.aio.insecure_channel(replica, options=CHANNEL_OPTIONS)
            try:
                async for event in kvstore_pb2_grpc.KVStoreStub(channel).Events(kvstore_pb2.EventsRequest(snapshot=True)):
                    self.apply(event, replica)
                    quiet = False
                log.warning("KV store %s closed its event stream; subscribing again", replica)
            except grpc.aio.AioRpcError as exc:
                if not quiet:
                    log.warning("KV store %s events: %s: %s; subscribing again every %g s", replica,
                                exc.code().name, exc.details(), retry)
                quiet = exc.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                self.blocks.pop(replica, None)
                await channel.close()
            self.resubscriptions += 1
            await asyncio.sleep(retry)
