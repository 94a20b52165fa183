"""KV handoff between two engines in one process (no transport): a producer engine computes
prompts and streams their KV layer by layer, a consumer engine takes it into leased blocks and
decodes. Outputs must equal a colocated engine's, token for token; leases must end cleanly."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from tandem import SamplingParams
from tandem.config import CacheConfig, EngineConfig, SchedulerConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.kv_transfer import codec
from tandem.engine.kv_transfer.codec import KVChunkData, checksum
from tandem.engine.kv_transfer.consumer import LeaseError


class Recorder:
    """A sink that keeps chunks, as a transport's send queue would."""

    def __init__(self) -> None:
        self.chunks: list[KVChunkData] = []
        self.finished = False
        self.first = None

    def put(self, chunk: KVChunkData) -> None:
        self.chunks.append(chunk.seal())

    def finish(self, first=None) -> None:
        self.finished, self.first = True, first


def produce(prefill: LLMEngine, rid: str, lease, ids: list[int], params: SamplingParams, sink: Recorder) -> None:
    """What a prefill worker does with a ticket: the whole prompt and a sampled first token when the
    lease wants it, else all but the last token."""
    if lease.wants_first:
        prefill.add_kv_request(rid, ids, sink, lease.skip_tokens, params)
    else:
        prefill.add_kv_request(rid, ids[:-1], sink, lease.skip_tokens)


def deliver(decode: LLMEngine, lease, sink: Recorder, transfer_id: str = "t") -> None:
    decode.consumer.open(lease.lease_id, transfer_id, decode.layout)
    for chunk in sink.chunks:
        decode.consumer.write(lease.lease_id, transfer_id, chunk)
    decode.consumer.close(lease.lease_id, transfer_id, sink.first)


def engine(path: str, role: str | None, blocks: int = 256, budget: int = 2048, **cache) -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, dtype="float32", kv_role=role,
                                  cache=CacheConfig(num_gpu_blocks=blocks, **cache),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=budget)))


def run(e: LLMEngine) -> dict:
    done = {}
    while e.has_unfinished_requests():
        for out in e.step():
            if out.finished:
                done[out.request_id] = out
    return done


def handoff(prefill: LLMEngine, decode: LLMEngine, prompts: list[list[int]], params: SamplingParams,
            chunk_bytes: int | None = None) -> dict:
    """Every prompt through prefill -> decode, chunks delivered after prefill finished them."""
    if chunk_bytes:
        prefill.producer.max_chunk_bytes = chunk_bytes
    leases, sinks = {}, {}
    for i, ids in enumerate(prompts):
        lease = decode.add_remote_request(f"r{i}", ids, params)
        assert lease is not None and lease.block_ids
        leases[i], sinks[i] = lease, Recorder()
        produce(prefill, f"p{i}", lease, ids, params, sinks[i])
    finished = run(prefill)
    assert all(o.outputs[0].finish_reason == "prefilled" and not o.outputs[0].token_ids for o in finished.values())
    for i, lease in leases.items():
        assert sinks[i].finished and (sinks[i].first is not None) == lease.wants_first
        for chunk in sinks[i].chunks:
            assert chunk.intact() and len(chunk.data) <= max(chunk_bytes or codec.DEFAULT_CHUNK_BYTES,
                                                             prefill.layout.token_bytes)
        deliver(decode, lease, sinks[i])
    out = run(decode)
    assert not decode.consumer.leases
    for e in (prefill, decode):
        assert e.kv.pool.num_free == e.kv.pool.num_blocks, "leaked KV blocks"
    return {int(k[1:]): v.outputs[0].token_ids for k, v in out.items()}


def prompts_for(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49000, (n,), generator=g).tolist() for n in lengths]


def colocated(path: str, prompts, params) -> dict:
    e = engine(path, None)
    for i, ids in enumerate(prompts):
        e.add_request(f"c{i}", ids, params)
    return {int(k[1:]): v.outputs[0].token_ids for k, v in run(e).items()}


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_handoff_matches_colocated(tiny_model_dirs, arch):
    path = tiny_model_dirs[arch]
    prompts = prompts_for(1, [2, 5, 16, 17, 33, 70])
    want = colocated(path, prompts, GREEDY)
    for layerwise in (True, False):
        prefill = engine(path, "producer")
        prefill.producer.layerwise = layerwise
        assert handoff(prefill, engine(path, "consumer"), prompts, GREEDY, chunk_bytes=700) == want


def test_first_token_comes_with_the_kv(tiny_model_dirs):
    """A single sequence: prefill samples the first token (seeded, with penalties and logprobs) exactly
    as a colocated engine does, decode takes it at admission without a forward pass, and a first token
    that ends the request (max_tokens=1) finishes it there."""
    path = tiny_model_dirs["llama"]
    ids = prompts_for(12, [45])[0]
    params = SamplingParams(temperature=0.8, top_k=50, seed=3, max_tokens=9, ignore_eos=True, logprobs=2,
                            repetition_penalty=1.3)
    e = engine(path, None)
    e.add_request("c", ids, params)
    want = run(e)["c"].outputs[0]
    prefill, decode = engine(path, "producer", budget=16), engine(path, "consumer")  # chunked prefill
    lease = decode.add_remote_request("r", ids, params)
    assert lease.wants_first and lease.num_tokens == len(ids)
    sink = Recorder()
    produce(prefill, "p", lease, ids, params, sink)
    run(prefill)
    assert sink.first.token_id == want.token_ids[0]
    deliver(decode, lease, sink)
    outs = decode.step()  # admission: the first token is out before any forward pass of decode's
    assert [o.outputs[0].token_ids for o in outs] == [want.token_ids[:1]] and not decode.scheduler.running
    got = run(decode)["r"].outputs[0]
    assert got.token_ids == want.token_ids and got.text == want.text
    assert [sorted(lp) for lp in got.logprobs] == [sorted(lp) for lp in want.logprobs]
    assert all(abs(got.logprobs[i][t].logprob - want.logprobs[i][t].logprob) < 1e-4
               for i in range(len(want.logprobs)) for t in want.logprobs[i])
    assert abs(got.cumulative_logprob - want.cumulative_logprob) < 1e-3

    one = SamplingParams(temperature=0, max_tokens=1)
    lease = decode.add_remote_request("one", ids, one)
    sink = Recorder()
    produce(prefill, "p1", lease, ids, one, sink)
    run(prefill)
    deliver(decode, lease, sink)
    out = decode.step()
    assert len(out) == 1 and out[0].finished and out[0].outputs[0].finish_reason == "length"
    assert out[0].outputs[0].token_ids == [sink.first.token_id] == colocated(path, [ids], one)[0]
    assert not decode.has_unfinished_requests() and decode.kv.pool.num_free == decode.kv.pool.num_blocks


def test_handoff_with_chunked_prefill_and_seeded_sampling(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    prompts = prompts_for(2, [40, 90, 7])
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=10, ignore_eos=True, n=2)
    e = engine(path, None)
    for i, ids in enumerate(prompts):
        e.add_request(f"c{i}", ids, params)
    want = {int(k[1:]): [o.token_ids for o in v.outputs] for k, v in run(e).items()}
    prefill, decode = engine(path, "producer", budget=24), engine(path, "consumer")
    got = {}
    for i, ids in enumerate(prompts):
        lease = decode.add_remote_request(f"r{i}", ids, params)
        assert not lease.wants_first  # n = 2: decode samples (and forks) itself
        sink = Recorder()
        produce(prefill, f"p{i}", lease, ids, params, sink)
        run(prefill)
        deliver(decode, lease, sink)
        got.update({int(k[1:]): [o.token_ids for o in v.outputs] for k, v in run(decode).items()})
    assert got == want


def test_decode_prefix_cache_skips_tokens(tiny_model_dirs):
    """Decode already holds a prompt's prefix: the lease skips those tokens, fewer bytes move."""
    path = tiny_model_dirs["qwen2"]
    shared = prompts_for(3, [48])[0]
    first, second = shared + [11, 12, 13], shared + [21, 22, 23, 24]
    prefill, decode = engine(path, "producer"), engine(path, "consumer")
    handoff(prefill, decode, [first], GREEDY)
    lease = decode.add_remote_request("again", second, GREEDY)
    assert lease.skip_tokens == 48 and lease.num_tokens == len(second)
    sink = Recorder()
    produce(prefill, "p", lease, second, GREEDY, sink)
    run(prefill)
    assert {c.token_start for c in sink.chunks} == {48} and all(c.num_tokens == 4 for c in sink.chunks)
    deliver(decode, lease, sink)
    got = run(decode)["again"].outputs[0].token_ids
    assert got == colocated(path, [second], GREEDY)[0]


@pytest.mark.parametrize("layerwise", [True, False])
def test_chunks_leave_layer_by_layer_or_after_the_forward_pass(tiny_model_dirs, layerwise):
    """Layerwise, the sink receives layer 0's chunks before layer 1 is computed (the hook runs per
    layer); else the step's chunks after the forward pass, layers together up to the chunk size."""
    path = tiny_model_dirs["llama"]
    prefill = engine(path, "producer", budget=16)  # two steps
    prefill.producer.layerwise = layerwise
    events = []
    forward = prefill.runner.model.forward

    def traced(*args, **kwargs):
        events.append("forward")
        out = forward(*args, **kwargs)
        events.append("end")
        return out

    prefill.runner.model.forward = traced

    class Spy(Recorder):
        def put(self, chunk):
            events.append(chunk.layer)
            super().put(chunk)

    sink = Spy()
    prefill.add_kv_request("p", prompts_for(4, [30])[0], sink)
    run(prefill)
    steps = [events[i:j] for i, j in zip([k for k, e in enumerate(events) if e == "forward"],
                                         [k + 1 for k, e in enumerate(events) if e == "end"])]
    assert len(steps) == 2
    if layerwise:  # chunks inside each forward pass, in layer order
        assert all(step[1:-1] == [0, 1] for step in steps), events
    else:  # none inside; after each pass one chunk holding both layers
        assert all(step == ["forward", "end"] for step in steps), events
        assert [(c.layer, c.num_layers) for c in sink.chunks] == [(0, 2), (0, 2)]
    assert sum(c.num_tokens * c.num_layers for c in sink.chunks) == 2 * 30
    assert all(len(c.data) == c.num_layers * c.num_tokens * prefill.layout.token_bytes for c in sink.chunks)


def test_lease_refuses_bad_and_late_transfers(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    prefill, decode = engine(path, "producer"), engine(path, "consumer")
    ids = prompts_for(5, [40])[0]
    prefill.producer.layerwise = True  # a chunk per layer: a transfer can stop half done
    lease = decode.add_remote_request("r", ids, GREEDY, lease_seconds=60)
    sink = Recorder()
    produce(prefill, "p", lease, ids, GREEDY, sink)
    run(prefill)
    c = decode.consumer
    other = dataclasses.replace(prefill.layout, dtype="bfloat16", compat_hash="")
    with pytest.raises(LeaseError, match="dtype 'float32' != 'bfloat16'"):
        c.open(lease.lease_id, "t", other)
    with pytest.raises(LeaseError, match="does not exist"):
        c.open("lease-nope", "t", prefill.layout)
    c.open(lease.lease_id, "t", prefill.layout)
    chunk = sink.chunks[0]
    with pytest.raises(LeaseError, match="outside lease"):
        c.write(lease.lease_id, "t", KVChunkData(5, 0, 1, chunk.data[: prefill.layout.token_bytes]))
    with pytest.raises(LeaseError, match="bytes"):
        c.write(lease.lease_id, "t", KVChunkData(0, 0, 2, chunk.data[:10]))
    with pytest.raises(LeaseError, match="layers 1..2"):  # two layers from the last one
        c.write(lease.lease_id, "t", KVChunkData(1, 0, 1, bytes(2 * prefill.layout.token_bytes), num_layers=2))
    c.write(lease.lease_id, "t", chunk)
    with pytest.raises(LeaseError, match="missing"):
        c.close(lease.lease_id, "t", sink.first)
    for rest in sink.chunks[1:]:
        c.write(lease.lease_id, "t", rest)
    with pytest.raises(LeaseError, match="wants the first output token"):
        c.close(lease.lease_id, "t")
    with pytest.raises(LeaseError, match="outside the vocabulary"):
        c.close(lease.lease_id, "t", dataclasses.replace(sink.first, token_id=10**7))
    c.open(lease.lease_id, "t2", prefill.layout)  # a retry takes the lease over
    with pytest.raises(LeaseError, match="taken over"):
        c.write(lease.lease_id, "t", chunk)
    before = decode.runner.kv_caches[0].clone()
    lease.deadline = 0.0
    assert decode.expired_leases() == ["r"]
    decode.abort_request("r")
    with pytest.raises(LeaseError, match="does not exist"):
        c.write(lease.lease_id, "t2", chunk)
    assert torch.equal(before, decode.runner.kv_caches[0]), "a late chunk was written"
    assert decode.kv.pool.num_free == decode.kv.pool.num_blocks


def test_fallback_to_local_prefill_and_resume(tiny_model_dirs):
    path = tiny_model_dirs["mistral"]
    ids = prompts_for(6, [37])[0]
    want = colocated(path, [ids], GREEDY)[0]
    decode = engine(path, "consumer")
    decode.add_remote_request("r", ids, GREEDY)
    assert decode.prefill_locally("r") and not decode.consumer.leases
    assert run(decode)["r"].outputs[0].token_ids == want
    decode.add_request("resumed", ids, GREEDY, resume_token_ids=want[:5])
    out = run(decode)["resumed"].outputs[0]
    assert out.token_ids == want and decode.kv.pool.num_free == decode.kv.pool.num_blocks


def test_seeded_sampling_resumes_identically(tiny_model_dirs):
    path = tiny_model_dirs["qwen2"]
    ids = prompts_for(7, [20])[0]
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=12, ignore_eos=True)
    want = colocated(path, [ids], params)[0]
    e = engine(path, None)
    e.add_request("x", ids, params, resume_token_ids=want[:7])
    assert run(e)["x"].outputs[0].token_ids == want


def test_a_full_cache_leaves_the_request_to_local_prefill(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    decode = engine(path, "consumer", blocks=3)
    ids = prompts_for(8, [30])[0]
    assert decode.add_remote_request("a", ids, GREEDY) is not None  # 2 blocks leased
    assert decode.add_remote_request("b", ids[:20] + [5] * 20, GREEDY) is None  # no room: local
    assert decode.scheduler.waiting and decode.scheduler.waiting[0].seq_id == "b"
    decode.abort_request(["a", "b"])
    assert decode.kv.pool.num_free == 3


def test_shared_memory_staging_is_pooled_and_checked(tiny_model_dirs):
    """Same-host transport, consumer side: a lease gets a /dev/shm staging area; chunks staged there
    (at their (layer, token) place) go into the blocks and are checked against their checksum (a
    corrupted one does not count); the area returns to a pool when the lease ends and the next lease
    reuses it; a late staged chunk is refused without touching the cache; closing unlinks every file."""
    from tandem.engine.kv_transfer import shm
    from tandem.engine.kv_transfer.shm import StagingArea

    path = tiny_model_dirs["llama"]
    ids = prompts_for(11, [40])[0]
    want = colocated(path, [ids], GREEDY)[0]
    prefill, decode = engine(path, "producer"), engine(path, "consumer")
    c, tb = decode.consumer, prefill.layout.token_bytes
    c.staging_max_bytes = shm.MAX_LEASE_BYTES
    lease = decode.add_remote_request("r", ids, GREEDY, lease_seconds=60)
    staged = lease.staging
    size = 2 * len(ids) * tb
    assert staged is not None and lease.staging_bytes == size and shm.staged_files(os.getpid())
    area = StagingArea.attach(staged.path, size)  # the producer's view of it
    sink = Recorder()
    produce(prefill, "p", lease, ids, GREEDY, sink)
    run(prefill)
    c.open(lease.lease_id, "t", prefill.layout)
    for i, chunk in enumerate(sink.chunks):
        at = shm.offset(chunk.layer, chunk.token_start, lease.skip_tokens, lease.num_tokens, tb)
        args = (lease.lease_id, "t", chunk.layer, chunk.token_start, chunk.num_tokens, chunk.num_layers)
        with pytest.raises(LeaseError, match="offset"):
            c.write_staged(*args, at + 1, len(chunk.data), chunk.checksum)
        if i == 0:  # corrupted in the staging area: refused, then sent again
            area.write(at, bytes([chunk.data[0] ^ 0xFF]) + bytes(chunk.data[1:]))
            assert not c.write_staged(*args, at, len(chunk.data), chunk.checksum)
            with pytest.raises(LeaseError, match="missing"):
                c.close(lease.lease_id, "t", sink.first)
        area.write(at, chunk.data)
        assert c.write_staged(*args, at, len(chunk.data), chunk.checksum)
    c.close(lease.lease_id, "t", sink.first)
    assert run(decode)["r"].outputs[0].token_ids == want
    assert lease.staging is None and c.staging_pool.idle == [staged], "the area went back to the pool"
    area.close()

    lease = decode.add_remote_request("late", ids, GREEDY, lease_seconds=60)  # expires before its KV
    assert lease.staging is staged  # reused: its pages are there already
    area = StagingArea.attach(lease.staging.path, lease.staging_bytes)
    c.open(lease.lease_id, "t", prefill.layout)
    area.write(0, b"\x01" * area.size)
    before = decode.runner.kv_caches[0].clone()
    lease.deadline = 0.0
    decode.abort_request(decode.expired_leases())
    with pytest.raises(LeaseError, match="does not exist"):
        c.write_staged(lease.lease_id, "t", 0, lease.skip_tokens, 1, 1, 0, tb, 0)
    assert torch.equal(before, decode.runner.kv_caches[0]), "a late chunk was written"
    assert decode.kv.pool.num_free == decode.kv.pool.num_blocks
    area.close()
    c.close_staging()  # the worker stops
    assert not Path(staged.path).exists() and not shm.staged_files(os.getpid())
    assert StagingArea.attach(staged.path, size) is None  # gone: a sender would use gRPC


def test_staging_pool_keeps_a_bounded_set_of_areas():
    """The smallest idle area that fits is reused; idle areas over the budget are unlinked, largest first."""
    from tandem.engine.kv_transfer import shm

    pool = shm.StagingPool(max_idle_bytes=3 << 20)
    small, big = pool.take("a", 1 << 20), pool.take("b", 2 << 20)
    pool.give_back(big)
    pool.give_back(small)
    assert pool.take("c", 1000) is small and pool.take("d", 1 << 20) is big  # smallest fit first
    extra = pool.take("e", 2 << 20)
    for area in (small, big, extra):
        pool.give_back(area)  # 5 MiB idle: the largest go until 3 MiB remain
    assert sum(a.size for a in pool.idle) <= 3 << 20 and small in pool.idle
    gone = [a for a in (big, extra) if a not in pool.idle]
    assert gone and all(not Path(a.path).exists() for a in gone)
    pool.close()
    assert not pool.idle and not Path(small.path).exists()


def test_kv_arriving_during_lookaheads_is_admitted(tiny_model_dirs, monkeypatch):
    """A decode engine running multi-step lookaheads back to back (the Triton backend's decode path,
    through Triton's interpreter) admits a request whose KV arrives meanwhile at the next step, not when
    the lookaheads stop; both outputs equal a colocated engine's."""
    path = tiny_model_dirs["llama"]
    a, b = prompts_for(5, [20, 30])
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = colocated(path, [a, b], params)
    monkeypatch.setenv("TANDEM_ATTENTION_BACKEND", "triton")
    prefill, decode = engine(path, "producer"), engine(path, "consumer")
    done: dict = {}

    def send(rid: str, ids: list[int]) -> None:
        lease = decode.add_remote_request(rid, ids, params)
        sink = Recorder()
        produce(prefill, f"p{rid}", lease, ids, params, sink)
        run(prefill)
        deliver(decode, lease, sink)

    def step() -> list[str]:
        outs = decode.step()
        done.update({o.request_id: o for o in outs if o.finished})
        return [o.request_id for o in outs]

    send("r0", a)
    while decode._inflight is None:
        step()
    send("r1", b)
    assert "r1" in step()  # its first token, which came with its KV
    assert decode._inflight is not None and "r0" not in done
    while decode.has_unfinished_requests():
        step()
    assert decode.stats().num_lookahead_steps >= 16
    assert {int(k[1:]): v.outputs[0].token_ids for k, v in done.items()} == want
    assert decode.kv.pool.num_free == decode.kv.pool.num_blocks, "leaked KV blocks"
