"""Transfer telemetry: Prometheus series on both workers and the router, the router's per-request
log line, and one OpenTelemetry trace per request from router through prefill, transfer and
decode (W3C traceparent in gRPC metadata) -- checked with the in-memory exporter on services run
in-process, and through --otlp-traces-endpoint from real processes to a real OTLP collector."""
from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent import futures

import grpc
import pytest
import torch

from tests.disagg.conftest import router_log, total

PROMPT = torch.randint(3, 49000, (200,), generator=torch.Generator().manual_seed(21)).tolist()
TOKEN_BYTES = 2 * 2 * 16 * 4 * 2  # tiny llama: K+V, 2 KV heads, head size 16, float32, 2 layers
EXPECTED_BYTES = len(PROMPT) * TOKEN_BYTES  # every prompt token (prefill samples the first output token)


# ---- traces, in-process ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def spans():
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


class InProcess:
    """Router, prefill and decode servers on one background event loop (real gRPC on 127.0.0.1)."""

    def __init__(self, model: str) -> None:
        from tandem.config import CacheConfig, EngineConfig
        from tandem.decode.engine import DecodeEngine
        from tandem.prefill.engine import PrefillEngine
        from tandem.proto import router_pb2
        from tandem.router.config import RouterConfig
        from tandem.router.main import Router
        from tandem.server.config import ServerConfig
        from tandem.worker.process import WorkerServer

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        cfg = lambda role: EngineConfig(model=model, dtype="float32", kv_role=role,  # noqa: E731
                                        cache=CacheConfig(num_gpu_blocks=128))
        self.hosts = [PrefillEngine(cfg("producer"), "tiny"), DecodeEngine(cfg("consumer"), "tiny")]
        self.router = Router(model, "tiny", RouterConfig(local_prefill_threshold=8, heartbeat_interval=0.2),
                             ServerConfig())
        self.port, grpc_port = self.run(self.router.start("127.0.0.1", 0, "127.0.0.1", 0))
        self.workers = [WorkerServer(role, host, router=f"127.0.0.1:{grpc_port}", heartbeat_interval=0.2,
                                     worker_id=name)
                        for role, host, name in ((router_pb2.PREFILL, self.hosts[0], "prefill-in"),
                                                 (router_pb2.DECODE, self.hosts[1], "decode-in"))]
        for w in self.workers:
            self.run(w.start())
        deadline = time.monotonic() + 10
        while len(self.router.pool.workers) < 2:
            assert time.monotonic() < deadline, "workers did not register"
            time.sleep(0.05)

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        for w in self.workers:
            self.run(w.stop())
        self.run(self.router.stop())
        for host in self.hosts:
            host.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_one_trace_from_router_through_prefill_transfer_and_decode(spans, tiny_model_dirs):
    import openai

    stack = InProcess(tiny_model_dirs["llama"])
    try:
        spans.clear()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key="x", max_retries=0)
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
        names = {"router.request", "decode.generate", "prefill", "kv.transfer", "decode.kv_receive"}
        deadline = time.monotonic() + 10
        while not names <= {s.name for s in spans.get_finished_spans()}:
            assert time.monotonic() < deadline, [s.name for s in spans.get_finished_spans()]
            time.sleep(0.05)
    finally:
        stack.close()
    finished = spans.get_finished_spans()
    by_name = {s.name: s for s in finished if s.name in names}
    root = by_name["router.request"]
    assert len({s.context.trace_id for s in finished}) == 1, "more than one trace"
    by_id = {s.context.span_id: s for s in finished}
    top = root
    while top.parent is not None:  # up to the HTTP server span FastAPI opens for the request
        top = by_id[top.parent.span_id]
    assert top.name == "POST /v1/completions"
    parent = {name: s.parent.span_id for name, s in by_name.items() if s.parent is not None}
    assert parent["decode.generate"] == root.context.span_id
    assert parent["prefill"] == root.context.span_id
    assert parent["kv.transfer"] == by_name["prefill"].context.span_id
    assert parent["decode.kv_receive"] == by_name["kv.transfer"].context.span_id
    assert by_name["kv.transfer"].attributes["tandem.bytes"] == EXPECTED_BYTES
    assert by_name["decode.generate"].attributes["tandem.prefill"] == "remote"
    assert root.attributes["tandem.decision"].startswith("remote")


# ---- one stack of processes: transfer metrics, the request log, traces over OTLP ----------------

class Collector:
    """A real OTLP trace collector (gRPC TraceService) that keeps what it receives."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        received = self.spans = []

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                for rs in request.resource_spans:
                    service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
                    for ss in rs.scope_spans:
                        received.extend((service, sp) for sp in ss.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.server.stop(None)  # after the stack (set up later, stopped first): its last spans find it


@pytest.fixture(scope="module")
def traced(collector, module_stack_factory, tiny_model_dirs):
    """A stack whose processes export traces to the collector, after one request. The tests below only
    read what that request left."""
    endpoint = ["--otlp-traces-endpoint", f"http://127.0.0.1:{collector.port}"]
    fast = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
    model = tiny_model_dirs["llama"]
    s = module_stack_factory(model, 1, 1, router_args=endpoint, worker_args=endpoint,
                             env={"router": fast, "prefill-0": fast, "decode-0": fast})
    s.openai().completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0)
    return s


def test_transfer_metrics_and_request_log(traced):
    s = traced
    for worker in ("prefill-0", "decode-0"):
        m = s.metrics(worker)
        assert total(m, "tandem:kv_transfers_total", outcome="success", transport="shm") == 1, worker
        assert total(m, "tandem:kv_transfer_bytes_total") == EXPECTED_BYTES, worker
    prefill = s.metrics("prefill-0")  # the sender knows send times: it measures the wire
    # each side names the other by worker id (an address changes with restarts: a new series each time)
    assert total(prefill, "tandem:kv_transfers_total", peer="decode-0") == 1
    assert total(s.metrics("decode-0"), "tandem:kv_transfers_total", peer="prefill-0") == 1
    for series in ("handshake_seconds", "queue_seconds", "wire_seconds", "throughput_gbps"):
        assert total(prefill, f"tandem:kv_transfer_{series}_count") == 1, series
    router = s.metrics()
    assert total(router, "tandem:kv_transfer_bytes_total", prefill="prefill-0", decode="decode-0") == EXPECTED_BYTES
    assert total(router, "tandem:router_prefill_decisions_total", decision="remote") == 1
    assert total(router, "tandem:time_to_first_token_seconds_count") == 1
    assert total(router, "tandem:inter_token_latency_seconds_count") == 3
    # the remote prefill is the request's prefill time, not queueing: decode held its blocks from the lease on
    prefill_s = total(router, "tandem:request_prefill_time_seconds_sum")
    assert total(router, "tandem:request_queue_time_seconds_sum") < prefill_s
    assert prefill_s <= total(router, "tandem:time_to_first_token_seconds_sum")
    assert total(router, "tandem:router_scoring_seconds_count") >= 2  # a decode and a prefill pick
    line = next(ln for ln in router_log(s).splitlines() if "prompt_tokens=200" in ln)
    for field in ("decision=remote", "decode=decode-0", "prefill=prefill-0", "transport=shm",
                  f"bytes={EXPECTED_BYTES}", "failure_class=none", "failovers=0", "cached_tokens=0"):
        assert field in line, (field, line)
    for number in ("gbps", "handshake_ms", "queue_ms", "wire_ms", "ttft_ms", "prefill_ms"):
        assert re.search(rf"\b{number}=\d+\.\d+", line), (number, line)


def test_otlp_export_from_every_process(traced, collector):
    want = {"tandem-router": "router.request", "tandem-prefill": "kv.transfer", "tandem-decode": "decode.generate"}
    deadline = time.monotonic() + 20
    while not all((svc, name) in {(a, b.name) for a, b in collector.spans} for svc, name in want.items()):
        assert time.monotonic() < deadline, sorted({(a, b.name) for a, b in collector.spans})
        time.sleep(0.1)
    traces = {sp.trace_id for svc, sp in collector.spans if sp.name in want.values()}
    assert len(traces) == 1, "the three processes' spans are not one trace"


def test_cached_tokens_of_a_remote_prefill_are_the_prefill_workers(stack_factory, tiny_model_dirs):
    """usage.prompt_tokens_details.cached_tokens: where prefill ran remotely, the prefill worker's prefix-cache
    hit (decode, caching nothing here, would report 0)."""
    model = tiny_model_dirs["llama"]
    s = stack_factory(model, 1, 1, router_args=["--local-prefill-threshold", "4"],
                      child_args={"decode-0": ["--no-enable-prefix-caching"]})
    usage = [s.openai().completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0).usage
             for _ in range(2)]
    assert total(s.metrics(), "tandem:router_prefill_decisions_total", decision="remote") == 2
    assert usage[0].prompt_tokens_details.cached_tokens == 0
    assert usage[1].prompt_tokens_details.cached_tokens == len(PROMPT) // 16 * 16  # the prompt's whole blocks
    assert f"cached_tokens={len(PROMPT) // 16 * 16}" in router_log(s)  # and the router's request log says so
