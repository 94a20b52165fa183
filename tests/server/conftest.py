"""Real servers for the API tests: uvicorn in a thread on a free 127.0.0.1 port, over an AsyncEngine.

One engine per model for the whole session; tests that need other server settings build another
app over the same engine (`serve(client, ServerConfig(...))`), which is what the router will do.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Iterator

import anthropic
import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from tandem.config import CacheConfig, EngineConfig, SchedulerConfig
from tandem.server.api import build_app
from tandem.server.config import ServerConfig
from tandem.server.engine_client import AsyncEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """One app on its own port; `stop()` ends uvicorn (the engine belongs to the fixture)."""

    def __init__(self, client: AsyncEngine, config: ServerConfig | None = None) -> None:
        self.client = client
        self.app = build_app(client, config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    @property
    def model(self) -> str:
        return self.app.state.ctx.names[0]

    def openai(self, **kwargs) -> openai.OpenAI:
        kwargs.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=120, **kwargs)

    def async_openai(self, **kwargs) -> openai.AsyncOpenAI:
        kwargs.setdefault("api_key", "unused")
        return openai.AsyncOpenAI(base_url=self.url + "/v1", max_retries=0, timeout=120, **kwargs)

    def anthropic(self, **kwargs) -> anthropic.Anthropic:
        kwargs.setdefault("api_key", "unused")
        return anthropic.Anthropic(base_url=self.url, max_retries=0, timeout=120, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, timeout=120, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, timeout=120, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as 'name{label="v",...}' -> value (parsed by prometheus_client)."""
        text = self.get("/metrics").text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "model_name")
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Metrics once nothing runs, waits or holds a KV block (fails after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (m["tandem:num_requests_running"] == 0 and m["tandem:num_requests_waiting"] == 0
                    and m["tandem:kv_cache_usage_perc"] == 0):
                return m
            assert time.monotonic() < deadline, f"engine not idle after {timeout}s: {m}"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def make_engine(model: str | None, **kwargs) -> AsyncEngine:
    cache = CacheConfig(block_size=kwargs.pop("block_size", 16), num_gpu_blocks=kwargs.pop("num_blocks", None))
    sched = SchedulerConfig(max_num_seqs=kwargs.pop("max_num_seqs", 256),
                            policy=kwargs.pop("policy", "fcfs"))
    name = kwargs.pop("model_name", None)
    return AsyncEngine(EngineConfig(model=model, dtype="float32", cache=cache, scheduler=sched, **kwargs),
                       model_name=name)


@pytest.fixture(scope="session")
def serve() -> Iterator[Callable[..., LiveServer]]:
    """Start extra servers (other ServerConfigs over a shared engine); all stop at session end."""
    started: list[LiveServer] = []

    def start(client: AsyncEngine, config: ServerConfig | None = None) -> LiveServer:
        server = LiveServer(client, config)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dirs) -> Iterator[AsyncEngine]:
    """The random-weight tiny Llama: fast, text is noise. 512-token context, 256 blocks of 16."""
    engine = make_engine(tiny_model_dirs["llama"], num_blocks=256, model_name="tiny-llama")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def tiny(tiny_engine, serve) -> LiveServer:
    return serve(tiny_engine)


@pytest.fixture(scope="session")
def smol_engine() -> Iterator[AsyncEngine]:
    """The embedded SmolLM2-135M-Instruct: real text, 2k-token context."""
    engine = make_engine(None, max_model_len=2048, model_name="smollm2")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def smol(smol_engine, serve) -> LiveServer:
    return serve(smol_engine)


@pytest.fixture(autouse=True)
def _engines_idle_after(request):
    """After each test, every engine it touched is idle with every KV block free."""
    yield
    for name in ("tiny", "smol"):
        if name in request.fixturenames:
            request.getfixturevalue(name).wait_idle()
