"""The router's view of the workers: who is alive, how loaded, what each one's prefix cache holds.

Lifecycle of a worker entry: a heartbeat (or, for a worker given statically, a poll) creates or
refreshes it -> it serves requests while its last report is younger than `heartbeat_timeout` ->
a call that finds it dead (`mark_failed`), a missed deadline or a deregistration takes it out of
rotation at once, and every call in flight to it is cancelled so its requests fail over -> a
later report from it (a restarted process is a new instance) brings it back; one out of rotation
for `forget_after` is dropped (a static one is kept: it is polled until it answers).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from tandem.proto import router_pb2, router_pb2_grpc

log = logging.getLogger("tandem.router")
KVEvent = router_pb2.KVEvent


@dataclass(eq=False)
class Worker:
    worker_id: str
    info: router_pb2.WorkerInfo
    load: router_pb2.WorkerLoad
    last_seen: float
    static: bool = False
    cached: set[int] = field(default_factory=set)
    next_event_seq: int = 0
    # in sequences, the unit of the workers' reports (a request with best_of = 4 runs four): the router's
    # requests sent here and not done (fresher than heartbeats), and those that ended after the last report
    in_flight: int = 0
    ended_since_report: int = 0
    blocks_since_report: int = 0  # KV blocks the router's requests sent after the last report will take
    failed_at: float | None = None
    leaves: int = 0  # times it left the pool: a call can tell whether its worker left while it waited
    calls: set[Any] = field(default_factory=set)  # gRPC calls in flight, cancelled if the worker leaves

    def sent(self, seqs: int = 1, blocks: int = 0) -> None:
        """The router sent a request of `seqs` sequences here, whose prompt takes `blocks` KV blocks (its
        samples share them)."""
        self.in_flight += seqs
        self.blocks_since_report += blocks

    def ended(self, seqs: int = 1) -> None:
        """A request the router sent here (`seqs` sequences) is done."""
        self.in_flight -= seqs
        self.ended_since_report += seqs

    def reported_busy(self, count: int) -> int:
        """A count of sequences from the last report, less the router's own that ended since: a report up
        to an interval old still counts them, and a worker that has just finished one must not look busier
        than an idle one (sequential requests would otherwise follow the heartbeats' phase)."""
        return max(0, count - self.ended_since_report)

    @property
    def role(self) -> int:
        return self.info.role

    @property
    def address(self) -> str:
        return self.info.address

    @property
    def compat_hash(self) -> str:
        return self.info.layout.compat_hash

    @property
    def gone(self) -> bool:
        return self.failed_at is not None

    def describe(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "instance_id": self.info.instance_id, "role": router_pb2.Role.Name(self.role).lower(), "address": self.address,
                "compat_hash": self.compat_hash, "static": self.static, "in_flight": self.in_flight,
                "cached_blocks": len(self.cached), "num_running": self.load.num_running,
                "num_waiting": self.load.num_waiting, "num_free_blocks": self.load.num_free_blocks,
                "num_blocks": self.load.num_blocks, "age_s": round(time.monotonic() - self.last_seen, 3),
                "healthy": not self.gone}


COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions")  # WorkerLoad's cumulative fields


class DuplicateWorker(ValueError):
    """A second live process reports under a worker id that another, still reporting, holds."""


class WorkerPool:
    def __init__(self, heartbeat_interval: float = 0.5, heartbeat_timeout: float = 2.0) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        # a worker out of rotation this long is forgotten (a scaled-down pod, a replaced one under a new
        # name): /workers and the down count then show what may still come back
        self.forget_after = max(60.0, 10 * heartbeat_timeout)
        self.workers: dict[str, Worker] = {}
        self.changed = asyncio.Event()  # set on every join and leave (tests and the launcher wait on it)
        self._refused: set[str] = set()  # duplicate instances already logged
        # the workers' counters summed over every instance ever seen, per role: they only grow (a sum of
        # the live workers' values fell when one restarted or left)
        self.totals: dict[tuple[int, str], int] = {}
        self._counted: dict[str, tuple[int, ...]] = {}  # instance id -> its counters as last added

    # ---- reports in ----------------------------------------------------------------------------

    def report(self, state: router_pb2.WorkerState, static: bool = False) -> router_pb2.HeartbeatReply:
        info, now = state.info, time.monotonic()
        w = self.workers.get(info.worker_id)
        if w is not None and w.info.instance_id != info.instance_id and w.address != info.address \
                and not w.gone and now - w.last_seen <= self.heartbeat_timeout:
            # a restart reuses the address (or comes after the old one fell silent); a second live process
            # under the same id would otherwise replace the first on every report, cancelling its calls
            msg = (f"worker id {info.worker_id!r} is held by {w.address}, which still reports; "
                   f"{info.address} must use another --worker-id")
            if info.instance_id not in self._refused:
                self._refused.add(info.instance_id)
                log.error("refused a worker: %s", msg)
            raise DuplicateWorker(msg)
        # by instance, not by entry: a worker forgotten and then heard again must not count twice
        values = tuple(getattr(state.load, name) for name in COUNTERS)
        before = self._counted.get(info.instance_id, (0,) * len(COUNTERS))
        for name, value, old in zip(COUNTERS, values, before):
            key = (info.role, name)
            self.totals[key] = self.totals.get(key, 0) + (value - old if value >= old else value)
        self._counted[info.instance_id] = values
        if w is None or w.info.instance_id != info.instance_id:
            if w is not None:
                self._leave(w, "restarted")
            w = self.workers[info.worker_id] = Worker(info.worker_id, info, state.load, now, static)
            w.next_event_seq = -1  # nothing known of its cache yet: a snapshot is needed
            log.info("worker %s joined: %s at %s, KV layout %s", w.worker_id, router_pb2.Role.Name(w.role).lower(),
                     w.address, w.compat_hash)
            self.changed.set()
        elif w.gone:
            log.info("worker %s is back", w.worker_id)
            w.failed_at = None
            self.changed.set()
        w.info, w.load, w.last_seen, w.ended_since_report, w.blocks_since_report = info, state.load, now, 0, 0
        resync = not self._apply_events(w, state)
        return router_pb2.HeartbeatReply(acked_event_seq=max(w.next_event_seq, 0),
                                         interval_s=self.heartbeat_interval, resync=resync)

    @staticmethod
    def _apply_events(w: Worker, state: router_pb2.WorkerState) -> bool:
        """Apply a report's cache events; False when they do not continue what we have."""
        if state.snapshot:
            w.cached = set()
        elif state.first_event_seq != w.next_event_seq:
            return False
        for event in state.events:
            if event.kind == KVEvent.STORED:
                w.cached.update(event.block_hashes)
            else:
                w.cached.difference_update(event.block_hashes)
        w.next_event_seq = state.next_event_seq
        return True

    def deregister(self, worker_id: str, instance_id: str) -> None:
        w = self.workers.get(worker_id)
        if w is not None and w.info.instance_id == instance_id:
            self._leave(w, "deregistered")
            del self.workers[worker_id]

    # ---- who serves ----------------------------------------------------------------------------

    def live(self, role: int) -> list[Worker]:
        return [w for w in self.workers.values() if w.role == role and not w.gone]

    def mark_failed(self, w: Worker, reason: str) -> None:
        if not w.gone:
            self._leave(w, reason)

    def _leave(self, w: Worker, reason: str) -> None:
        log.warning("worker %s (%s) left the pool: %s; cancelling %d calls in flight", w.worker_id, w.address,
                    reason, len(w.calls))
        w.failed_at = time.monotonic()
        w.leaves += 1
        for call in list(w.calls):
            call.cancel()
        self.changed.set()

    async def sweep(self) -> None:
        """Take out workers whose heartbeats stopped. A sweep that wakes late finds the router itself
        stalled (a long synchronous call on its event loop, a frozen process): the reports sent meanwhile
        are still queued, unread, so silence is no evidence; ages then count from the stall's end."""
        period = self.heartbeat_interval / 2
        since = time.monotonic()  # no worker's age counts from before this
        while True:
            before = time.monotonic()
            await asyncio.sleep(period)
            now = time.monotonic()
            if now - before > period + self.heartbeat_interval:
                log.warning("the router stalled for %.1fs: heartbeat ages count from now", now - before - period)
                since = now
            for w in list(self.workers.values()):
                age = now - max(w.last_seen, since)
                if not w.gone and age > self.heartbeat_timeout:
                    self._leave(w, f"no heartbeat for {now - w.last_seen:.1f}s")
                elif w.gone and not w.static and now - max(w.failed_at, since) > self.forget_after:
                    log.info("worker %s (%s) forgotten: out of the pool for %.0fs", w.worker_id, w.address,
                             now - w.failed_at)
                    del self.workers[w.worker_id]

    async def poll(self, address: str) -> None:
        """Follow a worker the router was told about (flags or config) by polling its state."""
        channel = grpc.aio.insecure_channel(address)
        stub = router_pb2_grpc.WorkerStub(channel)
        worker_id = None
        try:
            while True:
                w = self.workers.get(worker_id) if worker_id else None
                snapshot = w is None or w.next_event_seq < 0
                try:
                    state = await stub.GetState(router_pb2.StateRequest(
                        since_event_seq=0 if snapshot else w.next_event_seq, snapshot=snapshot),
                        timeout=self.heartbeat_timeout)
                except grpc.aio.AioRpcError:
                    pass  # the sweep takes it out once its last report is too old
                else:
                    try:
                        reply = self.report(state, static=True)
                    except DuplicateWorker:
                        pass  # logged once; polled again, it joins if the other falls silent
                    else:
                        worker_id = state.info.worker_id
                        if reply.resync:
                            self.workers[worker_id].next_event_seq = -1
                await asyncio.sleep(self.heartbeat_interval)
        finally:
            await channel.close(grace=None)


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    async def Heartbeat(self, request: router_pb2.WorkerState, context) -> router_pb2.HeartbeatReply:
        try:
            return self.pool.report(request)
        except DuplicateWorker as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))

    async def Deregister(self, request: router_pb2.DeregisterRequest, context) -> router_pb2.DeregisterReply:
        self.pool.deregister(request.worker_id, request.instance_id)
        return router_pb2.DeregisterReply()
