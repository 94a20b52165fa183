"""Which replica of the prefix KV store holds a block, as its clients (workers, the router) see it.

A store address is `HOST:PORT[,HOST:PORT...]`; a HOST that is a DNS name (the operator's headless Service)
stands for every address it resolves to, re-resolved every few seconds. Replicas share nothing: each
block lives on one, picked by rendezvous hashing of its hash over the replica addresses, so every client
with the same replica set files and finds a block in the same place, and a replica joining or leaving
moves only its own share of the blocks (those become misses: the store is a cache).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Iterable

from tandem.router.discovery import is_literal, resolve, split_address

log = logging.getLogger("tandem.kvstore")
MASK = (1 << 64) - 1


def parse(value: str) -> list[str]:
    """The comma-separated HOST:PORT entries of a store address (ValueError names a bad one)."""
    entries = [entry.strip() for entry in value.split(",") if entry.strip()]
    if not entries:
        raise ValueError(f"KV store address {value!r} names no HOST:PORT")
    for entry in entries:
        split_address(entry)
    return entries


def address_argument(value: str) -> str:
    """argparse's type for a store address: checked, kept as written ('' for none)."""
    import argparse

    if not value:
        return value
    try:
        parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _mix(x: int) -> int:
    """splitmix64's finalizer: a cheap, well-spread 64-bit hash of an integer."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & MASK
    return x ^ (x >> 31)


def _seed(address: str) -> int:
    seed = 0
    for byte in address.encode():
        seed = _mix(seed ^ byte)
    return seed


class Replicas:
    """The replica set behind a store address, and the replica of each block."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.entries = parse(value)
        self.static = all(is_literal(split_address(e)[0]) for e in self.entries)
        self._set(self.entries if self.static else [])

    def _set(self, addresses: Iterable[str]) -> None:
        self.addresses = sorted(set(addresses))
        self._seeds = [(_seed(a), a) for a in self.addresses]

    def owner(self, block_hash: int) -> str | None:
        """The replica that holds `block_hash` (None while no replica is known)."""
        if len(self._seeds) == 1:
            return self.addresses[0]
        best = max(self._seeds, key=lambda seeded: _mix(seeded[0] ^ block_hash), default=None)
        return best and best[1]

    def split(self, block_hashes: Iterable[int]) -> dict[str, list[int]]:
        """`block_hashes` by the replica that holds each, in their order."""
        out: dict[str, list[int]] = {}
        for h in block_hashes:
            owner = self.owner(h)
            if owner is not None:
                out.setdefault(owner, []).append(h)
        return out

    async def refresh(self) -> bool:
        """Resolve the DNS names again; whether the replica set changed."""
        if self.static:
            return False
        found: set[str] = set()
        for entry in self.entries:
            host, port = split_address(entry)
            found |= {entry} if is_literal(host) else await resolve(host, port)
        if sorted(found) == self.addresses:
            return False
        log.info("KV store %s: replicas %s", self.value, sorted(found) or "none resolved")
        self._set(found)
        return True

    async def follow(self, interval: float = 5.0) -> None:
        """Keep the replica set current until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(interval)
