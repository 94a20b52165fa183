"""A worker's reports to routers: who it is, how loaded it is, and how its prefix cache changed.

The same `WorkerState` message answers a router's poll (`Worker.GetState`, for workers a router
was given statically) and rides on the heartbeats a worker pushes (`Router.Heartbeat`, which
registers it). Events are sent from the router's last acknowledged sequence number; a router
that lost track (restart, gap) asks for a snapshot of every cached hash instead.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Callable

import grpc

from tandem.engine.kv_cache.events import STORED, KVEventLog
from tandem.proto import router_pb2, router_pb2_grpc
from tandem.rpc.convert import layout_to_proto

log = logging.getLogger("tandem.worker")
MAX_EVENTS_PER_REPORT = 100_000


class WorkerReporter:
    def __init__(self, engine_host, role: int, worker_id: str, address: str, model: str,
                 load_extra: Callable[[router_pb2.WorkerLoad], None] = lambda load: None,
                 metrics_url: str = "", kv_store: str = "") -> None:
        self.host = engine_host  # an AsyncEngine: stats() is a snapshot safe to read here
        engine = engine_host.engine
        self.events = KVEventLog()
        engine.kv.pool.events = self.events
        self._pool = engine.kv.pool
        self.load_extra = load_extra
        self.info = router_pb2.WorkerInfo(
            worker_id=worker_id, instance_id=secrets.token_hex(8), role=role, address=address,
            layout=layout_to_proto(engine.layout), model=model, max_model_len=engine_host.max_model_len,
            vocab_size=engine.model.shape.vocab, kv_hash_seed=engine.kv.hash_seed,
            max_num_seqs=engine.config.scheduler.max_num_seqs, metrics_url=metrics_url,
            loras=engine.lora_paths, lora_keys=engine.kv.lora_keys, kv_store=kv_store)

    def load(self) -> router_pb2.WorkerLoad:
        s = self.host.stats()
        load = router_pb2.WorkerLoad(
            num_running=s.num_running, num_waiting=s.num_waiting, num_free_blocks=s.num_free_blocks,
            num_blocks=s.num_blocks, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, num_preemptions=s.num_preemptions)
        self.load_extra(load)
        return load

    def state(self, since_seq: int = 0, snapshot: bool = False) -> router_pb2.WorkerState:
        msg = router_pb2.WorkerState(info=self.info, load=self.load())
        found = None if snapshot else self.events.since(since_seq)
        if found is None:  # a snapshot: every hash cached now, then the log from here on
            first = self.events.next_seq
            msg.snapshot = True
            msg.first_event_seq = msg.next_event_seq = first
            msg.events.append(router_pb2.KVEvent(kind=router_pb2.KVEvent.STORED,
                                                 block_hashes=self._pool.cached_hashes()))
            return msg
        first, events = found
        events = events[:MAX_EVENTS_PER_REPORT]
        msg.first_event_seq, msg.next_event_seq = first, first + len(events)
        for kind, block_hash in events:  # runs of one kind become one message
            pb_kind = router_pb2.KVEvent.STORED if kind == STORED else router_pb2.KVEvent.REMOVED
            if not msg.events or msg.events[-1].kind != pb_kind:
                msg.events.append(router_pb2.KVEvent(kind=pb_kind))
            msg.events[-1].block_hashes.append(block_hash)
        return msg

    async def heartbeat(self, router_address: str, stop: asyncio.Event, interval: float = 0.5) -> None:
        """Push state to one router until `stop` is set; survives the router coming and going."""
        channel = grpc.aio.insecure_channel(router_address)
        stub = router_pb2_grpc.RouterStub(channel)
        acked, snapshot, connected, refused = 0, True, False, False
        try:
            while not stop.is_set():
                state = self.state(acked, snapshot)
                try:
                    reply = await stub.Heartbeat(state, timeout=max(2.0, 4 * interval))
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                        if not refused:  # another live worker holds this id: said once, then retried quietly
                            log.error("router %s refused this worker: %s", router_address, exc.details())
                        refused = True
                    elif connected:
                        log.warning("router %s unreachable: %s", router_address, exc.details())
                    connected, snapshot = False, True
                else:
                    if not connected:
                        log.info("registered with router %s as %s", router_address, self.info.worker_id)
                    connected = True
                    acked, snapshot = reply.acked_event_seq, reply.resync
                    self.events.drop_before(acked)
                    interval = reply.interval_s or interval
                try:
                    await asyncio.wait_for(stop.wait(), interval)
                except asyncio.TimeoutError:
                    pass
            await stub.Deregister(router_pb2.DeregisterRequest(worker_id=self.info.worker_id,
                                                               instance_id=self.info.instance_id), timeout=1.0)
        except grpc.aio.AioRpcError:
            pass
        finally:
            await channel.close(grace=None)


class WorkerStateServicer(router_pb2_grpc.WorkerServicer):
    def __init__(self, reporter: WorkerReporter) -> None:
        self.reporter = reporter

    async def GetState(self, request: router_pb2.StateRequest, context) -> router_pb2.WorkerState:
        return self.reporter.state(request.since_event_seq, request.snapshot)
