"""A worker's side of the prefix KV store (services/kvstore, `--kv-store HOST:PORT`).

One prompt's lifecycle: load (before the engine sees the prompt: which of its full blocks past this
worker's own prefix cache the store holds (Exists), those blocks fetched (Get) and written into free
blocks of the cache under their hashes, on the engine thread) -> compute (the engine as ever: the
loaded blocks are prefix-cache hits, so only the rest is computed) -> save (in the background once
computed: the prompt's blocks the store lacks, read from this worker's cache on the engine thread and
Put). Every worker of a deployment shares the store, so a prefix one worker computed is loaded, not
recomputed, by the others. Prefill workers load before computing a prompt and save after; decode workers
load before a local prefill or a remote one's lease (the lease then skips what was loaded) and save what
they prefilled themselves.

The store is a cache: when it fails (unreachable, a block evicted between Exists and Get, a corrupt
payload, a refused put) the prompt is computed here as without it; failures are logged and counted
(`tandem:kv_store_failures`), never the request's error. A failed call sets the store aside for
`retry_seconds` (a store that hangs would otherwise add its timeout to every prompt; with several
replicas, only the one that failed), and a put it refuses for good (a block over its size limit) ends saving.

A store of several replicas (`HOST:PORT,...`, or a DNS name resolving to each) holds each block on one of
them, the same for every client (kvstore/replicas.py): a prompt's Exists goes to each replica for its
share, each Get and Put to its block's replica.
"""
from __future__ import annotations

import asyncio
import logging
import time
import zlib

import grpc

from tandem.engine.kv_transfer.layout import LayoutDescriptor
from tandem.kvstore.replicas import Replicas
from tandem.proto import kvstore_pb2 as pb
from tandem.proto import kvstore_pb2_grpc
from tandem.rpc.convert import layout_to_proto
from tandem.rpc.grpc_util import CHANNEL_OPTIONS

log = logging.getLogger("tandem.worker.store")
GETS_IN_FLIGHT = 16  # a long prompt's blocks are fetched this many at a time, not all at once


class StoreLink:
    def __init__(self, address: str, host, layout: LayoutDescriptor, metrics, timeout: float = 2.0,
                 retry_seconds: float = 10.0) -> None:
        """`host`: the worker's engine host; `metrics`: the worker's (store_blocks, store_failures)."""
        self.address = address
        self.host = host
        self.engine = host.engine
        self.namespace = layout.compat_hash
        self.layout = layout_to_proto(layout)
        self.metrics = metrics
        self.timeout = timeout  # per call
        self.retry_seconds = retry_seconds
        self._down_until: dict[str, float] = {}  # replica -> set aside after a failure until then
        self.saving = True  # off once the store refuses our blocks for good
        self.replicas = Replicas(address)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._saves: set[asyncio.Task] = set()
        self._following: asyncio.Task | None = None

    async def start(self) -> None:
        """The replica set resolved, and followed while DNS names it (on the serving loop)."""
        if not self.replicas.static:
            await self.replicas.refresh()
            self._following = asyncio.ensure_future(self.replicas.follow())

    def _up(self, replica: str | None) -> bool:
        """A known replica not set aside (the set may change under a call: a block's owner can be None)."""
        return replica is not None and self._down_until.get(replica, 0.0) <= time.monotonic()

    def _channel(self, replica: str) -> grpc.aio.Channel:
        """This replica's channel (made on the serving loop: an aio channel binds to the loop it starts on); those
        of replicas that left the set are closed."""
        if replica not in self._channels:
            for gone in set(self._channels) - set(self.replicas.addresses):
                asyncio.ensure_future(self._channels.pop(gone).close(grace=None))
                self._down_until.pop(gone, None)
            self._channels[replica] = grpc.aio.insecure_channel(replica, options=CHANNEL_OPTIONS)
        return self._channels[replica]

    async def _call(self, replica: str | None, method: str, request, direction: str):
        """One call to one replica; None when it failed (counted and logged; the replica may be set aside) or the
        replica is gone from the set."""
        if not self._up(replica):
            return None
        try:
            return await getattr(kvstore_pb2_grpc.KVStoreStub(self._channel(replica)), method)(
                request, timeout=self.timeout)
        except grpc.RpcError as exc:
            if method == "Put" and exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT):
                self.saving = False  # it will refuse every block of this layout alike
                log.error("KV store %s refused a block (%s: %s): this worker saves no more blocks", replica,
                          exc.code().name, exc.details())
            self._failed(direction, exc, replica)
            return None

    async def _held(self, hashes: list[int], direction: str) -> list[bool | None]:
        """Whether the store holds each of `hashes` (None: unknown, its replica failed or is set aside), asking
        each replica about its share at once."""
        shares = {r: share for r, share in self.replicas.split(hashes).items() if self._up(r)}
        replies = await asyncio.gather(*(self._call(r, "Exists", pb.ExistsRequest(
            compat_hash=self.namespace, block_hashes=share), direction) for r, share in shares.items()))
        known = {h: bool(present) for share, reply in zip(shares.values(), replies) if reply is not None
                 for h, present in zip(share, reply.present)}
        return [known.get(h) for h in hashes]

    def _key(self, block_hash: int) -> pb.BlockKey:
        return pb.BlockKey(compat_hash=self.namespace, block_hash=block_hash)

    async def load(self, token_ids: list[int], lora: str | None = None) -> int:
        """Loads the blocks of `token_ids`' prefix that the store holds past this worker's own cached
        prefix; how many blocks were loaded (0 when the store has none or fails)."""
        block_size = self.engine.kv.block_size
        hashes = self.engine.block_hashes(token_ids, lora)[:(len(token_ids) - 1) // block_size]  # what a request can hit
        pool = self.engine.kv.pool
        local = next((i for i, h in enumerate(hashes) if pool.lookup(h) is None), len(hashes))
        wanted = hashes[local:]
        if not wanted or not any(map(self._up, self.replicas.addresses)):
            return 0
        held = await self._held(wanted, "load")
        wanted = wanted[:next((i for i, present in enumerate(held) if not present), len(held))]
        replies = []
        for start in range(0, len(wanted), GETS_IN_FLIGHT):
            replies += await asyncio.gather(*(self._call(self.replicas.owner(h), "Get", pb.GetRequest(key=self._key(h)),
                                                         "load") for h in wanted[start:start + GETS_IN_FLIGHT]))
            if not all(r is not None and r.found for r in replies):
                break
        payloads = []
        for reply in replies:  # the leading blocks still there and intact
            if reply is None or not reply.found or zlib.crc32(reply.payload) != reply.crc32:
                break
            payloads.append(reply.payload)
        if not payloads:
            return 0
        try:
            loaded = await self.host.call(self.engine.import_blocks, hashes[:local], wanted[:len(payloads)], payloads)
        except ValueError as exc:  # a payload of another size under our namespace: the store is wrong, not us
            return self._failed("load", exc)
        self.metrics.store_blocks.labels("load").inc(loaded)
        return loaded

    def save_later(self, token_ids: list[int], lora: str | None = None) -> None:
        """Puts the blocks of `token_ids` this worker's cache holds and the store lacks, in the background."""
        if not self.saving or not any(map(self._up, self.replicas.addresses)):
            return
        task = asyncio.ensure_future(self._save(token_ids, lora))
        self._saves.add(task)
        task.add_done_callback(self._saves.discard)

    async def _save(self, token_ids: list[int], lora: str | None) -> None:
        hashes = self.engine.block_hashes(token_ids, lora)
        if not hashes:
            return
        held = await self._held(hashes, "save")
        missing = [h for h, present in zip(hashes, held) if present is False]  # unknown ones are left alone
        try:
            blocks = await self.host.call(self.engine.export_blocks, missing) if missing else []
        except RuntimeError as exc:  # the engine stopped meanwhile
            self._failed("save", exc)
            return
        for block_hash, payload in blocks:
            replica = self.replicas.owner(block_hash)
            if not self.saving or not self._up(replica):
                continue
            put = pb.PutRequest(key=self._key(block_hash), payload=payload, crc32=zlib.crc32(payload), layout=self.layout)
            if await self._call(replica, "Put", put, "save") is not None:
                self.metrics.store_blocks.labels("save").inc()

    def _failed(self, direction: str, exc: BaseException, replica: str | None = None) -> int:
        self.metrics.store_failures.labels(direction).inc()
        detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
        if replica is not None and isinstance(exc, grpc.RpcError) and exc.code() in (
                grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            self._down_until[replica] = time.monotonic() + self.retry_seconds
            detail += f"; not asked again for {self.retry_seconds:g} s"
        log.warning("KV store %s (%s): %s; computing without it", replica or self.address, direction, detail)
        return 0

    async def settled(self) -> None:
        """Until the saves started so far have ended (what the counters say is then final)."""
        await asyncio.gather(*self._saves, return_exceptions=True)

    async def close(self) -> None:
        tasks = [*self._saves, *([self._following] if self._following else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close(grace=None)
