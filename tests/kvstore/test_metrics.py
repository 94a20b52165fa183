"""The HTTP side: /health for probes, /metrics with every `tandem:kvstore_*` series and values
that follow what the store did."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.kvstore.conftest import NS, block


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_health_and_metrics_follow_the_store(kvstore, tmp_path):
    kv = kvstore(capacity_bytes=2000, disk_dir=tmp_path, disk_capacity_bytes=4080)
    assert httpx.get(f"{kv.http}/health", timeout=5).status_code == 200
    for i in (1, 2, 3, 4):
        kv.put(i, block(i))  # 1 and 2 spill
    kv.get(4)
    kv.get(1)  # a disk hit: promoted, 3 spills
    kv.get(99)
    (tmp_path / NS / f"{2:016x}.kvb").write_bytes(b"x")
    kv.get(2)  # corrupt: a miss
    m = scrape(kv.http)
    tier = lambda name, t: m[(name, (("tier", t),))]  # noqa: E731
    assert tier("tandem:kvstore_capacity_bytes", "dram") == 2000
    assert tier("tandem:kvstore_capacity_bytes", "disk") == 4080
    assert (tier("tandem:kvstore_used_bytes", "dram"), tier("tandem:kvstore_used_bytes", "disk")) == (2000, 1020)
    assert (tier("tandem:kvstore_blocks", "dram"), tier("tandem:kvstore_blocks", "disk")) == (2, 1)
    assert (tier("tandem:kvstore_hits_total", "dram"), tier("tandem:kvstore_hits_total", "disk")) == (1, 1)
    assert (tier("tandem:kvstore_evictions_total", "dram"), tier("tandem:kvstore_evictions_total", "disk")) == (3, 0)
    assert m[("tandem:kvstore_misses_total", ())] == 2
    assert m[("tandem:kvstore_corrupt_reads_total", ())] == 1
    assert m[("tandem:kvstore_puts_total", (("outcome", "stored"),))] == 4
    assert m[("tandem:kvstore_event_subscribers", ())] == 0


def test_a_dram_only_store_exports_no_disk_series_and_turns_unhealthy_when_stopping(kvstore):
    kv = kvstore(capacity_bytes=1000)
    m = scrape(kv.http)
    assert {labels for name, labels in m if name == "tandem:kvstore_capacity_bytes"} == {(("tier", "dram"),)}
    kv.store.close()  # what SIGTERM does first: probes see 503 while in-flight calls finish
    assert httpx.get(f"{kv.http}/health", timeout=5).status_code == 503
