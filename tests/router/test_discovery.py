"""Static workers named by DNS: every resolved address is polled, and the set follows DNS."""
from __future__ import annotations

import asyncio

import pytest

from tandem.router.discovery import follow, resolve, split_address


def test_addresses_split_and_reject():
    assert split_address("decode.ns.svc.cluster.local:50052") == ("decode.ns.svc.cluster.local", 50052)
    assert split_address("[::1]:7") == ("::1", 7)
    with pytest.raises(ValueError, match="not HOST:PORT"):
        split_address("decode-without-port")


def test_localhost_resolves_to_loopback():
    assert "127.0.0.1:9" in asyncio.run(resolve("localhost", 9))
    assert asyncio.run(resolve("no-such-host.invalid", 9)) == set()


def test_pollers_follow_the_resolved_set():
    """A name's addresses change between resolutions (pods of a headless Service come and go): a
    poller starts for each new address and stops for each one that left."""
    answers = [{"10.0.0.1:1", "10.0.0.2:1"}, {"10.0.0.2:1", "10.0.0.3:1"}, set()]
    running: set[str] = set()
    started: list[str] = []
    seen: list[set[str]] = []

    async def resolver(host: str, port: int) -> set[str]:
        assert (host, port) == ("pool.ns.svc", 1)
        seen.append(set(running))
        return answers[min(len(seen) - 1, len(answers) - 1)]

    async def poll(address: str) -> None:
        running.add(address)
        started.append(address)
        try:
            await asyncio.Event().wait()
        finally:
            running.discard(address)

    async def scenario() -> None:
        task = asyncio.ensure_future(follow("pool.ns.svc:1", poll, interval=0.01, resolver=resolver))
        while len(seen) < 4:
            await asyncio.sleep(0.005)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert seen[1] == {"10.0.0.1:1", "10.0.0.2:1"}
    assert seen[2] == {"10.0.0.2:1", "10.0.0.3:1"}
    assert seen[3] == set()
    assert sorted(started) == ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]  # 10.0.0.2 kept, not restarted
    assert running == set()


def test_literal_address_is_polled_directly():
    polled: list[str] = []

    async def poll(address: str) -> None:
        polled.append(address)

    async def never(host: str, port: int) -> set[str]:
        raise AssertionError("a literal address is not resolved")

    asyncio.run(follow("127.0.0.1:5", poll, resolver=never))
    assert polled == ["127.0.0.1:5"]
