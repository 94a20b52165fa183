"""The same-host shared-memory KV transport with real processes: decode stages each lease in a
/dev/shm file, prefill writes chunk bytes there and sends only control over gRPC. Outputs equal
the colocated engine's; the metrics say `shm`; `--kv-transport grpc`, or a staging area prefill
cannot open, falls back to bytes over gRPC; a corrupted staged chunk is sent again (or fails as
`checksum`); an expired lease refuses the late transfer and its staging file goes back to the
pool. These stacks are also test_faults.py's cases for corrupted chunks and expiring leases (the
default transport between workers on one host is this one). The stack fixture checks that no staging
file but idle pooled ones and no KV block is left after each test, and no file at all once the stack
stopped."""
from __future__ import annotations

import threading
import time

import pytest

from tandem.engine.kv_transfer.shm import is_idle, staged_files
from tests.disagg.conftest import router_log, total
from tests.disagg.test_faults import SMALL_CHUNKS, complete, decisions, model, prompt, reference  # noqa: F401


def transfers(s, worker: str, transport: str, outcome: str = "success") -> float:
    return total(s.metrics(worker), "tandem:kv_transfers_total", outcome=outcome, transport=transport)


def two_prompts_over(s, model, reference, transport: str, seeds: tuple[int, int]) -> None:
    """Two prompts through the stack equal the colocated engine's, both moved by `transport` on both workers."""
    for seed in seeds:
        ids = prompt(seed)
        assert complete(s, model, ids) == reference(ids, 16)
    for worker in ("prefill-0", "decode-0"):
        assert transfers(s, worker, transport) == 2, worker
        assert transfers(s, worker, "grpc") == 0, worker


@pytest.mark.parametrize("stream", ["layer", "step"])
def test_shm_transfer_equals_colocated_and_is_labelled_shm(stack_factory, model, reference, stream):
    s = stack_factory(model, 1, 1, worker_args=[*SMALL_CHUNKS, "--kv-stream", stream])
    two_prompts_over(s, model, reference, "shm", (20, 21))
    assert total(s.metrics("prefill-0"), "tandem:kv_transfer_throughput_gbps_count", transport="shm") == 2
    assert total(s.metrics(), "tandem:kv_transfer_bytes_total", transport="shm") > 0
    assert "transport=shm" in router_log(s)
    assert decisions(s, "remote") == 2
    files = staged_files(s.child("decode-0").pid)
    assert len(files) == 1 and is_idle(files[0]), files  # the second lease reused the first one's area


@pytest.mark.parametrize("how", ["forced", "decode_only", "unopenable"])
def test_falls_back_to_grpc(stack_factory, model, reference, how):
    kwargs = {"forced": dict(worker_args=["--kv-transport", "grpc"]),
              "decode_only": dict(child_args={"decode-0": ["--kv-transport", "grpc"],
                                              "prefill-0": ["--kv-transport", "shm"]}),
              "unopenable": dict(env={"prefill-0": {"TANDEM_FAULTS": "kv.shm_open_fails"}})}[how]
    s = stack_factory(model, 1, 1, **kwargs)
    ids = prompt(22)
    assert complete(s, model, ids) == reference(ids, 16)
    for worker in ("prefill-0", "decode-0"):
        assert transfers(s, worker, "grpc") == 1, worker
        assert transfers(s, worker, "shm") == 0, worker
    assert "transport=grpc" in router_log(s)


def test_corrupted_staged_chunk_is_sent_again(stack_factory, model, reference):
    s = stack_factory(model, 1, 1, worker_args=SMALL_CHUNKS, env={"prefill-0": {"TANDEM_FAULTS": "kv.corrupt_chunk=3"}})
    ids = prompt(23)
    assert complete(s, model, ids) == reference(ids, 16)
    for worker in ("prefill-0", "decode-0"):
        m = s.metrics(worker)
        assert total(m, "tandem:kv_transfer_retransmits_total") == 1, worker  # once, on any transport
        assert total(m, "tandem:kv_transfer_retransmits_total", transport="shm") == 1, worker
        assert transfers(s, worker, "shm") == 1, worker
    assert decisions(s, "remote") == 1


def test_always_corrupted_staged_transfer_fails_then_falls_back(stack_factory, model, reference):
    s = stack_factory(model, 1, 1, worker_args=SMALL_CHUNKS, env={"prefill-0": {"TANDEM_FAULTS": "kv.corrupt_all"}})
    ids = prompt(24)
    assert complete(s, model, ids) == reference(ids, 16)  # never wrong tokens
    prefill = s.metrics("prefill-0")
    assert total(prefill, "tandem:kv_transfer_failures_total", failure_class="checksum") == 1  # any transport
    assert total(prefill, "tandem:kv_transfer_failures_total", failure_class="checksum", transport="shm") == 1
    assert total(s.metrics(), "tandem:router_prefill_decisions_total", decision="fallback") == 1
    assert "arrived corrupted" in router_log(s)


def test_expired_lease_refuses_the_late_staged_transfer_and_gives_its_file_back(stack_factory, model, reference):
    s = stack_factory(model, 1, 1, router_args=["--lease-seconds", "1"],
                      env={"prefill-0": {"TANDEM_FAULTS": "kv.delay_close=2.5"}})
    decode_pid = s.child("decode-0").pid
    ids = prompt(25)
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:  # the lease's staging file exists while its transfer runs
        while not done.is_set():
            seen.extend(str(f) for f in staged_files(decode_pid))
            time.sleep(0.01)  # a poll, not a wait: the file lives >= 1 s (lease 1 s, close delayed 2.5 s)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert complete(s, model, ids) == reference(ids, 16)
    finally:
        done.set()
        watcher.join()
    assert seen, "no staging file was made for the lease"
    assert all(is_idle(f) for f in staged_files(decode_pid)), "the expired lease still holds its staging file"
    for worker in ("prefill-0", "decode-0"):
        m = s.metrics(worker)
        for labels in ({}, {"transport": "shm"}):  # once in all, and that once over shm
            assert total(m, "tandem:kv_transfer_failures_total", failure_class="lease_refused", **labels) == 1, worker
    assert total(s.metrics(), "tandem:router_prefill_decisions_total", decision="fallback",
                 reason="lease_expired") == 1
