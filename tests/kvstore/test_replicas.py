"""Which replica of the KV store holds a block (kvstore/replicas.py): each block on one replica, the same
for every client, shares about equal, and a replica leaving moves only its own blocks."""
from __future__ import annotations

import asyncio
import random

import pytest

from tandem.kvstore.replicas import Replicas, parse

ADDRESSES = ["10.0.0.1:50060", "10.0.0.2:50060", "10.0.0.3:50060"]


def test_blocks_spread_evenly_and_a_leaving_replica_moves_only_its_own():
    rng = random.Random(7)
    hashes = [rng.getrandbits(64) for _ in range(3000)]
    three = Replicas(",".join(ADDRESSES))
    shares = three.split(hashes)
    assert sorted(shares) == ADDRESSES
    assert all(800 < len(share) < 1200 for share in shares.values()), {a: len(s) for a, s in shares.items()}
    assert Replicas(",".join(reversed(ADDRESSES))).split(hashes) == shares  # the order written does not matter
    two = Replicas(",".join(ADDRESSES[:2]))
    moved = [h for h in hashes if three.owner(h) != two.owner(h)]
    assert set(moved) == set(shares[ADDRESSES[2]])  # only the gone replica's blocks find a new home


def test_one_replica_holds_everything_and_names_resolve():
    assert Replicas("10.0.0.9:1").split([1, 2, 3]) == {"10.0.0.9:1": [1, 2, 3]}
    named = Replicas("localhost:50060")
    assert not named.static and named.owner(5) is None  # nothing known before the name resolves
    assert asyncio.run(named.refresh())
    assert "127.0.0.1:50060" in named.addresses and named.owner(5) in named.addresses


@pytest.mark.parametrize("bad", ["", " , ", "nohost", "host:port"])
def test_bad_addresses_are_refused(bad):
    with pytest.raises(ValueError):
        parse(bad)
