"""The store's Prometheus series, `tandem:kvstore_*`, read from a stats snapshot at scrape time
(the store counts with plain integers under its lock; nothing here runs on the hot path)."""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tandem.kvstore.store import StoreStats


class StoreCollector(Collector):
    def __init__(self, stats: Callable[[], StoreStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self._stats()
        for name, doc, values in (
                ("tandem:kvstore_capacity_bytes", "Bytes of KV blocks a tier may hold (its hard limit).",
                 s.capacity_bytes),
                ("tandem:kvstore_used_bytes", "Bytes of KV blocks a tier holds (on disk: file sizes).", s.used_bytes),
                ("tandem:kvstore_blocks", "KV blocks a tier holds (tiers are exclusive).", s.blocks)):
            yield _family(GaugeMetricFamily(name, doc, labels=["tier"]), values)
        for name, doc, values in (
                ("tandem:kvstore_hits", "Gets answered, by the tier the block was found in.", s.hits),
                ("tandem:kvstore_evictions", "Blocks that left a tier for room: DRAM spills them to disk "
                                             "(or drops them without one), disk drops them.", s.evictions)):
            yield _family(CounterMetricFamily(name, doc, labels=["tier"]), values)
        yield _family(CounterMetricFamily("tandem:kvstore_puts", "Puts, by outcome: stored, replaced, or "
                                          "refused (invalid, checksum_mismatch, too_large).", labels=["outcome"]),
                      s.puts)
        yield CounterMetricFamily("tandem:kvstore_misses", "Gets of blocks the store does not hold.", s.misses)
        yield CounterMetricFamily("tandem:kvstore_corrupt_reads", "Disk blocks whose file failed its checks "
                                  "when read (dropped, answered as misses).", s.corrupt_reads)
        yield GaugeMetricFamily("tandem:kvstore_event_subscribers", "Open Events streams.", s.subscribers)


def _family(family: GaugeMetricFamily | CounterMetricFamily, values: dict[str, int]):
    for label, value in sorted(values.items()):
        family.add_metric([label], value)
    return family


def store_registry(stats: Callable[[], StoreStats]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(StoreCollector(stats))
    return registry
