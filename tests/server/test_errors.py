"""Every bad request gets OpenAI's error body and the right status; no input produces a 500 or a
422; an engine failure fails the requests in flight (500) and the server keeps serving."""
from __future__ import annotations

import json
import threading

import openai
import pytest

from tests.server.conftest import make_engine

CMPL = {"prompt": "hello", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _assert_openai_error(r, status: int, param: str | None = None, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    if param is not None:
        assert err["param"] == param, err
    for word in words:
        assert word in err["message"], err
    return err


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", {**CMPL, "temperature": -1}, "temperature", ["greater than or equal to 0"]),
    ("/v1/completions", {**CMPL, "temperature": "hot"}, "temperature", ["number"]),
    ("/v1/completions", {**CMPL, "top_p": 1.5}, "top_p", []),
    ("/v1/completions", {**CMPL, "n": 0}, "n", []),
    ("/v1/completions", {**CMPL, "n": 129}, "n", []),
    ("/v1/completions", {**CMPL, "max_tokens": 0}, "max_tokens", []),
    ("/v1/completions", {**CMPL, "max_tokens": 3, "min_tokens": 4}, "min_tokens", ["max_tokens"]),
    ("/v1/completions", {**CMPL, "stop": [""]}, "stop", ["non-empty"]),
    ("/v1/completions", {**CMPL, "stop": 5}, "stop", []),
    ("/v1/completions", {**CMPL, "logprobs": 21}, "logprobs", ["20"]),
    ("/v1/completions", {**CMPL, "best_of": 1, "n": 2}, "best_of", []),
    ("/v1/completions", {**CMPL, "stream": True, "best_of": 3}, "best_of", ["streaming"]),
    ("/v1/completions", {**CMPL, "stream_options": {"include_usage": True}}, "stream_options", []),
    ("/v1/completions", {**CMPL, "logit_bias": {"5": 10}}, "logit_bias", []),
    ("/v1/completions", {**CMPL, "stop_token_ids": [10**6]}, "stop_token_ids", ["vocabulary"]),
    ("/v1/completions", {**CMPL, "seed": "x"}, "seed", []),
    ("/v1/completions", {**CMPL, "seed": 2**63}, "seed", []),  # past int64: before any stream starts
    ("/v1/completions", {**CMPL, "stream": True, "priority": 2**40}, "priority", []),
    ("/v1/chat/completions", {**CHAT, "stream": True, "seed": -2**63 - 1}, "seed", []),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", ["20"]),
    ("/v1/completions", {"max_tokens": 2}, "prompt", ["required"]),
    ("/v1/completions", {"prompt": [], "max_tokens": 2}, "prompt", ["empty"]),
    ("/v1/completions", {"prompt": [[]], "max_tokens": 2}, None, ["empty"]),
    ("/v1/completions", {"prompt": [1, "a"], "max_tokens": 2}, "prompt", []),
    ("/v1/completions", {"prompt": [5, 10**7], "max_tokens": 2}, "prompt", ["[0, 49152)"]),
    ("/v1/completions", {"prompt": [5, -1], "max_tokens": 2}, "prompt", ["[0, 49152)"]),
    ("/v1/completions", {"prompt": ["a"] * 300, "max_tokens": 2}, "n", ["256"]),
    ("/v1/chat/completions", {"max_tokens": 2}, "messages", ["required"]),
    ("/v1/chat/completions", {"messages": [], "max_tokens": 2}, "messages", []),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages", ["role"]),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages", ["role"]),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice", []),
    ("/v1/completions", {**CMPL, "response_format": {"type": "json_schema"}}, "response_format", ["schema"]),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, "response_format", ["json_object"]),
    ("/v1/completions", {**CMPL, "response_format": {"type": "json_schema", "json_schema": "x"}}, "response_format",
     ["schema"]),
    ("/v1/completions", {**CMPL, "guided_choice": ["a"], "response_format": {"type": "json_object"}}, "response_format",
     ["one output constraint"]),
    ("/v1/chat/completions", {**CHAT, "structured_outputs": {"regex": "a+", "choice": ["b"]}}, "structured_outputs",
     ["exactly one"]),
    ("/v1/chat/completions", {**CHAT, "structured_outputs": {"whitespace": 1}}, "structured_outputs", []),
    ("/v1/completions", {**CMPL, "structured_outputs": {"regex": "(a"}}, "structured_outputs", ["compiled"]),
    ("/v1/completions", {**CMPL, "guided_json": {"type": "nonsense"}}, "guided_json", ["compiled"]),
    ("/v1/completions", {**CMPL, "stream": True, "guided_grammar": "root ::= oops"}, "guided_grammar", ["compiled"]),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "nonsense"}}}}, "response_format", ["compiled"]),
    ("/v1/chat/completions", {**CHAT, "top_k": -5}, "top_k", []),
    ("/v1/chat/completions", {**CHAT, "repetition_penalty": 0}, "repetition_penalty", []),
])
def test_invalid_parameters_are_400(tiny, path, body, param, words):
    _assert_openai_error(tiny.post(path, json=body), 400, param, *words)


@pytest.mark.parametrize("content, content_type", [
    (b"{not json", "application/json"), (b"[1, 2]", "application/json"), (b"null", "application/json"),
    (b'{"prompt": "a", "temperature": NaN}', "application/json"),
    (b'{"prompt": "a", "temperature": 1e999}', "application/json"),
    (b"\xff\xfe", "application/json"), (b"prompt=a", "application/x-www-form-urlencoded"), (b"", "")])
def test_malformed_bodies_are_400_never_422(tiny, content, content_type):
    headers = {"content-type": content_type} if content_type else {}
    _assert_openai_error(tiny.post("/v1/completions", content=content, headers=headers), 400)


def test_context_length_errors_name_both_lengths(tiny):
    long_prompt = list(range(100, 700))  # 600 tokens, the context is 512
    err = _assert_openai_error(tiny.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1}), 400)
    assert "512" in err["message"] and "600" in err["message"]
    err = _assert_openai_error(tiny.post("/v1/completions", json={"prompt": list(range(100, 400)),
                                                                  "max_tokens": 300}), 400, "max_tokens")
    assert "512" in err["message"] and "600" in err["message"] and "300 in the prompt" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        tiny.openai().chat.completions.create(model=tiny.model, max_tokens=600,
                                              messages=[{"role": "user", "content": "hi"}])
    assert "512" in e.value.body["message"]
    # without max_tokens the room left is used: the request fits and runs to the context's end
    ok = tiny.post("/v1/completions", json={"prompt": list(range(100, 500)), "max_tokens": None,
                                            "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 112


def test_unknown_model_route_and_method(tiny):
    for path, body in (("/v1/completions", CMPL), ("/v1/chat/completions", CHAT)):
        err = _assert_openai_error(tiny.post(path, json={**body, "model": "gpt-9"}), 404, "model", "gpt-9")
        assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        tiny.openai().completions.create(model="gpt-9", prompt="a", max_tokens=1)
    _assert_openai_error(tiny.get("/v1/nothing-here"), 404)
    _assert_openai_error(tiny.get("/v1/completions"), 405)


def test_surrogates_and_odd_text_are_not_500(tiny):
    lone = '{"prompt": "a\\ud800b", "max_tokens": 2}'.encode()
    r = tiny.post("/v1/completions", content=lone, headers={"content-type": "application/json"})
    assert r.status_code in (200, 400), r.text
    r = tiny.post("/v1/completions", content='{"prompt": "a", "model": "\\udfff"}'.encode(),
                  headers={"content-type": "application/json"})
    _assert_openai_error(r, 404, "model")
    r = tiny.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "stop": ["\x00", "\U0001F600"],
                                           "bad_words": ["\u200b"], "echo": True, "request_id": "\u00e9"})
    assert r.status_code == 200 and r.json()["id"] == "cmpl-\u00e9"


def test_engine_failure_fails_in_flight_then_recovers(tiny_model_dirs, serve):
    engine = make_engine(tiny_model_dirs["llama"], num_blocks=64, model_name="fragile")
    server = serve(engine)
    client = server.openai()
    runner = engine.engine.runner
    real_execute = runner.execute
    broken = threading.Event()

    def execute(*args, **kwargs):  # fault injection: the real step, or a failure on demand
        if broken.is_set():
            raise RuntimeError("injected fault")
        return real_execute(*args, **kwargs)

    runner.execute = execute
    try:
        stream = client.completions.create(model=server.model, prompt="x", max_tokens=450, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        broken.set()
        with pytest.raises(openai.APIError) as e:
            for _ in stream:
                pass
        assert "injected fault" in str(e.value)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=server.model, prompt="y", max_tokens=3)
        assert e.value.body["type"] == "server_error"
        broken.clear()
        ok = client.completions.create(model=server.model, prompt="z", max_tokens=3, extra_body={"ignore_eos": True})
        assert ok.usage.completion_tokens == 3 and server.get("/health").status_code == 200
        server.wait_idle()
        # a failure the loop cannot clean up after kills it: requests fail fast, health says so
        broken.set()

        def abort_request(ids):
            raise RuntimeError("cleanup failed")

        engine.engine.abort_request = abort_request
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=server.model, prompt="w", max_tokens=3)
        assert e.value.status_code >= 500
        assert server.get("/health").status_code == 503
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=server.model, prompt="v", max_tokens=3, timeout=10)
        assert e.value.status_code == 503
    finally:
        engine.shutdown()


def test_large_bodies_are_prepared_off_the_event_loop_with_the_same_answers(tiny):
    """Bodies past LARGE_BODY_BYTES are templated and tokenized on a helper thread (seconds of work that
    every other stream would wait out on the event loop): their errors are the same 400s, and small
    requests beside them are served."""
    from tandem.server.serving_common import LARGE_BODY_BYTES

    big = "word " * (LARGE_BODY_BYTES // 5 + 1000)
    err = _assert_openai_error(tiny.post("/v1/completions", json={"prompt": big, "max_tokens": 1}), 400, "prompt")
    assert "512" in err["message"]
    chat = {"messages": [{"role": "user", "content": big}], "max_tokens": 1}
    _assert_openai_error(tiny.post("/v1/chat/completions", json=chat), 400, "messages", "512")
    bad = json.dumps({"messages": [{"role": "user", "content": big + "\ud800"}], "max_tokens": 1})  # lone surrogate
    _assert_openai_error(tiny.post("/v1/chat/completions", content=bad, headers={"content-type": "application/json"}),
                         400, "messages")
    assert tiny.post("/v1/completions", json=CMPL).status_code == 200
