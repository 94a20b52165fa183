"""The parallel groups the operator makes: its tensor- and pipeline-parallel sizes become the worker's; a replica
spanning pods is a group whose pod 0 serves (rank 0 and its local ranks) while the other pods host their ranks
(`tandem decode` with TANDEM_WORKER_INDEX > 0), all joining over TCP. Settings that cannot work stop the worker
at once with an error naming them, instead of serving as if it held the whole model."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("role", ["prefill", "decode"])
@pytest.mark.parametrize("env, named", [({"TANDEM_GROUP_SIZE": "4", "TANDEM_WORKER_INDEX": "1"}, "needs TANDEM_LEADER_ADDRESS"),
                                        ({"TANDEM_GROUP_SIZE": "2", "TANDEM_LEADER_ADDRESS": "10.0.0.1",
                                          "TANDEM_TENSOR_PARALLEL_SIZE": "2"}, "needs TANDEM_GROUP_SECRET"),
                                        ({"TANDEM_GROUP_SIZE": "2", "TANDEM_TENSOR_PARALLEL_SIZE": "3",
                                          "TANDEM_LEADER_ADDRESS": "10.0.0.1", "TANDEM_GROUP_SECRET": "s"}, "do not split"),
                                        ({"TANDEM_PIPELINE_PARALLEL_SIZE": "x"}, "not a positive integer")])
def test_group_member_fails_loudly(role, env, named):
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", role, "--port", "0"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert named in proc.stderr and "tandem " + role in proc.stderr
    assert "TANDEM_READY" not in proc.stdout


def test_tensor_parallel_settings_reach_the_engine():
    from argparse import Namespace

    from tandem.worker.process import parallel_settings

    def args():
        return Namespace(tensor_parallel_size=1, pipeline_parallel_size=1)

    plain = args()
    assert parallel_settings({"TANDEM_TENSOR_PARALLEL_SIZE": "1", "TANDEM_PIPELINE_PARALLEL_SIZE": "1"}, plain) is None
    assert parallel_settings({}, plain) is None and plain.tensor_parallel_size == plain.pipeline_parallel_size == 1
    both = args()
    assert parallel_settings({"TANDEM_TENSOR_PARALLEL_SIZE": "4", "TANDEM_PIPELINE_PARALLEL_SIZE": "2"}, both) is None
    assert (both.tensor_parallel_size, both.pipeline_parallel_size) == (4, 2)
    flagged = Namespace(tensor_parallel_size=4, pipeline_parallel_size=1)
    assert "disagree" in parallel_settings({"TANDEM_TENSOR_PARALLEL_SIZE": "2"}, flagged)


def _two_ports() -> int:
    """A port p with p + 1 free too (a group's store and its command listener)."""
    import socket

    from tandem.worker.process import free_port

    while True:
        port = free_port("127.0.0.1")
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def test_a_group_spanning_two_hosts(tiny_model_dirs, tmp_path, monkeypatch):
    """Two "pods" on this machine: this process is pod 0 (rank 0, LLM's engine), and `tandem decode` with the
    operator's group environment is pod 1, hosting rank 1. Rank 1 joins over TCP and the pair computes what one
    process does; pod 1 answers its probes while its rank runs, and when its rank is killed the leader's next
    step fails loudly and pod 1 exits 1 (the operator then restarts the whole group)."""
    import concurrent.futures
    import signal
    import time

    import httpx

    from tandem import LLM, SamplingParams
    from tandem.config import GroupConfig
    from tandem.worker.process import free_port

    model = tiny_model_dirs["llama"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["Two hosts, one model", "1 2 3 4 5"]
    want = [o.outputs[0].token_ids for o in LLM(model, dtype="float32").generate(prompts, params, use_tqdm=False)]
    port, http_port = _two_ports(), free_port("127.0.0.1")
    env = {**os.environ, "TANDEM_GROUP_SIZE": "2", "TANDEM_WORKER_INDEX": "1", "TANDEM_LEADER_ADDRESS": "127.0.0.1",
           "TANDEM_GROUP_PORT": str(port), "TANDEM_TENSOR_PARALLEL_SIZE": "2", "TANDEM_GROUP_SECRET": "s3cret"}
    monkeypatch.setenv("TANDEM_GROUP_SECRET", "s3cret")  # the leader's (this process's) key
    log = open(tmp_path / "pod1.log", "w")
    leader = concurrent.futures.ThreadPoolExecutor(1).submit(
        LLM, model, dtype="float32", tensor_parallel_size=2, group=GroupConfig(2, 0, "127.0.0.1", port))
    # a stranger with another key knocks first: refused before anything of it is unpickled, it stops loudly
    stranger = subprocess.run([sys.executable, "-m", "tandem.cli", "decode", model, "--dtype", "float32"],
                              env={**env, "TANDEM_GROUP_SECRET": "guess"}, capture_output=True, text=True, timeout=120)
    assert stranger.returncode == 1 and "the leader refused its key" in stranger.stderr
    pod1 = subprocess.Popen([sys.executable, "-m", "tandem.cli", "decode", model, "--dtype", "float32",
                             "--http-port", str(http_port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        llm = leader.result(timeout=120)
        assert not llm.engine.peers.procs  # rank 1 is pod 1's
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
        assert httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=5).status_code == 200
        rank1 = int(subprocess.check_output(["pgrep", "-P", str(pod1.pid), "-f", "spawn_main"], text=True).split()[0])
        os.kill(rank1, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 1 of the parallel group") as err:
            llm.generate(prompts, params, use_tqdm=False)
        assert getattr(err.value, "fatal", False) and time.monotonic() - start < 30
        assert pod1.wait(30) == 1
        llm.engine.abort_request(list(llm.engine.groups))
        llm.engine.close()
    finally:
        if pod1.poll() is None:
            pod1.kill()  # its rank dies with it (PR_SET_PDEATHSIG)
            pod1.wait()
        log.close()
    assert "this host's part of the group is gone" in (tmp_path / "pod1.log").read_text()
