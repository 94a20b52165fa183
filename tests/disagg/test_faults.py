"""Faults on the disaggregated path, each with real processes: kill -9, SIGSTOP (a worker that
never answers), incompatible workers, clients that leave. Corrupted chunks and expiring leases are in
test_shm.py: the same-host transport is the one these stacks use by default.
Every case ends in a normal response (equal to the colocated engine's) or a clear error, never a
hang; afterwards no worker holds a KV block and no process is left (the stack fixture checks)."""
from __future__ import annotations

import signal
import threading
import time

import grpc
import httpx
import openai
import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.proto import common_pb2, prefill_pb2, prefill_pb2_grpc, router_pb2, router_pb2_grpc
from tests.disagg.conftest import router_log, total

SMALL_CHUNKS = ["--kv-chunk-bytes", "2048"]  # tiny model: 8 tokens a chunk, so transfers have many chunks


@pytest.fixture(scope="module")
def model(tiny_model_dirs) -> str:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def reference(model):
    llm = LLM(model, dtype="float32")

    def greedy(prompt: list[int], max_tokens: int) -> str:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        return llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].text

    return greedy


def prompt(seed: int, n: int = 200) -> list[int]:
    return torch.randint(3, 49000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def complete(s, model: str, ids: list[int], max_tokens: int = 16) -> str:
    r = s.openai().completions.create(model=model, prompt=ids, max_tokens=max_tokens, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == max_tokens
    return r.choices[0].text


def decisions(s, decision: str) -> float:
    return total(s.metrics(), "tandem:router_prefill_decisions_total", decision=decision)


def test_prefill_killed_mid_transfer_retries_on_another(stack_factory, model, reference):
    s = stack_factory(model, 2, 1, worker_args=SMALL_CHUNKS,
                      env={"prefill-0": {"TANDEM_FAULTS": "prefill.kill_after_chunks=5"}})
    ids = prompt(1)
    assert complete(s, model, ids) == reference(ids, 16)
    assert s.child("prefill-0").proc.wait(10) == -signal.SIGKILL  # it really died, mid-transfer
    m = s.metrics()
    assert total(m, "tandem:router_prefill_retries_total") == 1
    assert decisions(s, "remote") == 1
    assert "prefill-1" in router_log(s) and "failure_class=none" in router_log(s)


def test_prefill_killed_with_no_other_falls_back_to_decode(stack_factory, model, reference):
    s = stack_factory(model, 1, 1, worker_args=SMALL_CHUNKS,
                      env={"prefill-0": {"TANDEM_FAULTS": "prefill.kill_after_chunks=3"}})
    ids = prompt(2)
    assert complete(s, model, ids) == reference(ids, 16)
    m = s.metrics()
    assert total(m, "tandem:router_prefill_decisions_total", decision="fallback", reason="prefill_failed") == 1
    assert total(m, "tandem:kv_transfer_failures_total", failure_class="prefill_lost") == 1


def _stream_then(s, model, ids, max_tokens, after_chunks, action) -> tuple[str, float]:
    """Stream a completion; after `after_chunks` chunks run `action`; return the text and how long
    the rest took."""
    stream = s.openai().completions.create(model=model, prompt=ids, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
    text, n, acted = "", 0, None
    for chunk in stream:
        text += "".join(c.text for c in chunk.choices)
        n += 1
        if n == after_chunks:
            action()
            acted = time.monotonic()
    return text, time.monotonic() - acted


def _serving(s, role: str) -> str:
    busy = [w["worker_id"] for w in s.workers() if w["role"] == role and w["in_flight"]]
    assert len(busy) == 1, s.workers()
    return busy[0]


def test_decode_killed_mid_stream_resumes_on_another(stack_factory, model, reference):
    # the decode worker serving the request kills itself (-9) after 10 tokens: timed from inside, so a fast
    # tiny model cannot finish the stream before the test's client gets round to killing it
    die = {"TANDEM_FAULTS": "decode.kill_after_tokens=10"}
    s = stack_factory(model, 1, 2, env={"decode-0": die, "decode-1": die})
    ids = prompt(3, 40)
    text, _ = _stream_then(s, model, ids, 400, 1, lambda: None)
    assert text == reference(ids, 400)  # nothing repeated, nothing lost
    dead = [name for name in ("decode-0", "decode-1") if s.child(name).proc.poll() == -signal.SIGKILL]
    assert len(dead) == 1, dead
    assert total(s.metrics(), "tandem:router_decode_failovers_total") == 1
    assert "failovers=1" in router_log(s)


def test_no_decode_left_ends_the_stream_with_an_error(stack_factory, model):
    s = stack_factory(model, 1, 1, check_idle=False)
    started = time.monotonic()
    with pytest.raises(openai.APIError, match="no decode worker"):
        _stream_then(s, model, prompt(4, 40), 400, 5, lambda: s.kill("decode-0"))
    assert time.monotonic() - started < 30
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["message"]


def test_client_disconnect_frees_blocks_on_both_workers(stack_factory, model):
    """A client that leaves before its first token, then one that leaves mid-stream (one stack: each
    case is checked idle before the next starts)."""
    s = stack_factory(model, 1, 1, worker_args=SMALL_CHUNKS)
    for seed, when in ((5, "before_first_token"), (13, "mid_stream")):
        body = {"model": model, "prompt": prompt(seed, 100), "max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            if when == "mid_stream":
                lines = r.iter_lines()
                for _ in range(6):
                    next(lines)
        s.wait_idle(timeout=10)  # both workers: no KV block held, nothing running or waiting
        decode = s.metrics("decode-0")
        assert decode["tandem:kv_cache_usage_perc"] == 0 and decode["tandem:num_requests_running"] == 0, when


def test_incompatible_workers_are_never_paired(stack_factory, model, reference):
    s = stack_factory(model, 1, 1, child_args={"prefill-0": ["--dtype", "bfloat16"]})
    ids = prompt(8)
    assert complete(s, model, ids) == reference(ids, 16)
    m = s.metrics()
    assert total(m, "tandem:router_prefill_decisions_total", decision="fallback", reason="no_compatible_prefill") == 1
    # asked directly, the prefill worker refuses the pair and names the mismatch
    addresses = {w["worker_id"]: w["address"] for w in s.workers()}
    with grpc.insecure_channel(addresses["decode-0"]) as ch:
        state = router_pb2_grpc.WorkerStub(ch).GetState(router_pb2.StateRequest())
    ticket = common_pb2.Ticket(request_id="x", lease_id="lease-x", endpoint=addresses["decode-0"],
                               layout=state.info.layout, num_tokens=10)
    with grpc.insecure_channel(addresses["prefill-0"]) as ch, pytest.raises(grpc.RpcError) as err:
        prefill_pb2_grpc.PrefillStub(ch).Prefill(prefill_pb2.PrefillRequest(
            request_id="x", prompt_token_ids=ids[:11], ticket=ticket), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "dtype 'bfloat16' != 'float32'" in err.value.details()


def test_prefill_that_never_answers_is_dropped(stack_factory, model, reference):
    s = stack_factory(model, 1, 1)
    s.kill("prefill-0", signal.SIGSTOP)
    ids = prompt(10)
    started = time.monotonic()
    assert complete(s, model, ids) == reference(ids, 16)
    assert time.monotonic() - started < 15
    assert not [w for w in s.workers() if w["worker_id"] == "prefill-0" and w["healthy"]]
    s.kill("prefill-0", signal.SIGCONT)
    s.wait_ready(timeout=30)  # it heartbeats again and rejoins
    assert complete(s, model, prompt(11)) == reference(prompt(11), 16)
    assert decisions(s, "remote") >= 1


def test_decode_that_stops_answering_mid_stream_is_replaced(stack_factory, model, reference):
    # the decode worker serving the request freezes itself (SIGSTOP) after 10 tokens, as above
    freeze = {"TANDEM_FAULTS": "decode.stop_after_tokens=10"}
    s = stack_factory(model, 1, 2, env={"decode-0": freeze, "decode-1": freeze})
    ids = prompt(12, 40)
    started = time.monotonic()
    text, _ = _stream_then(s, model, ids, 400, 1, lambda: None)
    assert text == reference(ids, 400)
    assert time.monotonic() - started < 30
    stopped = [name for name in ("decode-0", "decode-1") if _state(s.child(name).pid) == "T"]
    assert len(stopped) == 1, stopped  # the one that served first; the other took over and went on
    for name in ("decode-0", "decode-1"):
        s.kill(name, signal.SIGCONT)


def _state(pid: int) -> str:
    """A process's state letter from /proc (T: stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_decode_that_stops_answering_during_its_remote_prefill_is_replaced(stack_factory, model, reference):
    """The decode worker holding a lease freezes while a prefill worker fills it: once the pool takes that
    decode worker out, the prefill call into its lease is cancelled too (waiting on it could last the
    whole prefill timeout) and the request starts over on the other decode worker, with the same text."""
    s = stack_factory(model, 1, 2, env={"prefill-0": {"TANDEM_FAULTS": "kv.delay_close=3"}})
    ids = prompt(13)
    frozen = []

    def freeze() -> None:
        time.sleep(1.0)  # the prompt's KV is written; its transfer waits 3 s before it closes
        frozen.append(s.kill(_serving(s, "decode"), signal.SIGSTOP))

    started = time.monotonic()
    thread = threading.Thread(target=freeze)
    thread.start()
    try:
        assert complete(s, model, ids) == reference(ids, 16)
        assert time.monotonic() - started < 20  # prefill timeout: 60 s
    finally:
        thread.join()
        for name in ("decode-0", "decode-1"):
            s.kill(name, signal.SIGCONT)
    assert frozen and "left the pool during the prefill" in router_log(s)
