"""A worker's Prometheus metrics (engine gauges and counters, KV-transfer telemetry) and its HTTP
side: /health for probes and the launcher, /metrics for Prometheus."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tandem.proto import common_pb2
from tandem.server.metrics import _EngineCollector

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_GBPS = (0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 25.0, 50.0, 100.0)
_BYTES = tuple(float(2**k) for k in range(16, 34, 2))


class TransferMetrics:
    """`tandem:kv_transfer_*`, labelled by transport and, on workers, the peer (the other worker);
    the router labels them by prefill -> decode pair instead. One `record` per transfer,
    successful or not (failures count by class)."""

    def __init__(self, registry: CollectorRegistry, extra_labels: tuple[str, ...] = ("peer",)) -> None:
        labels = ["transport", *extra_labels]
        self.handshake = Histogram("tandem:kv_transfer_handshake_seconds", "KV transfer: stream open to lease "
                                   "accepted.", labels, registry=registry, buckets=_SECONDS)
        self.queue = Histogram("tandem:kv_transfer_queue_seconds", "KV transfer: time chunks waited between "
                               "compute and the wire (summed per transfer).", labels, registry=registry,
                               buckets=_SECONDS)
        self.wire = Histogram("tandem:kv_transfer_wire_seconds", "KV transfer: first chunk sent to last "
                              "acknowledged.", labels, registry=registry, buckets=_SECONDS)
        self.size = Histogram("tandem:kv_transfer_size_bytes", "KV transfer: bytes per transfer.", labels,
                              registry=registry, buckets=_BYTES)
        self.bytes = Counter("tandem:kv_transfer_bytes", "KV bytes transferred.", labels, registry=registry)
        self.gbps = Histogram("tandem:kv_transfer_throughput_gbps", "KV transfer: achieved GB/s on the wire.",
                              labels, registry=registry, buckets=_GBPS)
        self.transfers = Counter("tandem:kv_transfers", "KV transfers finished, by outcome.",
                                 labels + ["outcome"], registry=registry)
        self.failures = Counter("tandem:kv_transfer_failures", "KV transfers that failed, by failure class.",
                                labels + ["failure_class"], registry=registry)
        self.retransmits = Counter("tandem:kv_transfer_retransmits", "KV chunks sent again after a checksum "
                                   "mismatch.", labels, registry=registry)

    def record(self, stats: common_pb2.TransferStats, *extra: str) -> None:
        """`extra`: values of the extra labels (default: the stats' peer)."""
        labels = (stats.transport or "grpc", *(extra or (stats.peer or "unknown",)))
        if stats.retransmits:
            self.retransmits.labels(*labels).inc(stats.retransmits)
        if stats.failure_class:
            self.failures.labels(*labels, stats.failure_class).inc()
            self.transfers.labels(*labels, "failure").inc()
            return
        self.transfers.labels(*labels, "success").inc()
        if stats.handshake_s:
            self.handshake.labels(*labels).observe(stats.handshake_s)
        if stats.wire_s:  # measured by senders only
            self.queue.labels(*labels).observe(stats.queue_s)
            self.wire.labels(*labels).observe(stats.wire_s)
        self.size.labels(*labels).observe(stats.bytes)
        self.bytes.labels(*labels).inc(stats.bytes)
        if stats.gbps:
            self.gbps.labels(*labels).observe(stats.gbps)


class WorkerMetrics:
    def __init__(self, engine_host, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine_host.stats, model_name))
        self.transfers = TransferMetrics(self.registry)
        # prefill's side of the prefix KV store (tandem.prefill.store_link)
        self.store_blocks = Counter("tandem:kv_store_blocks", "Prefix KV blocks moved between this worker and "
                                    "the KV store, by direction (load, save).", ["direction"],
                                    registry=self.registry)
        self.store_failures = Counter("tandem:kv_store_failures", "KV store calls that failed (the prompt was "
                                      "computed here instead, or its blocks not saved), by direction.",
                                      ["direction"], registry=self.registry)
        for direction in ("load", "save"):  # every series exported from the start, at 0
            self.store_blocks.labels(direction)
            self.store_failures.labels(direction)


def probe_app(healthy: Callable[[], bool], registry: CollectorRegistry) -> Starlette:
    """A service's HTTP side: /health (200 while `healthy()`, else 503) and /metrics (`registry`)."""
    async def health(_: Request) -> Response:
        return Response(status_code=200 if healthy() else 503)

    async def scrape(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/health", health), Route("/metrics", scrape)])


def http_app(engine_host, metrics: WorkerMetrics) -> Starlette:
    return probe_app(lambda: engine_host.is_healthy(), metrics.registry)
