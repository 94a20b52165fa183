"""The router's index of what the prefix KV store holds (store_index.py), following a real store's Events
stream on 127.0.0.1: the snapshot at subscription, blocks stored and evicted, and a store that goes away
(forgotten at once) and comes back (followed again, from its new snapshot)."""
from __future__ import annotations

import asyncio
import threading
import time

from tandem.router.store_index import StoreIndex
from tests.kvstore.conftest import NS, block, kvstore  # noqa: F401 - the fixture


def held(index: StoreIndex) -> set[int]:
    return set().union(*(per.get(NS, set()) for per in index.blocks.values()))


def wait_for(check, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_the_index_follows_the_store_through_a_restart(kvstore):  # noqa: F811
    kv = kvstore(capacity_bytes=2000)  # room for two blocks
    kv.put(1, block(1))
    index = StoreIndex(f"127.0.0.1:{kv.server.port}")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    following = asyncio.run_coroutine_threadsafe(index.follow(retry=0.05), loop)
    try:
        wait_for(lambda: held(index) == {1}, "the snapshot")
        kv.put(2, block(2))
        wait_for(lambda: held(index) == {1, 2}, "a stored block")
        kv.put(3, block(3))  # evicts 1
        wait_for(lambda: held(index) == {2, 3}, "an evicted block")
        assert len(index) == 2 and index.resubscriptions == 0

        port = kv.server.port
        kv.close()
        wait_for(lambda: index.resubscriptions >= 1 and not index.blocks, "the index to forget a store that is gone")
        tries = index.resubscriptions
        wait_for(lambda: index.resubscriptions >= tries + 3, "subscribing again, into a closed port")
        assert not index.blocks  # nothing claimed while the store is away

        again = kvstore(port=port, capacity_bytes=2000)
        again.put(7, block(7))
        wait_for(lambda: held(index) == {7}, "the restarted store's blocks")
    finally:
        following.cancel()
        loop.call_soon_threadsafe(loop.stop)
