"""`tandem kvstore` as its pod runs it: a real process that reports ready, answers /health and
gRPC, reads sizes with suffixes, and exits 0 promptly on SIGTERM with an event stream open."""
from __future__ import annotations

import re
import signal
import subprocess
import tempfile
import time
import zlib

import grpc
import httpx
import pytest

from tandem.launcher import tandem_command
from tandem.proto import kvstore_pb2 as pb
from tandem.proto import kvstore_pb2_grpc
from tandem.worker.process import free_port
from tests.kvstore.conftest import NS, block, put_request


def start(*args: str) -> tuple[subprocess.Popen, str]:
    """The process and its first stdout line (TANDEM_READY, or whatever it printed before dying)."""
    proc = subprocess.Popen([*tandem_command(), "kvstore", "--host", "127.0.0.1", *args], cwd=tempfile.gettempdir(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline()


def test_the_process_serves_and_stops_on_sigterm(tmp_path):
    port = free_port()
    proc, ready = start("--port", str(port), "--capacity-bytes", "2KiB", "--disk-dir", str(tmp_path),
                        "--disk-capacity-bytes", "1MB")
    try:
        match = re.fullmatch(rf"TANDEM_READY role=kvstore grpc=127\.0\.0\.1:{port} http_port=(\d+) pid=\d+\n", ready)
        assert match, ready + proc.stderr.read() if proc.poll() is not None else ready
        http = f"http://127.0.0.1:{match[1]}"
        assert httpx.get(f"{http}/health", timeout=5).status_code == 200
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kvstore_pb2_grpc.KVStoreStub(channel)
            events = stub.Events(pb.EventsRequest(compat_hash=NS), timeout=10)
            deadline = time.monotonic() + 5
            while "tandem:kvstore_event_subscribers 1.0" not in httpx.get(f"{http}/metrics", timeout=5).text:
                assert time.monotonic() < deadline, "the Events stream never subscribed"
                time.sleep(0.02)
            for i in (1, 2, 3):  # 2 KiB of DRAM holds two: 1 goes to disk
                stub.Put(put_request(i, block(i)), timeout=5)
            got = stub.Get(pb.GetRequest(key=pb.BlockKey(compat_hash=NS, block_hash=1)), timeout=5)
            assert (got.found, got.tier, got.payload, got.crc32) == (True, "disk", block(1), zlib.crc32(block(1)))
            assert "tandem:kvstore_hits_total{tier=\"disk\"} 1.0" in httpx.get(f"{http}/metrics", timeout=5).text
            assert [list(next(events).block_hashes) for _ in range(3)] == [[1], [2], [3]]  # a spill is no event
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert proc.wait(10) == 0
            assert time.monotonic() - started < 2  # the open stream did not hold the shutdown
            with pytest.raises((StopIteration, grpc.RpcError)):
                for _ in range(10):
                    next(events)
        assert "kvstore stopping" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args, wanted", [
    (["--capacity-bytes", "lots"], "not a byte size: 'lots'"),
    (["--capacity-bytes", "0GiB"], "must be over 0 bytes"),
    (["--disk-dir", "/tmp/x"], "--disk-dir and --disk-capacity-bytes go together"),
])
def test_bad_flags_exit_2_naming_the_problem(args, wanted):
    proc = subprocess.run([*tandem_command(), "kvstore", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and wanted in proc.stderr
