"""The disk tier: DRAM evictions spill to it, reads promote back, its own LRU under its capacity,
corrupt files are dropped and counted, and a restarted store adopts what is on disk."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.kvstore.conftest import NS, block

FILE = 1020  # a 1000-byte block's file: a 20-byte header, then the payload


def files(root: Path) -> dict[int, int]:
    """block hash -> file size of the block files under the disk directory."""
    return {int(p.stem, 16): p.stat().st_size for p in (root / NS).glob("*.kvb")}


def test_dram_evictions_spill_to_disk_and_reads_promote_them_back(kvstore, tmp_path):
    kv = kvstore(capacity_bytes=2000, disk_dir=tmp_path, disk_capacity_bytes=2 * FILE)
    for i in (1, 2, 3):
        kv.put(i, block(i))
    assert files(tmp_path) == {1: FILE}  # the least recent left DRAM for disk
    assert kv.exists([1, 2, 3]).present == [True, True, True]
    got = kv.get(1)
    assert (got.found, got.tier, got.payload) == (True, "disk", block(1))
    assert files(tmp_path) == {2: FILE}  # 1 is back in DRAM (tiers are exclusive); 2 made room
    assert kv.get(1).tier == "dram"
    stats = kv.store.stats()
    assert stats.blocks == {"dram": 2, "disk": 1} and stats.used_bytes == {"dram": 2000, "disk": FILE}
    assert stats.hits == {"dram": 1, "disk": 1} and stats.evictions == {"dram": 2, "disk": 0}


def test_the_disk_tier_evicts_its_least_recent_block_at_its_capacity(kvstore, tmp_path):
    kv = kvstore(capacity_bytes=1000, disk_dir=tmp_path, disk_capacity_bytes=2 * FILE)
    for i in (1, 2, 3, 4):  # DRAM holds 4; 1, 2 and 3 spilled in that order; 1 fell off disk
        kv.put(i, block(i))
    assert files(tmp_path) == {2: FILE, 3: FILE}
    assert kv.exists([1, 2, 3, 4]).present == [False, True, True, True]
    assert not kv.get(1).found
    assert kv.get(2).payload == block(2)  # promoted: DRAM's 4 spills, disk now holds 3 and 4
    assert files(tmp_path) == {3: FILE, 4: FILE}
    stats = kv.store.stats()
    assert stats.used_bytes["disk"] == 2 * FILE <= stats.capacity_bytes["disk"]
    assert stats.evictions == {"dram": 4, "disk": 1} and stats.misses == 1


def _flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[500] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    _flip_payload_byte,
    lambda path: path.write_bytes(path.read_bytes()[:700]),  # torn
    lambda path: path.write_bytes(b"garbage" * 200),  # not a block file
    lambda path: path.unlink(),  # gone behind the store's back
])
def test_a_corrupt_disk_block_is_dropped_counted_and_missed(kvstore, tmp_path, damage):
    kv = kvstore(capacity_bytes=1000, disk_dir=tmp_path, disk_capacity_bytes=4 * FILE)
    kv.put(1, block(1))
    kv.put(2, block(2))  # 1 spills
    damage(tmp_path / NS / f"{1:016x}.kvb")
    assert kv.exists([1]).present == [True]  # exists trusts the index: files are checked when read
    assert kv.get(1).found is False
    assert not (tmp_path / NS / f"{1:016x}.kvb").exists()
    assert kv.exists([1]).present == [False]
    stats = kv.store.stats()
    assert (stats.corrupt_reads, stats.misses, stats.blocks["disk"], stats.used_bytes["disk"]) == (1, 1, 0, 0)
    assert kv.get(2).payload == block(2)  # the rest of the store is untouched


def test_a_restarted_store_adopts_the_disk_blocks(kvstore, tmp_path):
    first = kvstore(capacity_bytes=1000, disk_dir=tmp_path, disk_capacity_bytes=3 * FILE)
    for i in (1, 2, 3, 4):
        first.put(i, block(i))
    (tmp_path / NS / "junk.tmp").write_bytes(b"half a write")
    first.close()
    # a smaller disk this time: the oldest adopted file goes
    second = kvstore(capacity_bytes=1000, disk_dir=tmp_path, disk_capacity_bytes=2 * FILE)
    assert second.exists([1, 2, 3, 4]).present == [False, True, True, False]  # 4 was in DRAM only
    assert second.get(3).payload == block(3)
    assert not (tmp_path / NS / "junk.tmp").exists() and set(files(tmp_path)) == {2}


def test_a_disk_that_cannot_be_written_drops_blocks_not_puts(kvstore, tmp_path):
    """A broken disk tier (here a plain file where the namespace's folder goes, as a read-only mount would
    fail too): blocks spilled to it are dropped and counted gone, and every put still succeeds."""
    (tmp_path / NS).write_text("not a folder")
    kv = kvstore(capacity_bytes=1000, disk_dir=tmp_path, disk_capacity_bytes=4 * FILE)
    for i in (1, 2, 3):
        kv.put(i, block(i))  # 2 and 3 push 1, then 2, out of DRAM: their disk writes fail
    assert kv.exists([1, 2, 3]).present == [False, False, True]
    stats = kv.store.stats()
    assert stats.blocks == {"dram": 1, "disk": 0} and stats.puts["stored"] == 3
