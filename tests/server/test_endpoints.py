"""/v1/models, /tokenize, /detokenize, /health, /version, /metrics, X-Request-Id, API key, CORS."""
from __future__ import annotations

import httpx
import openai
import pytest

import tandem
from tandem.server.config import ServerConfig


def test_models_version_health(tiny):
    models = tiny.openai().models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    assert models.data[0].owned_by == "tandem" and models.data[0].model_extra["max_model_len"] == 512
    assert tiny.get("/version").json() == {"version": tandem.__version__}
    assert tiny.get("/health").status_code == 200


def test_tokenize_detokenize(tiny):
    tok = tiny.client.tokenizer
    r = tiny.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 512 and r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    assert tiny.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    chat = tiny.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert tok.decode(chat["tokens"]).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    for path, body, param in (("/detokenize", {"tokens": [10**9]}, "tokens"),
                              ("/detokenize", {"tokens": [-1]}, "tokens"),
                              ("/tokenize", {}, "prompt"),
                              ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
                              ("/tokenize", {"prompt": "a", "model": "nope"}, "model")):
        bad = tiny.post(path, json=body)
        assert bad.status_code == (404 if param == "model" else 400), bad.text
        assert bad.json()["error"]["param"] == param


def test_metrics_move_with_requests(tiny):
    before = tiny.wait_idle()
    for name in ("tandem:time_to_first_token_seconds_count", "tandem:inter_token_latency_seconds_count",
                 "tandem:e2e_request_latency_seconds_count", "tandem:request_queue_time_seconds_count",
                 "tandem:request_prefill_time_seconds_count", "tandem:request_decode_time_seconds_count",
                 "tandem:prompt_tokens_total", "tandem:generation_tokens_total", "tandem:num_preemptions_total",
                 "tandem:prefix_cache_queries_total", "tandem:prefix_cache_hits_total"):
        assert name in before, f"{name} missing from /metrics"
    prompt = "metrics " * 40  # > 2 blocks, so the second request hits the prefix cache
    r1 = tiny.openai().completions.create(model=tiny.model, prompt=prompt, max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
    r2 = tiny.openai().completions.create(model=tiny.model, prompt=prompt, max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
    after = tiny.wait_idle()

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert delta("tandem:prompt_tokens_total") == r1.usage.prompt_tokens + r2.usage.prompt_tokens
    assert delta("tandem:generation_tokens_total") == 10
    assert delta("tandem:time_to_first_token_seconds_count") == 2
    assert delta("tandem:e2e_request_latency_seconds_count") == 2
    assert delta("tandem:request_queue_time_seconds_count") == 2
    # each request's e2e splits into queue + prefill + decode (sums over the two requests)
    assert delta("tandem:request_prefill_time_seconds_count") == delta("tandem:request_decode_time_seconds_count") == 2
    parts = sum(delta(f"tandem:request_{p}_time_seconds_sum") for p in ("queue", "prefill", "decode"))
    assert parts == pytest.approx(delta("tandem:e2e_request_latency_seconds_sum"), rel=0.05, abs=0.01)
    assert delta("tandem:inter_token_latency_seconds_count") == 8  # 4 gaps per 5-token request
    assert delta('tandem:request_success_total{finished_reason="length"}') == 2
    assert delta("tandem:prefix_cache_queries_total") >= 2 * r1.usage.prompt_tokens
    assert delta("tandem:prefix_cache_hits_total") >= 32
    assert after["tandem:kv_cache_usage_perc"] == 0.0


def test_api_key_request_id_cors_and_names(tiny_engine, serve):
    server = serve(tiny_engine, ServerConfig(api_key="sekret", served_model_names=["alias-a", "alias-b"],
                                             enable_request_id_headers=True,
                                             allowed_origins=["http://ui.example"]))
    with pytest.raises(openai.AuthenticationError) as e:
        server.openai(api_key="wrong").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert server.get("/v1/models").status_code == 401
    good = server.openai(api_key="sekret")
    assert [m.id for m in good.models.list().data] == ["alias-a", "alias-b"]
    for name in ("alias-a", "alias-b"):
        r = good.completions.create(model=name, prompt="x", max_tokens=1)
        assert r.model == name
    assert server.get("/health").status_code == 200  # outside /v1: no key needed
    # X-Request-Id: echoed when given, generated (and used as the response id) when not
    r = server.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                    headers={"Authorization": "Bearer sekret", "X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123" and r.json()["id"] == "cmpl-abc-123"
    r = server.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                    headers={"Authorization": "Bearer sekret"})
    assert len(r.headers["x-request-id"]) == 32 and r.json()["id"] == "cmpl-" + r.headers["x-request-id"]
    # CORS: preflight without a key passes, the origin is allowed, others are not
    pre = httpx.options(server.url + "/v1/completions", headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://ui.example"
    other = server.get("/version", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    unauth = server.get("/v1/models", headers={"Origin": "http://ui.example"})
    assert unauth.status_code == 401 and unauth.headers["access-control-allow-origin"] == "http://ui.example"


def test_request_id_header_off_by_default(tiny):
    r = tiny.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert "x-request-id" not in r.headers
