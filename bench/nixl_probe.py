#!/usr/bin/env python3
"""NIXL between two processes on CPU memory: the API a NIXL KV transport would use, and its speed here.

Not part of Tandem yet (DESIGN.md's NIXL transport is still to build): this records what works. Prefill
(initiator) WRITEs (address, length) regions of a registered CPU tensor into regions of decode's (target)
registered tensor with a notification attached; metadata (bytes) goes out of band. Tests 8 non-contiguous
4 KiB regions (prep_xfer_dlist + make_prepped_xfer, then initialize_xfer) and times 64 MiB in 1 MiB regions.

    python -m venv /tmp/nixl && /tmp/nixl/bin/pip install torch==2.13.0 nixl   # torch first: nixl pulls one
    UCX_TLS=shm,self,tcp UCX_NET_DEVICES=lo NIXL_LOG_LEVEL=WARN /tmp/nixl/bin/python bench/nixl_probe.py

2026-12-05, nixl 1.5.1 on 2 shared cores: 2.2-2.5 GB/s with the progress thread (the default), 4-8 GB/s
with SPIKE_PROG_THREAD=0 (progress then happens in check_xfer_state / get_new_notifs); agent creation
0.4-0.65 s, add_remote_agent 18-95 ms, the first transfer on a connection 20-90 ms even after make_connection.
Pitfalls: add_remote_agent returns the name as bytes; get_new_notifs consumes and may return several
messages at once; register memory before reading the agent's metadata; the target keeps its memory
registered until the initiator removed it.
"""
import os

# UCX reads these when the agent (UCX backend) is created. Set before spawn so
# the children inherit them.
os.environ.setdefault("UCX_TLS", "shm,self,tcp")
os.environ.setdefault("UCX_NET_DEVICES", "lo")

import multiprocessing as mp
import sys
import time

import numpy as np
import torch  # import torch before nixl: nixl picks nixl_cu12/cu13 from torch.version.cuda

KiB, MiB = 1024, 1024 * 1024
# Progress thread on/off (env knob for experiments; default on = nixl's default).
PROG_THREAD = os.environ.get("SPIKE_PROG_THREAD", "1") == "1"
# Sleep between target-side notification polls (s). Busy-polling steals CPU from the copy on small boxes.
POLL_SLEEP = float(os.environ.get("SPIKE_POLL_SLEEP", "0.0001"))
SMALL_N, SMALL_LEN = 8, 4 * KiB          # test regions
BENCH_BYTES, BENCH_REGION = 64 * MiB, 1 * MiB
BENCH_ITERS = 20

# Target (decode) buffer layout: [0, 64 MiB) bench area, [64 MiB, 96 MiB) test area.
DST_BYTES = 96 * MiB
DST_TEST_BASE = 64 * MiB
# Source (prefill) buffer: [0, 64 MiB) bench source, [64 MiB, 96 MiB) test source.
SRC_BYTES = 96 * MiB
SRC_TEST_BASE = 64 * MiB


def make_src() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 256, (SRC_BYTES,), dtype=torch.uint8, generator=g)


def small_offsets():
    """Non-contiguous, differently spaced source and destination offsets (bytes,
    relative to the start of each tensor)."""
    src = [SRC_TEST_BASE + i * 3 * SMALL_LEN + 128 * i for i in range(SMALL_N)]      # gaps, unaligned
    dst = [DST_TEST_BASE + (SMALL_N - 1 - i) * 5 * SMALL_LEN for i in range(SMALL_N)]  # reversed, gaps
    return src, dst


def small_offsets_2():
    src = [SRC_TEST_BASE + 1 * MiB + i * 2 * SMALL_LEN for i in range(SMALL_N)]
    dst = [DST_TEST_BASE + 2 * MiB + i * 7 * SMALL_LEN + 64 for i in range(SMALL_N)]
    return src, dst


def bench_perm():
    n = BENCH_BYTES // BENCH_REGION
    return np.random.default_rng(7).permutation(n)


def descs(base_addr: int, offsets, length: int, dev_id: int = 0) -> np.ndarray:
    """Nx3 uint64 array of (address, length, device_id). device_id is 0 for DRAM."""
    a = np.empty((len(offsets), 3), dtype=np.uint64)
    a[:, 0] = base_addr + np.asarray(offsets, dtype=np.uint64)
    a[:, 1] = length
    a[:, 2] = dev_id
    return a


_pending: dict = {}   # sender -> notifications received but not consumed yet


def wait_notif(agent, sender: str, expect: bytes, timeout=30.0) -> bytes:
    """Wait until notification `expect` from `sender` has arrived.

    get_new_notifs() returns {remote_agent_name(str): [msg(bytes), ...]} and CONSUMES
    them: one call can return several messages (e.g. from back-to-back transfers),
    so keep the ones you are not waiting for yet. Don't rely on ordering across
    transfers. (agent.check_remote_xfer_done(sender, tag) does the same bookkeeping
    internally, with prefix matching.)
    """
    deadline = time.monotonic() + timeout
    while True:
        box = _pending.setdefault(sender, [])
        for k, v in agent.get_new_notifs().items():
            _pending.setdefault(k, []).extend(v)
        if expect in box:
            box.remove(expect)
            return expect
        if time.monotonic() > deadline:
            raise TimeoutError(f"no notif {expect!r} from {sender}; pending={_pending}")
        time.sleep(POLL_SLEEP)


# --------------------------------------------------------------------------- decode
def decode_main(conn):
    from nixl._api import nixl_agent, nixl_agent_config

    t0 = time.perf_counter()
    agent = nixl_agent("decode", nixl_agent_config(enable_prog_thread=PROG_THREAD, backends=["UCX"]))
    t_agent = time.perf_counter() - t0

    dst = torch.zeros(DST_BYTES, dtype=torch.uint8)
    t0 = time.perf_counter()
    reg = agent.register_memory(dst)                  # DRAM, inferred from the CPU tensor
    t_reg = time.perf_counter() - t0

    # Out-of-band: our metadata (connection info + registered-memory keys) and layout.
    conn.send({"md": agent.get_agent_metadata(), "base": dst.data_ptr(), "nbytes": dst.nbytes})
    src_expected = make_src()
    print(f"[decode] agent {t_agent*1e3:.0f} ms, register 96 MiB {t_reg*1e3:.1f} ms, md "
          f"{len(agent.get_agent_metadata())} B", flush=True)

    # Test 1 and test 2: wait for the notification, then check the bytes.
    for name, offs, tag in (("prepped", small_offsets(), b"kv-ready:req-1"),
                            ("initialize", small_offsets_2(), b"kv-ready:req-2")):
        wait_notif(agent, "prefill", tag)
        s, d = offs
        for so, do in zip(s, d):
            assert torch.equal(dst[do:do + SMALL_LEN], src_expected[so:so + SMALL_LEN]), (name, so, do)
        # bytes right next to the regions must be untouched
        assert int(dst[d[0] - 1]) == 0 or d[0] == 0
        print(f"[decode] test {name}: notif {tag!r} received, {SMALL_N} x {SMALL_LEN} B verified",
              flush=True)
        conn.send(("ok", name))

    # Bench: each iteration carries notif b"bench:<i>"; record arrival times.
    arrivals = []
    for i in range(BENCH_ITERS):
        wait_notif(agent, "prefill", f"bench:{i}".encode())
        arrivals.append(time.monotonic_ns())
    perm = bench_perm()
    exp = src_expected[:BENCH_BYTES].view(-1, BENCH_REGION)
    got = dst[:BENCH_BYTES].view(-1, BENCH_REGION)
    assert torch.equal(got[perm], exp), "bench data mismatch"
    print(f"[decode] bench: {BENCH_ITERS} notifs received, 64 MiB verified", flush=True)
    conn.send(("bench_arrivals", arrivals))

    assert conn.recv() == "bye"     # initiator is done and disconnected; now safe to tear down
    agent.deregister_memory(reg)
    del agent
    print("[decode] done", flush=True)


# --------------------------------------------------------------------------- prefill
def prefill_main(conn):
    from nixl._api import nixl_agent, nixl_agent_config

    t0 = time.perf_counter()
    agent = nixl_agent("prefill", nixl_agent_config(enable_prog_thread=PROG_THREAD, backends=["UCX"]))
    t_agent = time.perf_counter() - t0

    src = make_src()
    reg = agent.register_memory(src)

    peer = conn.recv()
    t0 = time.perf_counter()
    remote = agent.add_remote_agent(peer["md"])       # NOTE: returns b"decode" (bytes!)
    if isinstance(remote, bytes):
        remote = remote.decode()
    t_add = time.perf_counter() - t0
    assert remote == "decode", remote
    # Optional: start UCX wire-up now instead of inside the first transfer. It is
    # asynchronous (returns in ~us); transfers issued before wire-up finishes are slow
    # (first one ~70-300 ms, next ones ~10 ms each); afterwards a 4 KiB write is ~30 us.
    agent.make_connection(remote)
    rbase = peer["base"]
    lbase = src.data_ptr()
    print(f"[prefill] agent {t_agent*1e3:.0f} ms, add_remote_agent {t_add*1e3:.1f} ms", flush=True)

    def wait_done(h, what):
        while True:
            st = agent.check_xfer_state(h)
            if st == "DONE":
                return
            if st == "ERR":
                raise RuntimeError(f"{what}: transfer error")

    # ---- Test 1: prepped descriptor lists, selected by index (KV-block style).
    s, d = small_offsets()
    local_side = agent.prep_xfer_dlist("NIXL_INIT_AGENT", descs(lbase, s, SMALL_LEN), "DRAM")
    remote_side = agent.prep_xfer_dlist(remote, descs(rbase, d, SMALL_LEN), "DRAM")
    idx = list(range(SMALL_N))
    t0 = time.perf_counter()
    h = agent.make_prepped_xfer("WRITE", local_side, idx, remote_side, idx, b"kv-ready:req-1")
    st = agent.transfer(h)            # "PROC" (posted) or "DONE" (completed inline) or "ERR"
    assert st != "ERR"
    wait_done(h, "test1")
    t1 = time.perf_counter()
    print(f"[prefill] test prepped: posted -> {st}, DONE in {(t1-t0)*1e6:.0f} us (first xfer "
          f"on this connection)", flush=True)
    assert conn.recv() == ("ok", "prepped")
    agent.release_xfer_handle(h)
    agent.release_dlist_handle(local_side)
    agent.release_dlist_handle(remote_side)

    # ---- Test 2: one-shot initialize_xfer with explicit descriptor lists.
    s, d = small_offsets_2()
    ld = agent.get_xfer_descs(descs(lbase, s, SMALL_LEN), "DRAM")
    rd = agent.get_xfer_descs(descs(rbase, d, SMALL_LEN), "DRAM")
    t0 = time.perf_counter()
    h = agent.initialize_xfer("WRITE", ld, rd, remote, b"kv-ready:req-2")
    st = agent.transfer(h)
    assert st != "ERR"
    wait_done(h, "test2")
    print(f"[prefill] test initialize: DONE in {(time.perf_counter()-t0)*1e6:.0f} us", flush=True)
    assert conn.recv() == ("ok", "initialize")
    agent.release_xfer_handle(h)

    # ---- Bench: 64 MiB as 64 x 1 MiB regions, destination blocks permuted.
    n = BENCH_BYTES // BENCH_REGION
    perm = bench_perm()
    local_side = agent.prep_xfer_dlist("", descs(lbase, np.arange(n) * BENCH_REGION, BENCH_REGION), "DRAM")
    remote_side = agent.prep_xfer_dlist(remote, descs(rbase, np.arange(n) * BENCH_REGION, BENCH_REGION), "DRAM")
    # local block i -> remote block perm[i]
    h = agent.make_prepped_xfer("WRITE", local_side, np.arange(n, dtype=np.int32),
                                remote_side, perm.astype(np.int32), b"")
    times, posts = [], []
    for i in range(BENCH_ITERS):
        t0 = time.monotonic_ns()
        st = agent.transfer(h, f"bench:{i}".encode())   # repost same handle, new notif
        assert st != "ERR"
        wait_done(h, "bench")
        t1 = time.monotonic_ns()
        posts.append(t0)
        times.append(t1 - t0)
    tag, arrivals = conn.recv()
    assert tag == "bench_arrivals"
    times = np.array(times) / 1e9
    e2e = (np.array(arrivals) - np.array(posts)) / 1e9
    gb = BENCH_BYTES / 1e9
    print(f"[prefill] bench 64 MiB in 64 x 1 MiB, {BENCH_ITERS} iters:\n"
          f"    initiator post->DONE: median {np.median(times)*1e3:.2f} ms = {gb/np.median(times):.2f} GB/s"
          f" (best {gb/times.min():.2f}, first {gb/times[0]:.2f})\n"
          f"    post->target notif  : median {np.median(e2e)*1e3:.2f} ms = {gb/np.median(e2e):.2f} GB/s",
          flush=True)

    agent.release_xfer_handle(h)
    agent.release_dlist_handle(local_side)
    agent.release_dlist_handle(remote_side)
    agent.remove_remote_agent(remote)
    agent.deregister_memory(reg)
    conn.send("bye")
    del agent
    print("[prefill] done", flush=True)


def main():
    ctx = mp.get_context("spawn")
    c_decode, c_prefill = ctx.Pipe(duplex=True)
    pd = ctx.Process(target=decode_main, args=(c_decode,), name="decode")
    pp = ctx.Process(target=prefill_main, args=(c_prefill,), name="prefill")
    t0 = time.perf_counter()
    pd.start(); pp.start()
    while pd.is_alive() and pp.is_alive() and time.perf_counter() - t0 < 120:
        time.sleep(0.1)
    pp.join(10); pd.join(10)        # if one side failed, give the other a moment, then kill
    for p in (pd, pp):
        if p.is_alive():
            p.kill()
            print(f"{p.name} hung", file=sys.stderr)
    ok = pd.exitcode == 0 and pp.exitcode == 0
    print(f"[main] exit codes decode={pd.exitcode} prefill={pp.exitcode}; "
          f"{'PASS' if ok else 'FAIL'} in {time.perf_counter()-t0:.1f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
