"""TransferKV's hand-framed chunk data reads and writes plain protobuf, both ways."""
import os

import pytest

from tandem.proto import decode_pb2
from tandem.rpc import kv_wire


def test_outgoing_chunk_is_protobuf() -> None:
    data = os.urandom(300_000)
    header = decode_pb2.KVChunk(seq=7, layer=3, token_start=16, num_tokens=5, checksum=2**63 + 5)
    raw = kv_wire.serialize(kv_wire.OutgoingChunk(header, memoryview(data)))
    parsed = decode_pb2.TransferMessage.FromString(raw)
    assert parsed.WhichOneof("body") == "chunk"
    assert parsed.chunk.data == data
    assert (parsed.chunk.seq, parsed.chunk.layer, parsed.chunk.token_start, parsed.chunk.num_tokens,
            parsed.chunk.checksum) == (7, 3, 16, 5, 2**63 + 5)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 70_000])
def test_protobuf_chunk_is_read_without_copy(size: int) -> None:
    data = os.urandom(size)
    msg = decode_pb2.TransferMessage(chunk=decode_pb2.KVChunk(seq=1, layer=2, token_start=3, num_tokens=4,
                                                              data=data, checksum=9, staged=False))
    raw = msg.SerializeToString()
    incoming = kv_wire.deserialize(raw)
    assert bytes(incoming.data) == data
    assert incoming.message.chunk.data == b""  # the data is only in the view
    assert incoming.message.chunk.layer == 2 and incoming.message.chunk.checksum == 9
    if size:
        assert incoming.data.obj is raw  # a view into gRPC's buffer, not a copy


def test_other_messages_and_truncation() -> None:
    opened = decode_pb2.TransferMessage(open=decode_pb2.TransferOpen(lease_id="lease-1", transport="shm"))
    assert kv_wire.deserialize(kv_wire.serialize(opened)).message == opened
    closed = decode_pb2.TransferMessage(close=decode_pb2.TransferClose(num_chunks=3))
    assert kv_wire.deserialize(closed.SerializeToString()).message == closed
    raw = kv_wire.serialize(kv_wire.OutgoingChunk(decode_pb2.KVChunk(seq=1), b"x" * 1000))
    with pytest.raises(ValueError, match="truncated"):
        kv_wire.deserialize(raw[:-10])
