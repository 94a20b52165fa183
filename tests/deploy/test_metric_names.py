"""Every series a dashboard panel or a Prometheus rule reads is one the code exports: each PromQL expression
is parsed (promql-parser), its selectors collected, and compared with the live /metrics of a real
router, prefill and decode worker after one disaggregated request."""
from __future__ import annotations

import asyncio
import json
import re
import time
from types import SimpleNamespace

import httpx
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import ROOT

DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
RULES = ROOT / "deploy" / "prometheus" / "tandem-rules.yaml"
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself for every target
# labels Prometheus or the chart's ServiceMonitors attach at scrape time; `le` is a histogram's
SCRAPE_LABELS = {"namespace", "model", "component", "pod", "service", "job", "instance", "endpoint", "container",
                 "le"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", "")}


def as_promql(expr: str) -> str:
    """Grafana's variables replaced by values PromQL accepts."""
    expr = re.sub(r"\$__(rate_)?interval|\$\{__(rate_)?interval\}", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every label_values() variable query."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((f"{path.name}: {panel['title']}", as_promql(target["expr"])))
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["definition"]).group(1)
                out.append((f"{path.name}: ${var['name']}", as_promql(selector)))
    return out


def rule_queries() -> tuple[list[tuple[str, str]], set[str]]:
    """(rule, PromQL) for every rule, and the names the recording rules define."""
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    return [(r.get("alert") or r["record"], r["expr"]) for r in rules], {r["record"] for r in rules if "record" in r}


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every vector selector in `expr`."""
    found = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers}
            found.append((node.name, labels))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def exported(url: str) -> dict[str, set[str] | None]:
    """Series name -> label names (None where no sample shows them yet) of one /metrics page."""
    out: dict[str, set[str] | None] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            out.setdefault(family.name + suffix, None)
        for sample in family.samples:
            labels = out.get(sample.name) or set()
            out[sample.name] = labels | set(sample.labels)
    return out


def test_queries_parse_and_dashboards_are_wired():
    queries = dashboard_queries() + rule_queries()[0]
    assert len(queries) > 50
    for where, expr in queries:
        assert selectors(expr), where  # parses, and reads at least one series
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        assert {"namespace", "model"} <= set(variables)
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in board["panels"]:
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
                assert all('namespace=~"$namespace"' in t["expr"] for t in panel["targets"]), panel["title"]


def test_rules_are_well_formed():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert {"TandemTTFTBudgetBurnFast", "TandemITLBudgetBurnFast", "TandemKVTransferFailures",
            "TandemSilentLocalPrefillFallback", "TandemDecodeWorkersMissing"} <= {a["alert"] for a in alerts}
    for alert in alerts:
        assert alert["labels"]["severity"] in ("critical", "warning"), alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], alert["alert"]
        promql_parser.parse_duration(alert["for"])


def test_every_series_read_is_exported(stack_factory, tiny_model_dirs):
    model = tiny_model_dirs["llama"]
    s = stack_factory(model, 1, 1, kv_store_bytes=64 << 20)  # the router follows a KV store: its series too
    prompt = list(range(100, 140))  # over the router's local-prefill threshold: prefilled remotely
    s.openai().completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0)
    live: dict[str, dict[str, set[str] | None]] = {
        name: exported(f"http://{s.host}:{s.child(name).http_port}/metrics") for name in ("router", "prefill-0",
                                                                                            "decode-0")}
    assert live["router"]["tandem:time_to_first_token_seconds_bucket"]  # the request was measured

    rule_exprs, recorded = rule_queries()
    missing, unknown_labels = [], []
    for where, expr in dashboard_queries() + rule_exprs:
        for name, labels in selectors(expr):
            if name in recorded or name in PROMETHEUS_OWN:
                continue
            sources = [m[name] for m in live.values() if name in m]
            if not sources:
                missing.append(f"{where}: {name}")
                continue
            known = [ls for ls in sources if ls is not None]
            if known and labels - SCRAPE_LABELS - set().union(*known):
                unknown_labels.append(f"{where}: {name} {sorted(labels - SCRAPE_LABELS - set().union(*known))}")
    assert not missing, "series no process exports:\n" + "\n".join(missing)
    assert not unknown_labels, "labels the series do not carry:\n" + "\n".join(unknown_labels)


def test_failed_streams_are_counted_and_disconnects_are_not():
    """tandem:request_failures, which the error panels read: a stream that raises counts, a client that goes
    away (the stream closed early) does not."""
    from tandem.outputs import CompletionOutput, RequestOutput
    from tandem.server.metrics import ServerMetrics

    stats = SimpleNamespace(num_running=0, num_waiting=0, kv_usage=0.0, prefix_cache_queries=0,
                            prefix_cache_hits=0, num_preemptions=0)
    metrics = ServerMetrics("m", lambda: stats)

    async def stream(fail: bool):
        yield RequestOutput("r", "", [1], None, [CompletionOutput(0, "a", [5], None, None)], finished=False)
        if fail:
            raise RuntimeError("decode worker gone")
        yield RequestOutput("r", "", [1], None, [CompletionOutput(0, "ab", [5, 6], None, None)], finished=False)

    async def consume(fail: bool, stop_early: bool) -> None:
        tracked = metrics.track(stream(fail), time.monotonic())
        async for _ in tracked:
            if stop_early:
                break
        await tracked.aclose()

    asyncio.run(consume(fail=False, stop_early=True))
    with pytest.raises(RuntimeError):
        asyncio.run(consume(fail=True, stop_early=False))
    failures = {s.labels["exception"]: s.value for f in text_string_to_metric_families(metrics.render().decode())
                if f.name == "tandem:request_failures" for s in f.samples if s.name.endswith("_total")}
    assert failures == {"RuntimeError": 1.0}
