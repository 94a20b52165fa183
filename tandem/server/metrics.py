"""Prometheus metrics, named `tandem:*`, in a registry per app (several apps can share a process).

Request-level series (latencies, token counters, finished requests) are measured here, as the
API layer sees each stream, so they mean the same behind the router. Engine-level series (queue
lengths, KV usage, prefix cache, preemptions) are read from `EngineClient.stats()` at scrape time.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any, AsyncIterator, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tandem.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class _EngineCollector(Collector):
    """Engine gauges and cumulative counters, read from a stats() snapshot when scraped."""

    def __init__(self, stats: Callable[[], Any], model_name: str) -> None:
        self._stats = stats
        self._labels = [model_name]

    def collect(self) -> Iterable[Metric]:
        s = self._stats()
        for name, doc, value in (
                ("tandem:num_requests_running", "Requests in the running batch.", s.num_running),
                ("tandem:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
                ("tandem:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", s.kv_usage)):
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric(self._labels, value)
            yield gauge
        for name, doc, value in (
                ("tandem:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                 s.prefix_cache_queries),
                ("tandem:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
                ("tandem:num_preemptions", "Requests preempted (recomputed) for lack of KV blocks.",
                 s.num_preemptions)):
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric(self._labels, value)
            yield counter
        if getattr(s, "max_loras", 0):  # vLLM's series, which LoRA-aware routers read: its value is the time
            info = GaugeMetricFamily("tandem:lora_requests_info", "LoRA adapters of running and waiting requests.",
                                     labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
            info.add_metric([str(s.max_loras), ",".join(s.running_loras), ",".join(s.waiting_loras)], time.time())
            yield info


class ServerMetrics:
    """Every `tandem:` series of one app, and the stream wrapper that records per-request ones."""

    def __init__(self, model_name: str, stats: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, labels = self.registry, ["model_name"]
        self.ttft = Histogram("tandem:time_to_first_token_seconds", "Time to first token.", labels,
                              registry=r, buckets=_LATENCY_BUCKETS).labels(model_name)
        self.itl = Histogram("tandem:inter_token_latency_seconds", "Time between output tokens.", labels,
                             registry=r, buckets=_ITL_BUCKETS).labels(model_name)
        self.e2e = Histogram("tandem:e2e_request_latency_seconds", "Arrival to last token.", labels,
                             registry=r, buckets=_LATENCY_BUCKETS).labels(model_name)
        self.queue = Histogram("tandem:request_queue_time_seconds", "Arrival to first scheduling.", labels,
                               registry=r, buckets=_LATENCY_BUCKETS).labels(model_name)
        self.prefill = Histogram("tandem:request_prefill_time_seconds", "First scheduling to first token "
                                 "(a remote prefill and its KV transfer included).", labels,
                                 registry=r, buckets=_LATENCY_BUCKETS).labels(model_name)
        self.decode = Histogram("tandem:request_decode_time_seconds", "First token to last token.", labels,
                                registry=r, buckets=_LATENCY_BUCKETS).labels(model_name)
        self.prompt_tokens = Counter("tandem:prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("tandem:generation_tokens", "Output tokens generated.", labels,
                                         registry=r).labels(model_name)
        self.request_success = Counter("tandem:request_success", "Finished requests by finish reason "
                                       "(abort: the client left before the end).",
                                       labels + ["finished_reason"], registry=r)
        self.request_failures = Counter("tandem:request_failures", "Requests whose stream ended in an error "
                                        "(client disconnects not counted), by exception.",
                                        labels + ["exception"], registry=r)
        r.register(_EngineCollector(stats, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def track(self, outputs: AsyncIterator[RequestOutput], arrival: float) -> AsyncIterator[RequestOutput]:
        """Pass one request's outputs through, timing its tokens as the client receives them."""
        seen: dict[int, int] = {}  # tokens so far per output index
        last = first = arrival
        finished = False
        try:
            async for out in outputs:
                now = time.monotonic()
                counts = {o.index: len(o.token_ids) for o in out.outputs}
                steps = max((c - seen.get(i, 0) for i, c in counts.items()), default=0)
                new_tokens = sum(counts.values()) - sum(seen.values())
                if steps > 0:
                    if not seen:
                        first = now
                        self.ttft.observe(now - arrival)
                        self.prompt_tokens.inc(len(out.prompt_token_ids))
                        m = out.metrics
                        queued = 0.0  # the engine's own clock: only its differences are read
                        if m is not None and m.first_scheduled_time and m.arrival_time:
                            queued = max(m.first_scheduled_time - m.arrival_time, 0.0)
                            self.queue.observe(queued)
                        self.prefill.observe(max(now - arrival - queued, 0.0))
                        steps -= 1
                    for _ in range(steps):  # steps that arrived together split the gap evenly
                        self.itl.observe((now - last) / steps)
                    self.generation_tokens.inc(max(new_tokens, 0))
                    seen, last = counts, now
                if out.finished:
                    finished = True
                    self.e2e.observe(now - arrival)
                    if seen:
                        self.decode.observe(now - first)
                    reason = (out.outputs[0].finish_reason if out.outputs else None) or "stop"
                    self.request_success.labels(self.model_name, reason).inc()
                yield out
        except Exception as exc:  # counted, then handled by the caller as before
            self.request_failures.labels(self.model_name, type(exc).__name__).inc()
            raise
        except (GeneratorExit, asyncio.CancelledError):  # the client left first: vLLM's "abort"
            if not finished:
                self.request_success.labels(self.model_name, "abort").inc()
            raise
        finally:
            if isinstance(outputs, AsyncGenerator):  # close the source now, not at garbage collection
                await outputs.aclose()
