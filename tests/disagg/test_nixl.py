"""The NIXL KV transport with real processes: decode stages each lease in its buffer registered with NIXL,
prefill WRITEs chunk bytes there through NIXL (UCX over loopback here) and sends only control over gRPC.
Outputs equal the colocated engine's, the metrics say `nixl`, a corrupted staged chunk is sent again, and a
decode that offers NIXL to a prefill told to use gRPC gets bytes over gRPC."""
from __future__ import annotations

import pytest

from tandem.engine.kv_transfer import nixl_staging
from tests.disagg.conftest import router_log, total
from tests.disagg.test_faults import SMALL_CHUNKS, complete, decisions, model, prompt, reference  # noqa: F401
from tests.disagg.test_shm import transfers, two_prompts_over

pytestmark = pytest.mark.skipif(not nixl_staging.available(), reason="NIXL is not installed (pip install nixl)")
UCX = {"UCX_TLS": "shm,self,tcp", "UCX_NET_DEVICES": "lo", "NIXL_LOG_LEVEL": "WARN"}


def _stack(stack_factory, model, prefill_args=(), prefill_env=None):
    return stack_factory(model, 1, 1, worker_args=SMALL_CHUNKS,
                         child_args={"decode-0": ["--kv-transport", "nixl", "--kv-nixl-bytes", str(64 << 20)],
                                     "prefill-0": list(prefill_args)},
                         env={"decode-0": UCX, "prefill-0": {**UCX, **(prefill_env or {})}})


def test_nixl_transfer_equals_colocated_and_is_labelled_nixl(stack_factory, model, reference):
    s = _stack(stack_factory, model)
    two_prompts_over(s, model, reference, "nixl", (30, 31))
    assert "transport=nixl" in router_log(s)
    assert decisions(s, "remote") == 2


def test_a_corrupted_chunk_written_over_nixl_is_sent_again(stack_factory, model, reference):
    s = _stack(stack_factory, model, prefill_env={"TANDEM_FAULTS": "kv.corrupt_chunk=3"})
    ids = prompt(32)
    assert complete(s, model, ids) == reference(ids, 16)
    for worker in ("prefill-0", "decode-0"):
        assert total(s.metrics(worker), "tandem:kv_transfer_retransmits_total", transport="nixl") == 1, worker
        assert transfers(s, worker, "nixl") == 1, worker


def test_a_prefill_told_grpc_ignores_the_nixl_offer(stack_factory, model, reference):
    s = _stack(stack_factory, model, prefill_args=["--kv-transport", "grpc"])
    ids = prompt(33)
    assert complete(s, model, ids) == reference(ids, 16)
    assert transfers(s, "prefill-0", "grpc") == 1 and transfers(s, "prefill-0", "nixl") == 0
