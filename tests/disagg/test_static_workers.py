"""Workers the router is told about (--prefill-workers / --decode-workers) rather than workers that
register: the router polls their state, routes to them, and drops one that stops answering."""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time

import httpx
import openai

from tandem.launcher import tandem_command
from tandem.worker.process import free_port
from tests.disagg.conftest import scrape, total


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*tandem_command(), *args], cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "TANDEM_NO_PROGRESS": "1"})


def test_router_polls_statically_listed_workers(tiny_model_dirs):
    model = tiny_model_dirs["llama"]
    ports = {name: free_port() for name in ("prefill", "decode", "http")}
    workers = [start(role, model, "--host", "127.0.0.1", "--port", str(ports[role]), "--worker-id", f"static-{role}",
                     "--num-gpu-blocks-override", "128") for role in ("prefill", "decode")]
    router = start("router", model, "--host", "127.0.0.1", "--port", str(ports["http"]), "--grpc-port", "0",
                   "--prefill-workers", f"localhost:{ports['prefill']}", "--decode-workers",
                   f"127.0.0.1:{ports['decode']}", "--local-prefill-threshold", "8", "--heartbeat-interval", "0.2",
                   "--heartbeat-timeout", "3", "--served-model-name", "m")
    url = f"http://127.0.0.1:{ports['http']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                listed = httpx.get(url + "/workers", timeout=2).json()["workers"]
            except httpx.HTTPError:
                listed = []
            if len([w for w in listed if w["healthy"]]) == 2:
                break
            assert time.monotonic() < deadline, listed
            time.sleep(0.2)
        assert {w["worker_id"] for w in listed} == {"static-prefill", "static-decode"}
        assert all(w["static"] for w in listed)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.completions.create(model="m", prompt=list(range(100, 160)), max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
        assert total(scrape(url + "/metrics"), "tandem:router_prefill_decisions_total", decision="remote") == 1
        os.kill(workers[0].pid, signal.SIGSTOP)  # the prefill worker stops answering polls
        deadline = time.monotonic() + 20
        while any(w["worker_id"] == "static-prefill" and w["healthy"]
                  for w in httpx.get(url + "/workers", timeout=5).json()["workers"]):
            assert time.monotonic() < deadline, "the silent static worker stayed in the pool"
            time.sleep(0.2)
        r = client.completions.create(model="m", prompt=list(range(200, 260)), max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4  # prefilled on decode
        os.kill(workers[0].pid, signal.SIGCONT)
    finally:
        for proc in (router, *workers):
            proc.terminate()
        for proc in (router, *workers):
            proc.wait(30)


def test_a_router_without_workers_is_alive_but_not_ready(tiny_model_dirs):
    """The operator's probes: readiness reads /health (503 while no decode worker is live), startup and
    liveness read /version, which a running router answers with or without workers (a router restarted
    for want of decode workers would only drop its clients)."""
    port = free_port()
    router = start("router", tiny_model_dirs["llama"], "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                version = httpx.get(url + "/version", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the router never answered"
                time.sleep(0.2)
        assert version.status_code == 200
        assert httpx.get(url + "/health", timeout=2).status_code == 503
    finally:
        router.terminate()
        router.wait(30)
