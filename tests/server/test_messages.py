"""POST /v1/messages (Anthropic's Messages API) through the official `anthropic` client: the chat route's answer
as content blocks, streamed as Anthropic's events, tool_use and tool_result blocks both ways, stop reasons,
reasoning as a thinking block, count_tokens, and errors in Anthropic's shape."""
from __future__ import annotations

import json
import threading

import anthropic
import pytest

from tandem.server.config import ServerConfig
from tests.server.conftest import make_engine
from tests.server.test_reasoning import OPENS
from tests.server.test_tool_parsers import HERMES, HERMES_REPLY

SYSTEM = "Answer in one word."
QUESTION = "What color is the sky?"
TOOLS = [{"name": "get_weather", "input_schema": {"type": "object"}},
         {"name": "get_time", "description": "The time in a zone.", "input_schema": {"type": "object"}}]
# ChatML that writes assistants' tool calls and tools' call ids, so dropping either changes the prompt
CALLS_SHOWN = ("{% for m in messages %}<|im_start|>{{ m.role }}{% if m.tool_call_id %} {{ m.tool_call_id }}{% endif %}"
               "\n{{ m.content }}{% for c in m.tool_calls or [] %}<tool_call>{{ c.id }} {{ c.function.name }} "
               "{{ c.function.arguments }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chat(server, messages, **kwargs):
    return server.openai().chat.completions.create(model=server.model, messages=messages, temperature=0, **kwargs)


# this client has no sampling arguments (Anthropic's newer models take none): the server still reads them
GREEDY = {"temperature": 0}


def _forced(reply: str) -> dict:
    """vLLM's extra field that holds the tiny model's reply to `reply`, greedy."""
    return {**GREEDY, "structured_outputs": {"choice": [reply], "after": None}}


def test_a_message_is_the_chat_answer_as_blocks(smol):
    chat = _chat(smol, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}], max_tokens=6)
    msg = smol.anthropic().messages.create(model=smol.model, system=SYSTEM, max_tokens=6, extra_body=GREEDY,
                                           messages=[{"role": "user", "content": QUESTION}])
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant" and msg.model == smol.model
    (block,) = msg.content
    assert block.type == "text" and block.text == chat.choices[0].message.content
    assert msg.usage.input_tokens == chat.usage.prompt_tokens
    assert msg.usage.output_tokens == chat.usage.completion_tokens
    assert msg.usage.cache_read_input_tokens > 0  # the chat before it left the same prompt cached
    assert msg.usage.cache_creation_input_tokens == 0
    assert msg.stop_reason == ("max_tokens" if chat.choices[0].finish_reason == "length" else "end_turn")
    assert msg.stop_sequence is None


def test_streamed_events_add_up_to_the_message(smol):
    client = smol.anthropic()
    kwargs = dict(model=smol.model, max_tokens=12, extra_body=GREEDY, messages=[{"role": "user", "content": QUESTION}])
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        events = [e for e in stream if e.type in ("message_start", "content_block_start", "content_block_delta",
                                                  "content_block_stop", "message_delta", "message_stop")]
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert events[0].message.content == [] and events[0].message.usage.input_tokens == whole.usage.input_tokens
    assert "".join(e.delta.text for e in events[2:-3]) == whole.content[0].text
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert (final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == (
        whole.stop_reason, whole.usage.input_tokens, whole.usage.output_tokens)
    # on the wire: each event's `event:` line names its data's type, as Anthropic sends them
    raw = smol.post("/v1/messages", json={**{k: v for k, v in kwargs.items() if k != "extra_body"}, **GREEDY, "stream": True}).text.strip().split("\n\n")
    for frame in raw:
        name, data = frame.split("\n")
        assert name == "event: " + json.loads(data.removeprefix("data: "))["type"]
    assert raw[0].startswith("event: message_start") and raw[-1].startswith("event: message_stop")


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_come_back_as_tool_use_blocks(tiny_engine, serve, stream):
    server = serve(tiny_engine, ServerConfig(chat_template=HERMES))
    kwargs = dict(model=server.model, max_tokens=120, tools=TOOLS, extra_body=_forced(HERMES_REPLY),
                  messages=[{"role": "user", "content": "Weather in Paris, and the time in UTC?"}])
    if stream:
        with server.anthropic().messages.stream(**kwargs) as s:
            events = list(s)
            msg = s.get_final_message()
        starts = [e.content_block for e in events if e.type == "content_block_start"]
        assert [b.type for b in starts] == ["text", "tool_use", "tool_use"]
        for i in (1, 2):  # each call's input streamed as JSON pieces that join to its arguments
            pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta" and e.index == i]
            assert pieces and json.loads("".join(pieces)) == msg.content[i].input
    else:
        msg = server.anthropic().messages.create(**kwargs)
    text, *calls = msg.content
    assert text.type == "text" and text.text == "Let me check. "
    assert [(c.type, c.name, c.input) for c in calls] == [("tool_use", "get_weather", {"city": "Paris"}),
                                                           ("tool_use", "get_time", {"zone": "UTC"})]
    assert all(c.id for c in calls) and msg.stop_reason == "tool_use" and msg.stop_sequence is None


@pytest.mark.parametrize("choice", [{"type": "tool", "name": "get_time"}, {"type": "any"}])
def test_tool_choice_forces_a_call(smol, choice):
    utc = {"type": "object", "properties": {"zone": {"enum": ["UTC"]}}, "required": ["zone"],
           "additionalProperties": False}  # the call is held to this JSON
    tools = [{"name": "get_time", "input_schema": utc}] if choice["type"] == "any" else \
        [TOOLS[0], {"name": "get_time", "input_schema": utc}]
    msg = smol.anthropic().messages.create(model=smol.model, max_tokens=60, extra_body=GREEDY, tools=tools,
                                           tool_choice=choice, messages=[{"role": "user", "content": "Time?"}])
    assert [(b.type, b.name, b.input) for b in msg.content] == [("tool_use", "get_time", {"zone": "UTC"})]
    assert msg.stop_reason == "tool_use"


def test_tool_results_render_the_chat_prompt(tiny_engine, serve):
    """tool_use blocks are chat's assistant tool_calls, tool_result blocks its tool messages, thinking is dropped:
    the reply, its prompt's size and count_tokens match the chat conversation's."""
    server = serve(tiny_engine, ServerConfig(chat_template=CALLS_SHOWN))
    call = {"id": "toolu_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    chat = _chat(server, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Time?"},
                          {"role": "assistant", "content": "Checking.", "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "toolu_1", "content": "12:00"},
                          {"role": "user", "content": "Thanks."}], max_tokens=4)
    messages = [{"role": "user", "content": "Time?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "They want the time.", "signature": "x"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"zone": "UTC"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "12:00"}]},
                    {"type": "text", "text": "Thanks."}]}]
    client = server.anthropic()
    msg = client.messages.create(model=server.model, system=[{"type": "text", "text": SYSTEM}], max_tokens=4,
                                 extra_body=GREEDY, messages=messages)
    assert msg.usage.input_tokens == chat.usage.prompt_tokens
    assert msg.content[0].text == chat.choices[0].message.content
    count = client.messages.count_tokens(model=server.model, system=SYSTEM, messages=messages)
    assert count.input_tokens == chat.usage.prompt_tokens


def test_count_tokens_is_the_chat_prompt_with_tools(tiny_engine, serve):
    server = serve(tiny_engine, ServerConfig(chat_template=HERMES))
    ask = [{"role": "user", "content": QUESTION}]
    chat_tools = [{"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"]}}
                  for t in TOOLS]
    chat = _chat(server, ask, max_tokens=1, tools=chat_tools)
    client = server.anthropic()
    with_tools = client.messages.count_tokens(model=server.model, messages=ask, tools=TOOLS)
    without = client.messages.count_tokens(model=server.model, messages=ask)
    assert with_tools.input_tokens == chat.usage.prompt_tokens > without.input_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_sequence_ends_the_reply(tiny, stream):
    kwargs = dict(model=tiny.model, max_tokens=60, stop_sequences=["STOP"],
                  extra_body=_forced("Hello there. STOP here"), messages=[{"role": "user", "content": "Hi"}])
    if stream:
        with tiny.anthropic().messages.stream(**kwargs) as s:
            msg = s.get_final_message()
    else:
        msg = tiny.anthropic().messages.create(**kwargs)
    assert [b.text for b in msg.content] == ["Hello there. "]
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "STOP")


def test_max_tokens_cuts_the_reply(tiny):
    msg = tiny.anthropic().messages.create(model=tiny.model, max_tokens=3, extra_body={"ignore_eos": True},
                                           messages=[{"role": "user", "content": "Hi"}])
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_is_a_thinking_block(tiny_engine, serve, stream):
    server = serve(tiny_engine, ServerConfig(chat_template=OPENS, reasoning_parser="deepseek_r1"))
    kwargs = dict(model=server.model, max_tokens=60, extra_body=_forced("Let me see.</think>\n\nIt is 4."),
                  messages=[{"role": "user", "content": "What is 2 + 2?"}], thinking={"type": "enabled",
                                                                                      "budget_tokens": 1024})
    if stream:
        with server.anthropic().messages.stream(**kwargs) as s:
            events = list(s)
            msg = s.get_final_message()
        assert "".join(e.delta.thinking for e in events
                       if e.type == "content_block_delta" and e.delta.type == "thinking_delta") == "Let me see."
    else:
        msg = server.anthropic().messages.create(**kwargs)
    assert [b.model_dump(exclude_none=True) for b in msg.content] == [
        {"type": "thinking", "thinking": "Let me see.", "signature": ""}, {"type": "text", "text": "It is 4."}]
    assert msg.stop_reason == "end_turn"


@pytest.mark.parametrize("kwargs", [
    dict(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}]),
    dict(messages=[{"role": "system", "content": "Hi"}]),
    dict(messages=[{"role": "user", "content": []}]),  # no turn to render
    dict(messages=[{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]),
    dict(messages=[{"role": "user", "content": "Hi"}], tools=[{"type": "web_search_20250305", "name": "web_search"}]),
    dict(messages=[{"role": "user", "content": "Hi"}], tool_choice={"type": "tool"}),
    dict(messages=[{"role": "user", "content": "Hi"}], system=[{"type": "image"}]),
    dict(messages=[{"role": "user", "content": "x " * 600}]),  # past the tiny model's 512-token context
])
def test_bad_input_is_an_anthropic_400(tiny, kwargs):
    with pytest.raises(anthropic.BadRequestError) as err:
        tiny.anthropic().messages.create(model=tiny.model, max_tokens=4, **kwargs)
    body = err.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def test_missing_max_tokens_and_unknown_models_in_anthropic_shape(tiny):
    r = tiny.post("/v1/messages", json={"model": tiny.model, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 400 and r.json()["type"] == "error" and "max_tokens" in r.json()["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as err:
        tiny.anthropic().messages.create(model="no-such-model", max_tokens=4,
                                         messages=[{"role": "user", "content": "Hi"}])
    assert err.value.body["error"]["type"] == "not_found_error" and "no-such-model" in err.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        tiny.anthropic().messages.count_tokens(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    # the OpenAI routes keep OpenAI's shape
    r = tiny.post("/v1/chat/completions", json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and "type" not in r.json()


def test_the_api_key_comes_as_x_api_key_or_bearer(tiny_engine, serve):
    server = serve(tiny_engine, ServerConfig(api_key="sekret"))
    ask = dict(model=server.model, max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    assert server.anthropic(api_key="sekret").messages.create(**ask).usage.output_tokens == 1  # x-api-key
    assert server.anthropic(api_key=None, auth_token="sekret").messages.create(**ask).usage.output_tokens == 1
    with pytest.raises(anthropic.AuthenticationError) as err:
        server.anthropic(api_key="wrong").messages.create(**ask)
    assert err.value.body["error"]["type"] == "authentication_error"
    # x-api-key is Anthropic's: the OpenAI routes still want the bearer token
    r = server.post("/v1/chat/completions", headers={"x-api-key": "sekret"},
                    json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_engine_failures_are_api_errors_streamed_or_not(tiny_model_dirs, serve):
    engine = make_engine(tiny_model_dirs["llama"], num_blocks=64, model_name="fragile")
    server = serve(engine)
    runner, broken = engine.engine.runner, threading.Event()
    real_execute = runner.execute

    def execute(*args, **kwargs):  # fault injection: the real step, or a failure on demand
        if broken.is_set():
            raise RuntimeError("injected fault")
        return real_execute(*args, **kwargs)

    runner.execute = execute
    ask = dict(model=server.model, max_tokens=400, extra_body={"ignore_eos": True},
               messages=[{"role": "user", "content": "Hi"}])
    try:
        with server.anthropic().messages.stream(**ask) as stream:
            events = iter(stream)
            while next(events).type != "content_block_delta":  # the reply is under way
                pass
            broken.set()
            with pytest.raises(anthropic.APIStatusError) as err:  # the stream's `error` event
                for _ in events:
                    pass
        assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "api_error"
        assert "injected fault" in err.value.body["error"]["message"]
        with pytest.raises(anthropic.InternalServerError) as err:
            server.anthropic().messages.create(**{**ask, "max_tokens": 3})
        assert err.value.body["error"]["type"] == "api_error"
        broken.clear()
        server.wait_idle()
    finally:
        engine.shutdown()
