"""Put, Get and Exists over gRPC against a DRAM-only store: roundtrip, LRU order under the hard
capacity, refusals (too large, checksum, bad keys, mismatched layout), namespaces, prefix lengths."""
from __future__ import annotations

import grpc
import pytest

from tandem.proto import common_pb2
from tests.kvstore.conftest import NS, block, put_request


def test_put_get_roundtrip(kvstore):
    kv = kvstore()
    assert kv.put(1, block(1)).existed is False
    got = kv.get(1)
    assert (got.found, got.payload, got.tier) == (True, block(1), "dram")
    assert got.crc32 == put_request(1, block(1)).crc32
    assert kv.get(2).found is False
    # a second put of the same block replaces it and says so; the store still holds one copy
    assert kv.put(1, block(1)).existed is True
    assert kv.store.stats().blocks == {"dram": 1} and kv.store.stats().used_bytes == {"dram": 1000}


def test_lru_eviction_order_under_the_capacity(kvstore):
    kv = kvstore(capacity_bytes=3000)
    for i in (1, 2, 3):
        kv.put(i, block(i))
    assert kv.get(1).found  # 1 is now the most recent: 2 is the least
    kv.put(4, block(4))
    assert kv.exists([1, 2, 3, 4]).present == [True, False, True, True]
    kv.put(5, block(5))  # then 3
    assert kv.exists([1, 2, 3, 4, 5]).present == [True, False, False, True, True]
    stats = kv.store.stats()
    assert stats.used_bytes["dram"] == 3000 <= stats.capacity_bytes["dram"]
    assert stats.evictions == {"dram": 2}
    assert kv.get(4).payload == block(4)


def test_a_block_larger_than_the_capacity_is_refused(kvstore):
    kv = kvstore(capacity_bytes=3000)
    kv.put(1, block(1))
    with pytest.raises(grpc.RpcError) as err:
        kv.put(2, block(2, size=3001))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "exceeds the store's DRAM capacity" in err.value.details() and "3001 bytes" in err.value.details()
    assert kv.get(1).found and not kv.get(2).found  # nothing was evicted for it
    assert kv.store.stats().puts == {"stored": 1, "too_large": 1}


def test_a_checksum_mismatch_is_refused(kvstore):
    kv = kvstore()
    good = put_request(1, block(1)).crc32
    with pytest.raises(grpc.RpcError) as err:
        kv.stub.Put(put_request(1, block(1), crc32=good ^ 1), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "checksum mismatch" in err.value.details() and f"{good:#010x}" in err.value.details()
    assert not kv.get(1).found
    assert kv.store.stats().puts == {"checksum_mismatch": 1}


@pytest.mark.parametrize("ns, block_hash, payload, wanted", [
    ("../etc", 1, b"x", "compat_hash '../etc'"),  # also a directory name on disk: never a path
    ("", 1, b"x", "compat_hash ''"),
    ("a" * 65, 1, b"x", "compat_hash"),
    (NS, 1, b"", "empty payload"),
])
def test_bad_requests_are_refused_with_invalid_argument(kvstore, ns, block_hash, payload, wanted):
    kv = kvstore()
    with pytest.raises(grpc.RpcError) as err:
        kv.put(block_hash, payload, ns=ns)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and wanted in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        kv.exists([1], ns="../etc")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_incompatible_namespaces_never_mix(kvstore):
    kv = kvstore()
    kv.put(7, block(1), ns="layoutA")
    kv.put(7, block(2), ns="layoutB")  # the same prefix hash, computed by another model or layout
    assert kv.get(7, ns="layoutA").payload == block(1)
    assert kv.get(7, ns="layoutB").payload == block(2)
    assert not kv.get(7, ns="layoutC").found
    assert kv.exists([7], ns="layoutC").present == [False]
    # a layout that is sent along must be the namespace's own
    layout = common_pb2.LayoutDescriptor(compat_hash="layoutB", block_size=16)
    with pytest.raises(grpc.RpcError) as err:
        kv.stub.Put(put_request(8, block(8), ns="layoutA", layout=layout), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "layout compat_hash 'layoutB' != key compat_hash 'layoutA'" in err.value.details()
    assert not kv.get(8, ns="layoutA").found
    assert kv.stub.Put(put_request(8, block(8), ns="layoutB", layout=layout), timeout=5).existed is False


def test_exists_reports_each_hash_and_the_loadable_prefix(kvstore):
    kv = kvstore(capacity_bytes=3000)
    for h in (11, 12, 14):
        kv.put(h, block(h))
    reply = kv.exists([11, 12, 13, 14])
    assert list(reply.present) == [True, True, False, True]
    assert reply.prefix_blocks == 2  # 14 is held but unreachable without 13
    assert kv.exists([13, 11]).prefix_blocks == 0
    assert kv.exists([11, 12]).prefix_blocks == 2
    assert kv.exists([]).prefix_blocks == 0
    # probing does not refresh recency: 11 is still the least recent and goes first
    kv.put(15, block(15))
    assert list(kv.exists([11, 12, 14, 15]).present) == [False, True, True, True]
    with pytest.raises(grpc.RpcError) as err:
        kv.exists(list(range(65537)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 65536" in err.value.details()
