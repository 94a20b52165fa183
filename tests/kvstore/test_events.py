"""The Events stream routers consume: STORED for new blocks, REMOVED when the last tier lets a
block go (or it is corrupt), never for spills; namespace filters, snapshots, a bounded backlog,
and streams that end when the store stops."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from tandem.kvstore.events import MAX_HASHES_PER_EVENT, REMOVED, STORED, EventHub, FellBehind
from tandem.proto import kvstore_pb2 as pb
from tests.kvstore.conftest import NS, block


def subscribe(kv, ns: str = NS, snapshot: bool = False, subscribers: int = 1):
    """An open Events stream, once the store has registered it (events before that are not its)."""
    stream = kv.stub.Events(pb.EventsRequest(compat_hash=ns, snapshot=snapshot), timeout=10)
    deadline = time.monotonic() + 5
    while kv.store.stats().subscribers < subscribers:
        assert time.monotonic() < deadline, "the Events stream never subscribed"
        time.sleep(0.01)
    return stream


def event(stream) -> tuple[str, str, list[int]]:
    e = next(stream)
    return pb.StoreEvent.Kind.Name(e.kind), e.compat_hash, list(e.block_hashes)


def test_the_stream_sees_stored_and_removed_blocks_of_its_namespace(kvstore):
    kv = kvstore(capacity_bytes=2000)
    mine, everything = subscribe(kv), subscribe(kv, ns="", subscribers=2)
    kv.put(1, block(1))
    kv.put(2, block(2))
    kv.put(2, block(2))  # a replaced block is no news
    kv.put(9, block(9), ns="otherns")  # evicts 1 (the least recent of all)
    kv.put(3, block(3))  # evicts 2
    assert [event(mine) for _ in range(4)] == [("STORED", NS, [1]), ("STORED", NS, [2]), ("REMOVED", NS, [1]),
                                              ("STORED", NS, [3])]
    assert event(mine) == ("REMOVED", NS, [2])
    assert [event(everything) for _ in range(6)] == [
        ("STORED", NS, [1]), ("STORED", NS, [2]), ("STORED", "otherns", [9]), ("REMOVED", NS, [1]),
        ("STORED", NS, [3]), ("REMOVED", NS, [2])]


def test_spills_are_silent_disk_evictions_and_corrupt_blocks_are_removals(kvstore, tmp_path):
    kv = kvstore(capacity_bytes=1000, disk_dir=tmp_path, disk_capacity_bytes=1020)
    stream = subscribe(kv)
    kv.put(1, block(1))
    kv.put(2, block(2))  # 1 spills: still held
    kv.put(3, block(3))  # 2 spills, 1 falls off the disk
    (tmp_path / NS / f"{2:016x}.kvb").write_bytes(b"not a block")
    assert not kv.get(2).found
    assert [event(stream) for _ in range(5)] == [("STORED", NS, [1]), ("STORED", NS, [2]), ("STORED", NS, [3]),
                                                ("REMOVED", NS, [1]), ("REMOVED", NS, [2])]


def test_a_snapshot_lists_what_is_held_then_follows_changes(kvstore, tmp_path):
    kv = kvstore(capacity_bytes=2000, disk_dir=tmp_path, disk_capacity_bytes=10_000)
    for i in (1, 2, 3):
        kv.put(i, block(i))  # 1 on disk, 2 and 3 in DRAM
    kv.put(5, block(5), ns="otherns")  # 2 spills too
    stream = subscribe(kv, snapshot=True)
    kind, ns, hashes = event(stream)
    assert (kind, ns, sorted(hashes)) == ("STORED", NS, [1, 2, 3])
    kv.put(4, block(4))
    assert event(stream) == ("STORED", NS, [4])


def test_the_store_stopping_ends_the_streams_at_once(kvstore):
    kv = kvstore()
    stream = subscribe(kv)
    kv.put(1, block(1))
    assert event(stream) == ("STORED", NS, [1])
    started = time.monotonic()
    kv.close()
    assert time.monotonic() - started < 1.5  # under the server's 2 s grace: nothing held it
    with pytest.raises((StopIteration, grpc.RpcError)):
        next(stream)


def test_a_subscriber_that_falls_behind_is_told_once():
    async def run():
        hub = EventHub(max_pending=2)
        sub = hub.subscribe("", asyncio.get_running_loop())
        for h in range(4):
            hub.publish(STORED, [("ns", h)])
        await asyncio.sleep(0)  # deliveries run on the loop
        assert await sub.next() == (STORED, "ns", [0])
        assert await sub.next() == (STORED, "ns", [1])
        with pytest.raises(FellBehind):
            await sub.next()
        hub.publish(REMOVED, [("ns", 9)] * (MAX_HASHES_PER_EVENT + 1))  # split, but dropped: it overflowed
        await asyncio.sleep(0)
        hub.close()
        assert await asyncio.wait_for(sub.next(), 1) is None
    asyncio.run(run())


def test_large_batches_are_split_into_bounded_messages():
    async def run():
        hub = EventHub()
        sub = hub.subscribe("ns", asyncio.get_running_loop())
        hub.publish(REMOVED, [("ns", h) for h in range(MAX_HASHES_PER_EVENT + 5)] + [("other", 1)])
        await asyncio.sleep(0)
        first, second = await sub.next(), await sub.next()
        assert (len(first[2]), second[2]) == (MAX_HASHES_PER_EVENT, list(range(MAX_HASHES_PER_EVENT,
                                                                            MAX_HASHES_PER_EVENT + 5)))
        hub.close()
        assert await sub.next() is None  # "other" never reached this subscriber
    asyncio.run(run())
