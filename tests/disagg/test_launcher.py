"""`tandem up` as a user runs it: a real launcher process that starts the stack, restarts a worker
killed with -9, and leaves no process behind when it is told to stop (SIGTERM to it alone) or
killed itself."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time

import httpx
import openai

from tandem.launcher import tandem_command
from tandem.worker.process import free_port


class Up:
    def __init__(self, model: str, *extra: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*tandem_command(), "up", model, "--port", str(self.port), "--kv-cache-gib", "0.05",
             "--worker-args", "--heartbeat-interval 0.2", "--router-args", "--heartbeat-timeout 3 --served-model-name m", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tempfile.gettempdir(),
            env={**os.environ, "TANDEM_NO_PROGRESS": "1"})
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = re.search(pattern, line)
                if found:
                    return found
            assert self.proc.poll() is None or pattern == "stopped", "\n".join(self.lines[-40:])
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines[-40:]))

    def pids(self) -> dict[str, int]:
        return {m.group(1): int(m.group(2)) for line in self.lines
                if (m := re.search(r"\[tandem up\]\s+(\S+)\s+pid (\d+)$", line))}

    def complete(self) -> str:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", max_retries=0)
        return client.completions.create(model="m", prompt=[5, 6, 7] * 20, max_tokens=4, temperature=0).choices[0].text


def test_free_port_lies_below_the_ephemeral_range():
    """Ports picked for workers to bind later are outside the range outgoing connections draw their
    source ports from (a worker once lost its HTTP port to one and failed its start), and bindable."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(p < low for p in ports) and len(ports) > 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead: its parent has not reaped it yet
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.1)


def test_up_restarts_a_crashed_worker_and_stops_cleanly(tiny_model_dirs):
    up = Up(tiny_model_dirs["llama"])
    try:
        url = up.wait_for(r"ready: OpenAI API at (\S+)/v1").group(1)
        up.wait_for(r"Ctrl-C stops everything")
        assert url == f"http://127.0.0.1:{up.port}"
        first = up.complete()
        pids = up.pids()
        assert set(pids) == {"router", "prefill-0", "decode-0"}
        workers = lambda: httpx.get(url + "/workers", timeout=5).json()["workers"]  # noqa: E731
        old = next(w["instance_id"] for w in workers() if w["worker_id"] == "decode-0")
        os.kill(pids["decode-0"], signal.SIGKILL)
        new_pid = int(up.wait_for(r"decode-0 restarted \(restart #1, pid (\d+)\)").group(1))
        deadline = time.monotonic() + 60
        while not any(w["worker_id"] == "decode-0" and w["healthy"] and w["instance_id"] != old for w in workers()):
            assert time.monotonic() < deadline, "the restarted decode worker did not rejoin"
            time.sleep(0.2)
        assert up.complete() == first
        up.proc.send_signal(signal.SIGTERM)  # to the launcher alone
        assert up.proc.wait(30) == 0
        wait_gone([pids["router"], pids["prefill-0"], new_pid])
    finally:
        if up.proc.poll() is None:
            up.proc.kill()


def test_children_die_with_a_killed_launcher(tiny_model_dirs):
    up = Up(tiny_model_dirs["llama"], "--prefill", "0")
    try:
        up.wait_for(r"Ctrl-C stops everything")
        pids = up.pids()
        assert set(pids) == {"router", "decode-0"}
        up.complete()  # zero prefill workers: decode prefills everything
        up.proc.kill()
        up.proc.wait(10)
        wait_gone(pids.values())
    finally:
        if up.proc.poll() is None:
            up.proc.kill()


def test_stop_takes_what_a_child_started(tmp_path):
    """Stopping the stack signals each child's process group: what a worker started (the CPU kernels'
    compilers, when it is stopped during its first start) goes with it, not on writing the build."""
    from tandem.launcher import Child, Stack

    stack = Stack(None, num_prefill=0, num_decode=0)
    pid_file = tmp_path / "grandchild"
    # the child waits on its own child, as a worker waits on its compiler
    child = Child("worker", ["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], 0)
    stack.children = [child]
    stack.start(child)
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    stack.stop(grace=5)
    deadline = time.monotonic() + 5
    while _alive(grandchild):
        assert time.monotonic() < deadline, "the child's own child outlived the stack"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is gone for our purpose
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
