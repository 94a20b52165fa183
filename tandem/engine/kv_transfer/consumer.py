"""The consumer role (decode): reserve blocks for a prompt under a lease, take its KV from a
transport, admit the request when every token of every layer arrived.

Lifecycle of a lease: `reserve` (engine thread: the prompt's blocks are allocated, its cached
prefix reused, nothing published to the prefix cache yet) -> `open` / `write` / `close` (transport
thread: each chunk is checked against the lease and written into its blocks; `open` of a new
transfer id restarts the count, so a retry from another prefill worker rewrites the lease; a lease
that wants every prompt token's KV also wants the first output token, which `close` brings) ->
`take_complete` (engine thread: the request joins the scheduler with its prompt computed and its
first token sampled, or with all but its last prompt token computed) or `release` (abort, expiry,
local fallback). A lease is released under its lock, so no chunk is written after it ended: a late
transfer gets an error and writes nothing.

Same-host transfers: with `staging_max_bytes` set, `reserve` also takes a shared-memory staging
area for the lease from a pool (shm.StagingPool; it goes back when the lease leaves the table); the
transport hands a staged chunk to `write_staged` (under the lease's lock, alive leases only), which
copies it from the area into the blocks and then checks its checksum on the bytes it copied.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tandem.engine.kv_cache.manager import KVCacheManager
from tandem.engine.kv_transfer import codec
from tandem.engine.kv_transfer.codec import KVChunkData
from tandem.engine.kv_transfer.layout import LayoutDescriptor, incompatibility
from tandem.engine.kv_transfer import shm
from tandem.engine.kv_transfer.shm import StagingArea, StagingPool
from tandem.engine.request import Request
from tandem.engine.sampler import Sample

_ids = itertools.count(1)


class LeaseError(Exception):
    """A transfer into a lease that does not (or no longer) exist, or that does not fit it."""


@dataclass(eq=False)
class Lease:
    lease_id: str
    request: Request
    block_ids: list[int]
    skip_tokens: int  # tokens the consumer had cached: not transferred
    num_tokens: int  # KV of tokens [skip_tokens, num_tokens) is wanted
    deadline: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    alive: bool = True
    complete: bool = False
    transfer_id: str = ""
    received: torch.Tensor | None = None  # [layers, num_tokens] bool, per transfer
    wants_first: bool = False  # the producer samples the first output token (num_tokens is the whole prompt)
    first: Sample | None = None  # that token, once the transfer closed
    staging: StagingArea | None = None  # same-host transfers: chunks are staged here (it may be larger)
    staging_bytes: int = 0  # what this lease stages: every wanted token of every layer


class KVConsumer:
    def __init__(self, kv: KVCacheManager, caches: codec.LocalCaches, layout: LayoutDescriptor, vocab_size: int,
                 on_complete: Callable[[], None] = lambda: None) -> None:
        self.kv = kv
        self.vocab_size = vocab_size  # a first token from a producer must be one of the model's
        self.caches = caches
        self.layout = layout
        self.on_complete = on_complete  # wakes the engine thread
        self.leases: dict[str, Lease] = {}
        self.by_request: dict[Request, Lease] = {}
        self._complete: collections.deque[Lease] = collections.deque()
        self.staging_max_bytes = 0  # > 0: leases up to this many bytes get a shared-memory staging area
        self.staging_pool = StagingPool()

    # ---- scheduler side (engine thread) --------------------------------------------------------

    def reserve(self, req: Request, lease_seconds: float, producer_samples: bool = False) -> Lease | None:
        """Blocks for the request's tokens under a new lease; None when the cache lacks room.
        `producer_samples`: the lease wants the KV of every prompt token and the first output token;
        else the KV of all but the last prompt token."""
        prefix = self.kv.computed_prefix(req)
        cached = len(prefix) * self.kv.block_size
        if not self.kv.allocate(req, req.num_tokens - cached, prefix, publish=False):
            return None
        req.num_cached_tokens = cached
        lease = Lease(f"lease-{next(_ids)}-{req.seq_id}", req, self.kv.block_ids(req), cached,
                      req.num_tokens - (0 if producer_samples else 1), time.monotonic() + lease_seconds,
                      wants_first=producer_samples)
        self.leases[lease.lease_id] = lease
        self.by_request[req] = lease
        size = self.layout.num_layers * (lease.num_tokens - lease.skip_tokens) * self.layout.token_bytes
        if 0 < size <= self.staging_max_bytes:
            try:
                lease.staging, lease.staging_bytes = self.staging_pool.take(lease.lease_id, size), size
            except OSError:
                lease.staging = None  # /dev/shm full or missing: this lease's transfer goes over gRPC
        return lease

    def take_complete(self) -> list[Lease]:
        """Leases whose KV is all here; they leave the table (the request owns the blocks now)."""
        done = []
        while self._complete:
            lease = self._complete.popleft()
            if self._forget(lease):
                done.append(lease)
        return done

    def has_complete(self) -> bool:
        return bool(self._complete)

    def expired(self, now: float) -> list[Lease]:
        return [lease for lease in self.leases.values() if lease.deadline <= now and not lease.complete]

    def next_deadline(self) -> float | None:
        return min((lease.deadline for lease in self.leases.values()), default=None)

    def release(self, req: Request) -> Lease | None:
        """End the request's lease (if any) before its blocks are freed: no write lands after."""
        lease = self.by_request.get(req)
        if lease is None:
            return None
        with lease.lock:
            lease.alive = False
        self._forget(lease)
        return lease

    def _forget(self, lease: Lease) -> bool:
        self.by_request.pop(lease.request, None)
        if lease.staging is not None:
            with lease.lock:  # no transport thread is inside write_staged for it now
                area, lease.staging = lease.staging, None
                if area is not None:
                    self.staging_pool.give_back(area)
        return self.leases.pop(lease.lease_id, None) is not None

    def close_staging(self) -> None:
        """The worker stops: unlink every staging area (no file outlives the process)."""
        for lease in list(self.leases.values()):
            with lease.lock:
                lease.alive = False
                area, lease.staging = lease.staging, None
                if area is not None:
                    area.close()
        self.staging_pool.close()

    # ---- worker side (transport threads) -------------------------------------------------------

    def _get(self, lease_id: str) -> Lease:
        lease = self.leases.get(lease_id)
        if lease is None or not lease.alive:
            raise LeaseError(f"lease {lease_id!r} does not exist (expired, cancelled or never granted)")
        return lease

    def open(self, lease_id: str, transfer_id: str, layout: LayoutDescriptor) -> Lease:
        error = incompatibility(self.layout, layout, "the sender")
        if error:
            raise LeaseError(error)
        lease = self._get(lease_id)
        with lease.lock:
            if not lease.alive or lease.complete:
                raise LeaseError(f"lease {lease_id!r} is {'complete' if lease.complete else 'gone'}")
            lease.transfer_id = transfer_id
            lease.received = torch.zeros(self.layout.num_layers, lease.num_tokens, dtype=torch.bool)
        return lease

    def _slots(self, lease_id: str, layer: int, token_start: int, num_tokens: int, num_layers: int,
               nbytes: int) -> tuple[Lease, torch.Tensor]:
        """The lease and the cache slots of a chunk, once it is known to fit the lease."""
        lease = self._get(lease_id)
        end, last = token_start + num_tokens, layer + num_layers - 1
        if not (0 <= layer <= last < self.layout.num_layers and lease.skip_tokens <= token_start < end
                <= lease.num_tokens):
            raise LeaseError(f"chunk of layers {layer}..{last} tokens [{token_start}, {end}) is outside lease "
                             f"{lease_id} (layers 0..{self.layout.num_layers - 1}, tokens "
                             f"[{lease.skip_tokens}, {lease.num_tokens}))")
        if nbytes != num_layers * num_tokens * self.layout.token_bytes:
            raise LeaseError(f"chunk of {num_layers} layer(s) x {num_tokens} tokens has {nbytes} bytes, expected "
                             f"{num_layers * num_tokens * self.layout.token_bytes}")
        return lease, codec.slots_of(lease.block_ids, self.kv.block_size, token_start, end)

    def write(self, lease_id: str, transfer_id: str, chunk: KVChunkData) -> None:
        """Bytes from the wire, verified by the caller."""
        lease, slots = self._slots(lease_id, chunk.layer, chunk.token_start, chunk.num_tokens, chunk.num_layers,
                                   len(chunk.data))
        per_layer = len(chunk.data) // chunk.num_layers
        data = memoryview(chunk.data)
        with lease.lock:
            if not lease.alive or lease.transfer_id != transfer_id:
                raise LeaseError(f"lease {lease_id!r} ended or was taken over by another transfer")
            for i in range(chunk.num_layers):
                self.caches.decode_into(chunk.layer + i, slots, data[i * per_layer:(i + 1) * per_layer])
            lease.received[chunk.layer:chunk.layer + chunk.num_layers,
                           chunk.token_start:chunk.token_start + chunk.num_tokens] = True

    def write_staged(self, lease_id: str, transfer_id: str, layer: int, token_start: int, num_tokens: int,
                     num_layers: int, offset: int, length: int, checksum: int) -> bool:
        """A chunk from the lease's staging area (each of its layers at that layer's place; `offset` is
        the first's), copied into the blocks and then checked on the bytes it was copied from (no copy
        in between); False on a checksum mismatch (nothing counts as received: the sender sends it
        again). Checking after the copy catches a writer that changed the bytes before or while they
        were copied."""
        lease, slots = self._slots(lease_id, layer, token_start, num_tokens, num_layers, length)
        per_layer = length // num_layers
        tb = self.layout.token_bytes
        with lease.lock:
            if not lease.alive or lease.transfer_id != transfer_id or lease.staging is None:
                raise LeaseError(f"lease {lease_id!r} ended, was taken over or has no staging area")
            places = [shm.offset(layer + i, token_start, lease.skip_tokens, lease.num_tokens, tb)
                      for i in range(num_layers)]
            if offset != places[0]:
                raise LeaseError(f"staged chunk of layer {layer} at token {token_start} claims offset {offset}, "
                                 f"its place is {places[0]}")
            if places[-1] + per_layer > lease.staging_bytes:
                raise LeaseError(f"staged chunk [{places[-1]}, {places[-1] + per_layer}) is outside the lease's "
                                 f"{lease.staging_bytes} staged bytes")
            digest = codec.hasher()
            for i, at in enumerate(places):
                view = lease.staging.view(at, per_layer)
                try:
                    self.caches.decode_into(layer + i, slots, view)
                    digest.update(view)
                finally:
                    view.release()
            intact = digest.intdigest() == checksum
            if intact:
                lease.received[layer:layer + num_layers, token_start:token_start + num_tokens] = True
            return intact

    def close(self, lease_id: str, transfer_id: str, first: Sample | None = None) -> None:
        """Every wanted token of every layer arrived (and the first output token, when the lease
        wants it): hand the request to the engine."""
        lease = self._get(lease_id)
        with lease.lock:
            if not lease.alive or lease.transfer_id != transfer_id:
                raise LeaseError(f"lease {lease_id!r} ended or was taken over by another transfer")
            missing = (~lease.received[:, lease.skip_tokens:]).sum().item()
            if missing:
                raise LeaseError(f"transfer closed with {missing} (layer, token) entries missing")
            if lease.wants_first != (first is not None):
                raise LeaseError(f"lease {lease_id!r} wants {'the' if first is None else 'no'} first output token "
                                 f"with its KV; the transfer closed {'without' if first is None else 'with'} one")
            if first is not None and not 0 <= first.token_id < self.vocab_size:
                raise LeaseError(f"first token {first.token_id} is outside the vocabulary ({self.vocab_size})")
            lease.first = first
            lease.complete = True
        self._complete.append(lease)
        self.on_complete()
