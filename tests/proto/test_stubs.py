"""The committed gRPC stubs are exactly what `make proto` generates from the .proto sources."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _build():
    import importlib.util

    spec = importlib.util.spec_from_file_location("proto_build", ROOT / "proto" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_sources(tmp_path):
    fresh = {p.name: p.read_bytes() for p in _build().generate(tmp_path)}
    assert {"decode_pb2.py", "decode_pb2_grpc.py", "prefill_pb2.py", "router_pb2.py", "common_pb2.py"} <= set(fresh)
    committed = {p.name: p.read_bytes() for p in (ROOT / "proto").iterdir() if "_pb2" in p.name}
    stale = sorted(n for n in fresh if committed.get(n) != fresh[n])
    extra = sorted(set(committed) - set(fresh))
    assert not stale and not extra, f"run `make proto`: stale {stale}, no longer generated {extra}"


def test_stubs_import_under_the_tandem_namespace():
    from tandem.proto import decode_pb2, decode_pb2_grpc, router_pb2

    msg = decode_pb2.TransferMessage(chunk=decode_pb2.KVChunk(seq=3, data=b"\x00\x01", checksum=2**63 + 7))
    again = decode_pb2.TransferMessage.FromString(msg.SerializeToString())
    assert again.WhichOneof("body") == "chunk" and again.chunk.data == b"\x00\x01"
    assert again.chunk.checksum == 2**63 + 7  # 64 bits: XXH3-64
    assert router_pb2.WorkerState.DESCRIPTOR.file.name == "tandem/proto/router.proto"
    assert hasattr(decode_pb2_grpc, "DecodeServicer")


@pytest.mark.parametrize("name", ["common", "router", "decode", "prefill", "kvstore"])
def test_each_source_has_its_modules(name):
    assert (ROOT / "proto" / f"{name}_pb2.py").exists() and (ROOT / "proto" / f"{name}.proto").exists()
