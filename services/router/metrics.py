"""The router's own series, added to the OpenAI app's registry (which already has TTFT, ITL and
end-to-end latency as the client saw them): prefill decisions, failovers, scoring time, KV
transfers per prefill -> decode pair, the worker pool, and the KV store's index."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tandem.proto import router_pb2
from tandem.router.pool import WorkerPool
from tandem.router.store_index import StoreIndex
from tandem.worker.metrics import TransferMetrics

DECISIONS = ("remote", "local", "fallback")


class _PoolCollector(Collector):
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def collect(self):
        gauge = GaugeMetricFamily("tandem:router_workers", "Workers the router knows, by role and state.",
                                  labels=["role", "state"])
        counts: dict[tuple[str, str], int] = {}
        for w in self.pool.workers.values():
            key = (router_pb2.Role.Name(w.role).lower(), "down" if w.gone else "up")
            counts[key] = counts.get(key, 0) + 1
        for role in ("prefill", "decode"):
            for state in ("up", "down"):
                gauge.add_metric([role, state], counts.get((role, state), 0))
        yield gauge


class _StoreCollector(Collector):
    def __init__(self, store: StoreIndex) -> None:
        self.store = store

    def collect(self):
        yield GaugeMetricFamily("tandem:router_kv_store_blocks", "Blocks the prefix KV store holds, as its events "
                                "told the router.", value=len(self.store))
        yield CounterMetricFamily("tandem:router_kv_store_resubscriptions", "Times the router subscribed to the "
                                  "KV store's events again (the store restarted or was unreachable, or the "
                                  "router fell behind).", value=self.store.resubscriptions)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, pool: WorkerPool, store: StoreIndex | None = None) -> None:
        self.decisions = Counter("tandem:router_prefill_decisions", "Where prompts were prefilled: remote "
                                 "(a prefill worker), local (decode, by policy) or fallback (decode, after remote "
                                 "prefill failed or was impossible).", ["decision", "reason"], registry=registry)
        self.failovers = Counter("tandem:router_decode_failovers", "Requests moved to another decode worker "
                                 "after theirs failed.", registry=registry)
        self.prefill_retries = Counter("tandem:router_prefill_retries", "Remote prefills tried again on another "
                                       "prefill worker.", registry=registry)
        self.scoring = Histogram("tandem:router_scoring_seconds", "Time to pick workers for a request.",
                                 registry=registry, buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
                                                             1e-2, 5e-2))
        self.prefill_time = Histogram("tandem:router_prefill_seconds", "Remote prefill call, as the router saw it "
                                      "(compute and transfer).", ["prefill", "decode"], registry=registry,
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.transfers = TransferMetrics(registry, ("prefill", "decode"))
        registry.register(_PoolCollector(pool))
        if store is not None:
            registry.register(_StoreCollector(store))
        for decision, reason in zip(DECISIONS, ("uncached_above_threshold", "below_threshold", "prefill_failed")):
            self.decisions.labels(decision, reason)  # present from the start: rates and ratios exist at zero
