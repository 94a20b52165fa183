"""Structured outputs through the router (in-process, real gRPC): the router compiles a request's
constraint as its decode workers will, so a bad one is the client's 400 before any worker runs it; a
good one reaches decode, which samples every token, the first included, under it."""
from __future__ import annotations

import httpx

from tests.disagg.test_kv_store import PROMPT, Stack


def test_constraints_are_checked_at_the_router_and_kept_by_decode(tiny_model_dirs):
    from tandem.proto import router_pb2

    stack = Stack(tiny_model_dirs["llama"])
    try:
        stack.start(router_pb2.PREFILL, "prefill-a")
        url = f"http://127.0.0.1:{stack.port}/v1/completions"
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        bad = httpx.post(url, json={**body, "guided_regex": "(unclosed"}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_regex", bad.text
        running = stack.decode.host.engine.stats()
        assert running.num_running == running.num_waiting == 0
        ok = httpx.post(url, json={**body, "structured_outputs": {"choice": ["left", "right"]}}, timeout=60)
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] in ("left", "right"), ok.text
        registry = stack.workers["prefill-a"].metrics.registry
        sent = sum(x.value for m in registry.collect() if m.name == "tandem:kv_transfers" for x in m.samples
                   if x.name.endswith("_total") and x.labels["outcome"] == "success")
        assert sent == 1  # the prompt went through remote prefill
    finally:
        stack.close()
