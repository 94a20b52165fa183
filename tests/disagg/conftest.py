"""Real disaggregated stacks for the tests: `tandem router`, `tandem prefill` and `tandem decode`
processes on 127.0.0.1 (started through the launcher's Stack, as `tandem up` starts them), the
official `openai` client in front, and checks that every worker gave back every KV block, that no
shared-memory staging file (/dev/shm/tandem-kv-*) is left and that no process outlives its test."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.engine.kv_transfer.shm import is_idle, staged_files
from tandem.launcher import Stack, tandem_command
from tandem.worker.process import free_port

FAST_ROUTER = ["--heartbeat-interval", "0.2", "--heartbeat-timeout", "3", "--local-prefill-threshold", "8",
               "--disable-log-requests"]
WORKER = ["--heartbeat-interval", "0.2", "--num-gpu-blocks-override", "256", "--max-num-batched-tokens", "512"]


def scrape(url: str) -> dict[str, float]:
    """Every sample of a /metrics page as 'name{label="v",...}' -> value."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def total(metrics: dict[str, float], prefix: str, **labels: str) -> float:
    """Sum of every sample whose name starts with `prefix` and carries `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in metrics.items() if k.split("{")[0] == prefix and all(w in k for w in want))


class LiveStack(Stack):
    """A Stack with test helpers: clients, per-process metrics, idleness and leak checks, kill -9."""

    def openai(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120, **kwargs)

    def async_openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def metrics(self, name: str = "router") -> dict[str, float]:
        return scrape(f"http://{self.host}:{self.child(name).http_port}/metrics")

    def workers(self) -> list[dict]:
        return httpx.get(self.url + "/workers", timeout=10).json()["workers"]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        pid = self.child(name).pid
        os.kill(pid, sig)
        return pid

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Every live worker holds no KV block, runs and waits for nothing (no leaked blocks)."""
        deadline = time.monotonic() + timeout
        while True:
            busy = {}
            for c in self.children[1:]:
                if c.proc is None or c.proc.poll() is not None:
                    continue
                try:
                    m = self.metrics(c.name)
                except httpx.HTTPError:
                    continue  # stopped (SIGSTOP) workers are checked by the test itself
                held = (m.get("tandem:kv_cache_usage_perc", 0), m.get("tandem:num_requests_running", 0),
                        m.get("tandem:num_requests_waiting", 0))
                if any(held):
                    busy[c.name] = held
            if not busy:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"workers still hold KV blocks or requests (usage, running, waiting): {busy}")
            time.sleep(0.1)

    def close(self) -> None:
        procs = [c.proc for c in self.children if c.proc is not None]
        for c in self.children:  # a stopped process cannot stop
            if c.proc is not None and c.proc.poll() is None:
                os.kill(c.proc.pid, signal.SIGCONT)
        self.stop(grace=15)
        assert all(p.poll() is not None for p in procs), "a process outlived its stack"


@contextlib.contextmanager
def _stacks(log_root: Path):
    """Yields a builder of stacks (tiny model by default); on exit each is stopped and checked for leaks."""
    made: list[LiveStack] = []

    def build(model: str, num_prefill: int = 1, num_decode: int = 1, router_args: list[str] = (),
              worker_args: list[str] = (), env: dict | None = None, check_idle: bool = True,
              child_args: dict | None = None, kv_store_bytes: int | None = None) -> LiveStack:
        log_dir = log_root / f"stack{len(made)}"
        log_dir.mkdir()
        s = LiveStack(model, free_port(), num_prefill, num_decode, router_args=FAST_ROUTER + list(router_args),
                      worker_args=WORKER + list(worker_args), env=env, log_dir=str(log_dir), child_args=child_args,
                      kv_store_bytes=kv_store_bytes)
        s.check_idle = check_idle
        made.append(s)
        s.start_all()
        s.wait_ready(timeout=180)
        return s

    yield build
    errors = []
    for s in made:
        pids = [c.proc.pid for c in s.children if c.proc is not None]
        try:
            if s.check_idle and not s.stopping:
                s.wait_idle()
                errors += [f"staging file of a finished lease: {f}" for pid in pids for f in staged_files(pid)
                           if not is_idle(f)]
        except AssertionError as exc:
            errors.append(str(exc))
        finally:
            s.close()
        errors += [f"staging file left after the stack stopped: {f}" for pid in pids for f in staged_files(pid)]
    assert not errors, errors


@pytest.fixture
def stack_factory(tmp_path):
    """Starts stacks; each is stopped after the test and checked for leaks."""
    with _stacks(tmp_path) as build:
        yield build


@pytest.fixture(scope="module")
def module_stack_factory(tmp_path_factory):
    """Starts stacks that several tests of a module only read; stopped and checked after the module."""
    with _stacks(tmp_path_factory.mktemp("stacks")) as build:
        yield build


def router_log(s: LiveStack) -> str:
    return Path(s.log_dir, "router.log").read_text(errors="replace")


class ServeProcess:
    """Colocated `tandem serve` as its own process: the baseline disaggregation must equal."""

    def __init__(self, model: str | None, extra: list[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="serve-", suffix=".log", delete=False)
        args = [*tandem_command(), "serve", *([model] if model else []), "--host", "127.0.0.1", "--port",
                str(self.port), "--uvicorn-log-level", "warning", "--disable-log-requests", *extra]
        self.proc = subprocess.Popen(args, cwd=tempfile.gettempdir(), stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TANDEM_NO_PROGRESS": "1"})
        deadline = time.monotonic() + 180
        while True:
            assert self.proc.poll() is None, Path(self.log.name).read_text()[-2000:]
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "tandem serve did not start"
            time.sleep(0.2)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
