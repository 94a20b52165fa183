"""LoRA adapters in the disaggregated stack (in-process router and workers on real gRPC): workers started
with `--lora-modules` advertise their adapters; the gateway serves each as a model; the router sends an
adapter's request only to workers that serve it (the `adapter` filter), prefill computes the prompt's KV
under the adapter, and the output equals transformers' on the merged weights. With no prefill worker that
serves it, decode computes the prompt itself."""
from __future__ import annotations

import openai
import pytest

from tests.disagg.test_kv_store import PROMPT, Stack
from tests.engine.test_lora import make_adapter, merged_greedy


def _transfers(stack: Stack, name: str) -> float:
    registry = stack.workers[name].metrics.registry
    return sum(x.value for m in registry.collect() if m.name == "tandem:kv_transfers" for x in m.samples
               if x.name.endswith("_total") and x.labels["outcome"] == "success")


def test_an_adapters_requests_go_to_the_workers_that_serve_it(tiny_model_dirs, tmp_path):
    from tandem.proto import router_pb2

    base = tiny_model_dirs["llama"]
    deltas = make_adapter(base, str(tmp_path / "sql"), 11, ("q_proj", "k_proj", "gate_proj"))
    loras = {"sql": str(tmp_path / "sql")}
    want = {name: merged_greedy(base, d, [PROMPT])[0][:6] for name, d in (("tiny", None), ("sql", deltas))}
    assert want["sql"] != want["tiny"]
    stack = Stack(base, decode_loras=loras)
    try:
        text = stack.router.app.state.ctx.token_text
        stack.start(router_pb2.PREFILL, "prefill-plain")
        stack.start(router_pb2.PREFILL, "prefill-sql", loras=loras)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key="x", max_retries=0)
        cards = {m.id: m for m in client.models.list().data}
        assert set(cards) == {"tiny", "sql"} and cards["sql"].model_extra["parent"] == "tiny"
        for _ in range(2):  # either prefill worker could take it by load: the filter leaves one
            assert stack.complete(model="sql") == [text(t) for t in want["sql"]]
            stack.forget_decode_cache()
        assert _transfers(stack, "prefill-sql") == 2 and _transfers(stack, "prefill-plain") == 0
        registry = stack.router.app.state.ctx.metrics.registry  # never sent to prefill-plain, which refuses it
        assert not registry.get_sample_value("tandem:router_prefill_retries_total")
        assert stack.complete(model="tiny") == [text(t) for t in want["tiny"]]  # the base model's KV is not sql's
        stack.forget_decode_cache()
        stack.stop("prefill-sql")
        fallbacks = stack.decisions("fallback")
        assert stack.complete(model="sql") == [text(t) for t in want["sql"]]  # decode computes it
        assert stack.decisions("fallback") == fallbacks + 1 and _transfers(stack, "prefill-plain") <= 1
        with pytest.raises(openai.NotFoundError):
            stack.complete(model="chat")
    finally:
        stack.close()
