"""Routing plugins and the worker pool, on worker states built the way heartbeats carry them."""
from __future__ import annotations

import asyncio
import time

import pytest

from tandem.engine.kv_cache.block_hash import hash_blocks
from tandem.proto import common_pb2, router_pb2
from tandem.router.plugins import SCORERS, Profile, RoutingRequest, parse_weights
from tandem.router.pool import WorkerPool

KV = router_pb2.KVEvent


def state(worker_id: str, role=router_pb2.DECODE, compat="aaa", free=100, blocks=100, running=0, waiting=0,
          prefilling=0, instance="i1", first=0, events=(), snapshot=False, max_len=4096,
          address: str | None = None, kv_store: str = "") -> router_pb2.WorkerState:
    info = router_pb2.WorkerInfo(worker_id=worker_id, instance_id=instance, role=role,
                                 address=address or f"{worker_id}:1", kv_store=kv_store,
                                 layout=common_pb2.LayoutDescriptor(compat_hash=compat, block_size=16),
                                 max_model_len=max_len, kv_hash_seed="tandem", max_num_seqs=256)
    load = router_pb2.WorkerLoad(num_free_blocks=free, num_blocks=blocks, num_running=running, num_waiting=waiting,
                                 num_prefilling=prefilling)
    nxt = first if snapshot else first + len(events)  # a snapshot's events are the cache, not log entries
    return router_pb2.WorkerState(info=info, load=load, first_event_seq=first, next_event_seq=nxt,
                                  snapshot=snapshot, events=list(events))


class Call:
    """Stands for a gRPC call in flight to a worker: the pool only cancels it."""
    cancelled = False

    def cancel(self):
        self.cancelled = True


@pytest.fixture
def pool():
    return WorkerPool(heartbeat_interval=0.05, heartbeat_timeout=0.2)


PROMPT = list(range(100, 180))  # 5 full blocks of 16


def test_scores_are_in_unit_interval(pool):
    for st in (state("a"), state("b", free=0, running=300, waiting=50, prefilling=9), state("c", free=7, blocks=9)):
        pool.report(st)
    for w in pool.workers.values():
        w.in_flight = 3
        for name, scorer in SCORERS.items():
            assert 0.0 <= scorer(RoutingRequest(PROMPT), w) <= 1.0, name


def test_prefix_scorer_follows_kv_events(pool):
    hashes = hash_blocks(PROMPT, 16, "tandem")
    pool.report(state("a", snapshot=True, events=[KV(kind=KV.STORED, block_hashes=hashes[:3])]))
    pool.report(state("b"))
    picked = Profile([], {"prefix": 1.0}).pick(RoutingRequest(PROMPT), list(pool.workers.values()))
    assert picked.worker_id == "a"
    req = RoutingRequest(PROMPT)
    assert req.cached_tokens(pool.workers["a"]) == 48
    # block 3 evicted: only the leading chain counts
    pool.report(state("a", first=0, events=[KV(kind=KV.REMOVED, block_hashes=[hashes[1]])]))
    assert RoutingRequest(PROMPT).cached_tokens(pool.workers["a"]) == 16


def test_prefixes_in_the_kv_store_count_for_the_workers_that_load_from_it(pool):
    """A block a worker would load from the store counts at half a cached one, and only for workers that load
    from the store the router follows; the prefill decision counts it whole (it is not computed)."""
    from tandem.proto import kvstore_pb2
    from tandem.router.plugins import STORE_BLOCK_WORTH
    from tandem.router.store_index import StoreIndex

    hashes = hash_blocks(PROMPT, 16, "tandem")
    store = StoreIndex("10.0.0.1:1")
    store.apply(kvstore_pb2.StoreEvent(kind=kvstore_pb2.StoreEvent.STORED, compat_hash="aaa", block_hashes=hashes[:4]),
                "10.0.0.1:1")
    store.apply(kvstore_pb2.StoreEvent(kind=kvstore_pb2.StoreEvent.STORED, compat_hash="bbb", block_hashes=hashes),
                "10.0.0.1:1")
    pool.report(state("linked", kv_store="10.0.0.1:1", snapshot=True, events=[KV(kind=KV.STORED, block_hashes=hashes[:1])]))
    pool.report(state("elsewhere", kv_store="store:2"))
    pool.report(state("unlinked", snapshot=True, events=[KV(kind=KV.STORED, block_hashes=hashes[:2])]))
    w = pool.workers
    req = RoutingRequest(PROMPT, store=store)
    assert [req.reusable_tokens(w[n]) for n in ("linked", "elsewhere", "unlinked")] == [64, 0, 32]
    assert SCORERS["prefix"](req, w["linked"]) == pytest.approx((16 + STORE_BLOCK_WORTH * 48) / 80)
    assert Profile([], {"prefix": 1.0}).pick(req, list(w.values())).worker_id == "linked"
    assert RoutingRequest(PROMPT).reusable_tokens(w["linked"]) == 16  # a router that follows no store
    store.apply(kvstore_pb2.StoreEvent(kind=kvstore_pb2.StoreEvent.REMOVED, compat_hash="aaa", block_hashes=hashes[1:2]),
                "10.0.0.1:1")
    assert req.store_tokens(w["linked"]) == 16 and len(store) == 3 + 5


def test_a_block_counts_only_on_the_replica_its_clients_ask(pool):
    """After the replica set changed, a block left on a replica that no longer owns it is never loaded."""
    from tandem.proto import kvstore_pb2
    from tandem.router.store_index import StoreIndex

    hashes = hash_blocks(PROMPT, 16, "tandem")
    store = StoreIndex("10.0.0.1:1,10.0.0.2:1")
    owner = store.replicas.owner(hashes[0])
    other = next(a for a in store.replicas.addresses if a != owner)
    store.apply(kvstore_pb2.StoreEvent(kind=kvstore_pb2.StoreEvent.STORED, compat_hash="aaa", block_hashes=hashes), other)
    pool.report(state("linked", kv_store="10.0.0.1:1,10.0.0.2:1"))
    assert RoutingRequest(PROMPT, store=store).store_tokens(pool.workers["linked"]) == 0
    store.apply(kvstore_pb2.StoreEvent(kind=kvstore_pb2.StoreEvent.STORED, compat_hash="aaa", block_hashes=hashes), owner)
    assert RoutingRequest(PROMPT, store=store).store_tokens(pool.workers["linked"]) == 16 * len(hashes)


def test_event_gap_asks_for_a_snapshot(pool):
    pool.report(state("a", snapshot=True))
    reply = pool.report(state("a", first=5, events=[KV(kind=KV.STORED, block_hashes=[1])]))
    assert reply.resync and 1 not in pool.workers["a"].cached
    reply = pool.report(state("a", snapshot=True, first=6, events=[KV(kind=KV.STORED, block_hashes=[1, 2])]))
    assert not reply.resync and pool.workers["a"].cached == {1, 2} and reply.acked_event_seq == 6


def test_decode_profile_prefers_free_and_idle_workers(pool):
    pool.report(state("busy", free=10, running=40))
    pool.report(state("idle", free=90))
    profile = Profile(["fits"], parse_weights("kv_free=1,load=1", {}))
    assert profile.pick(RoutingRequest(PROMPT), pool.live(router_pb2.DECODE)).worker_id == "idle"
    assert profile.pick(RoutingRequest(PROMPT, max_tokens=5000), pool.live(router_pb2.DECODE)) is None  # fits


def test_kv_free_counts_each_prompt_sent_since_the_last_report_once(pool):
    """A prompt the router sent takes its blocks once, however many samples share it, and only until the
    next report, which holds them already."""
    pool.report(state("w", free=100, blocks=100))
    w = pool.workers["w"]
    w.sent(4, blocks=10)  # n = 4 over a 10-block prompt
    assert SCORERS["kv_free"](RoutingRequest(PROMPT), w) == pytest.approx(0.9)
    pool.report(state("w", free=90, blocks=100))  # the worker now reports them; they are still in flight
    assert w.in_flight == 4 and SCORERS["kv_free"](RoutingRequest(PROMPT), w) == pytest.approx(0.9)


def test_prefill_profile_pairs_only_compatible_workers(pool):
    pool.report(state("d", compat="aaa"))
    pool.report(state("p-same", role=router_pb2.PREFILL, compat="aaa", prefilling=5))
    pool.report(state("p-other", role=router_pb2.PREFILL, compat="bbb"))
    profile = Profile(["compatible"], {"queue": 1.0})
    req = RoutingRequest(PROMPT, decode=pool.workers["d"])
    assert profile.pick(req, pool.live(router_pb2.PREFILL)).worker_id == "p-same"  # busier, but compatible


def test_ties_break_on_in_flight_then_take_turns(pool):
    for name in ("w2", "w1", "w3"):
        pool.report(state(name))
    profile = Profile([], {"kv_free": 1.0})
    picks = [profile.pick(RoutingRequest([1]), pool.live(router_pb2.DECODE)).worker_id for _ in range(4)]
    assert picks == ["w1", "w2", "w3", "w1"]
    pool.workers["w2"].in_flight = pool.workers["w3"].in_flight = 1
    assert {profile.pick(RoutingRequest([1]), pool.live(router_pb2.DECODE)).worker_id for _ in range(3)} == {"w1"}


def test_requests_that_ended_do_not_linger_in_an_old_report(pool):
    """A report taken while the router's request ran still counts it after the router saw it end: until
    the next report that worker scores as idle as one that never had it (sequential requests then take
    turns instead of following the heartbeats' phase), but work the router did not send still counts."""
    for name in ("a", "b"):
        pool.report(state(name, running=1 if name == "a" else 0))
        pool.report(state(name + "-p", role=router_pb2.PREFILL, prefilling=1 if name == "a" else 0))
    a, b, ap, bp = (pool.workers[n] for n in ("a", "b", "a-p", "b-p"))
    assert SCORERS["load"](RoutingRequest(PROMPT), a) < SCORERS["load"](RoutingRequest(PROMPT), b)
    for w in (a, ap):  # the router's request on each ends
        w.sent()
        w.ended()
    assert a.in_flight == 0
    assert SCORERS["load"](RoutingRequest(PROMPT), a) == SCORERS["load"](RoutingRequest(PROMPT), b)
    assert SCORERS["queue"](RoutingRequest(PROMPT), ap) == SCORERS["queue"](RoutingRequest(PROMPT), bp)
    profile = Profile([], {"load": 1.0})
    assert {profile.pick(RoutingRequest(PROMPT), [a, b]).worker_id for _ in range(2)} == {"a", "b"}
    pool.report(state("a", running=1))  # a fresh report: its running request is someone else's
    assert a.ended_since_report == 0
    assert SCORERS["load"](RoutingRequest(PROMPT), a) < SCORERS["load"](RoutingRequest(PROMPT), b)
    # reports count sequences: one request with best_of = 4 runs four, and its end takes all four off
    pool.report(state("a", running=4))
    a.sent(4)
    a.ended(4)
    assert SCORERS["load"](RoutingRequest(PROMPT), a) == SCORERS["load"](RoutingRequest(PROMPT), b)


def test_unknown_plugins_and_bad_weights_are_errors():
    with pytest.raises(ValueError, match="unknown routing plugins"):
        Profile(["nope"], {})
    with pytest.raises(ValueError, match="unknown routing plugins"):
        Profile([], parse_weights("kv_free=1,bogus=2", {}))
    with pytest.raises(ValueError):
        parse_weights("kv_free=abc", {})


def test_silent_workers_leave_and_calls_are_cancelled(pool):
    async def scenario():
        pool.report(state("a"))
        call = Call()
        pool.workers["a"].calls.add(call)
        sweeper = asyncio.ensure_future(pool.sweep())
        await asyncio.sleep(0.4)
        sweeper.cancel()
        return call

    call = asyncio.run(scenario())
    assert call.cancelled and pool.live(router_pb2.DECODE) == []
    pool.report(state("a"))  # it speaks again: back in rotation
    assert [w.worker_id for w in pool.live(router_pb2.DECODE)] == ["a"]
    pool.report(state("a", instance="i2"))  # a restarted process is a new instance, its cache unknown
    assert pool.workers["a"].next_event_seq == -1 or pool.workers["a"].cached == set()


def test_a_stalled_router_does_not_take_out_workers_that_reported(pool):
    """The router's own event loop blocked (a long synchronous call, a frozen process) past the heartbeat
    timeout: the reports sent meanwhile are queued, not lost, so the late sweep keeps every worker, and one
    that then stays silent still leaves a timeout later."""
    async def scenario():
        pool.report(state("a"))
        pool.report(state("b"))
        call = Call()
        pool.workers["a"].calls.add(call)
        sweeper = asyncio.ensure_future(pool.sweep())
        await asyncio.sleep(pool.heartbeat_interval)
        time.sleep(pool.heartbeat_timeout * 3)  # the loop stalls; heartbeats would queue meanwhile
        await asyncio.sleep(0)  # the sweep wakes first, late
        await asyncio.sleep(0)
        kept = sorted(w.worker_id for w in pool.live(router_pb2.DECODE))
        for _ in range(int(pool.heartbeat_timeout / pool.heartbeat_interval) + 3):  # a reports; b is silent
            pool.report(state("a"))
            await asyncio.sleep(pool.heartbeat_interval)
        sweeper.cancel()
        return kept, [w.worker_id for w in pool.live(router_pb2.DECODE)], call

    kept, after, call = asyncio.run(scenario())
    assert kept == ["a", "b"] and not call.cancelled
    assert after == ["a"]


def test_a_second_live_worker_under_one_id_is_refused(pool):
    """Two processes given one --worker-id: the second is refused over gRPC (ALREADY_EXISTS) while the
    first still reports, instead of the two replacing each other on every heartbeat and cancelling the
    calls in flight; once the first falls silent the second takes the id, as a restart would."""
    import grpc

    from tandem.proto import router_pb2_grpc
    from tandem.router.pool import RouterServicer

    async def scenario():
        server = grpc.aio.server()
        router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(pool), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                await stub.Heartbeat(state("a"))
                call = Call()
                pool.workers["a"].calls.add(call)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Heartbeat(state("a", instance="i2", address="elsewhere:2"))
                held = (pool.workers["a"].info.instance_id, call.cancelled)
                await stub.Heartbeat(state("a", instance="i3"))  # a restart on the same address: it replaces
                restarted = pool.workers["a"].info.instance_id
                pool.workers["a"].last_seen -= pool.heartbeat_timeout + 1  # i3 falls silent
                await stub.Heartbeat(state("a", instance="i2", address="elsewhere:2"))
                return refused.value.code(), held, restarted, pool.workers["a"].address
        finally:
            await server.stop(None)

    code, held, restarted, address = asyncio.run(scenario())
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert held == ("i1", False) and restarted == "i3" and address == "elsewhere:2"


def test_workers_long_out_of_the_pool_are_forgotten(pool):
    """A worker silent past `forget_after` (a scaled-down pod) leaves /workers and the down count; a worker
    given statically stays, since the router keeps polling it."""
    pool.forget_after = 0.3

    async def scenario():
        pool.report(state("a"))
        pool.report(state("s"), static=True)
        sweeper = asyncio.ensure_future(pool.sweep())
        await asyncio.sleep(pool.heartbeat_timeout + 0.1)
        out = sorted(w for w, info in pool.workers.items() if info.gone)
        await asyncio.sleep(pool.forget_after + 0.2)
        sweeper.cancel()
        return out, sorted(pool.workers)

    out, left = asyncio.run(scenario())
    assert out == ["a", "s"] and left == ["s"]
    pool.report(state("a"))  # it comes back: a new entry
    assert sorted(w.worker_id for w in pool.live(router_pb2.DECODE)) == ["a"]


def test_counters_summed_over_workers_never_go_back(pool):
    """The router's prefix-cache counters add up what each worker instance reported: a restarted worker
    (counting from zero again) or one that left takes nothing back."""
    def report(worker_id: str, queries: int, instance: str = "i1") -> int:
        s = state(worker_id, instance=instance)
        s.load.prefix_cache_queries = queries
        pool.report(s)
        return pool.totals[(router_pb2.DECODE, "prefix_cache_queries")]

    assert [report("a", 100), report("a", 150), report("b", 5)] == [100, 150, 155]
    assert report("a", 10, instance="i2") == 165  # restarted: its 150 stay counted
    assert report("a", 12, instance="i2") == 167
    pool.forget_after = 0.0
    del pool.workers["a"]  # forgotten, as the sweep drops a worker long out of the pool; then heard again
    assert report("a", 13, instance="i2") == 168
