"""POST /v1/responses through the official client's `responses` API: the chat route's answer as output items,
streamed as typed events, function tools in and out, conversations carrying earlier calls and their outputs,
structured text, and what the server refuses (stored responses: test_responses_store.py)."""
from __future__ import annotations

import json

import openai
import pytest

from tandem.server.config import ServerConfig
from tests.server.test_tool_parsers import HERMES, HERMES_REPLY

INSTRUCTIONS = "Answer in one word."
QUESTION = "What color is the sky?"
TOOLS = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
         {"type": "function", "name": "get_time", "parameters": {"type": "object"}}]


def _chat(server, messages, **kwargs):
    return server.openai().chat.completions.create(model=server.model, messages=messages, temperature=0, **kwargs)


def test_a_response_is_the_chat_answer_as_output_items(smol):
    client = smol.openai()
    chat = _chat(smol, [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}],
                 max_tokens=6)
    resp = client.responses.create(model=smol.model, instructions=INSTRUCTIONS, input=QUESTION,
                                   max_output_tokens=6, temperature=0)
    assert resp.object == "response" and resp.id.startswith("resp_")
    assert resp.output_text == chat.choices[0].message.content
    (message,) = resp.output
    assert message.type == "message" and message.role == "assistant"
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens
    assert resp.usage.input_tokens_details.cached_tokens > 0  # the chat before it left the same prompt cached
    if chat.choices[0].finish_reason == "length":
        assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
        assert message.status == "incomplete"
    else:
        assert resp.status == "completed" and resp.incomplete_details is None


def test_a_streamed_response_sends_typed_events_that_add_up(smol):
    client = smol.openai()
    whole = client.responses.create(model=smol.model, input=QUESTION, max_output_tokens=12, temperature=0)
    events = list(client.responses.create(model=smol.model, input=QUESTION, max_output_tokens=12, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if whole.status == "completed" else "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-4].text
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens == whole.usage.output_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_function_calls_come_back_as_items(tiny_engine, serve, stream):
    server = serve(tiny_engine, ServerConfig(chat_template=HERMES))
    kwargs = dict(model=server.model, input="Weather in Paris, and the time in UTC?", tools=TOOLS,
                  max_output_tokens=120, temperature=0, extra_body={"structured_outputs": {"choice": [HERMES_REPLY]}})
    if stream:
        events = list(server.openai().responses.create(stream=True, **kwargs))
        resp = events[-1].response
        args = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
        assert args == [json.dumps({"city": "Paris"}), json.dumps({"zone": "UTC"})]
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Let me check. "
    else:
        resp = server.openai().responses.create(**kwargs)
    assert resp.status == "completed"
    message, *calls = resp.output
    assert message.type == "message" and resp.output_text == "Let me check. "
    assert [(c.type, c.name, json.loads(c.arguments)) for c in calls] == [
        ("function_call", "get_weather", {"city": "Paris"}), ("function_call", "get_time", {"zone": "UTC"})]
    assert all(c.call_id and c.id.startswith("fc_") for c in calls)


def test_earlier_calls_and_their_outputs_are_the_conversation(tiny):
    """A function_call item and its function_call_output render as chat's assistant tool call and tool message."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    chat = _chat(tiny, [{"role": "user", "content": "Time?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}], max_tokens=4)
    resp = tiny.openai().responses.create(model=tiny.model, max_output_tokens=4, temperature=0, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Time?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": '{"zone": "UTC"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "12:00"}])
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.output_text == chat.choices[0].message.content
    # an earlier reply sent back whole (its text, then two calls) is one assistant turn, as in chat
    calls = [call, {**call, "id": "call_2"}]
    chat = _chat(tiny, [{"role": "user", "content": "Time?"}, {"role": "assistant", "content": "Checking.", "tool_calls": calls},
                        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
                        {"role": "tool", "tool_call_id": "call_2", "content": "13:00"}], max_tokens=4)
    resp = tiny.openai().responses.create(model=tiny.model, max_output_tokens=4, temperature=0, input=[
        {"role": "user", "content": "Time?"}, {"role": "assistant", "content": "Checking."},
        *({"type": "function_call", "call_id": c["id"], "name": "get_time", "arguments": '{"zone": "UTC"}'} for c in calls),
        {"type": "function_call_output", "call_id": "call_1", "output": "12:00"},
        {"type": "function_call_output", "call_id": "call_2", "output": "13:00"}])
    assert resp.usage.input_tokens == chat.usage.prompt_tokens


def test_structured_text_follows_its_schema(smol):
    schema = {"type": "object", "properties": {"color": {"type": "string", "enum": ["blue", "grey"]}},
              "required": ["color"], "additionalProperties": False}
    resp = smol.openai().responses.create(model=smol.model, input=QUESTION, max_output_tokens=40, temperature=0,
                                          text={"format": {"type": "json_schema", "name": "sky", "schema": schema}})
    assert json.loads(resp.output_text)["color"] in ("blue", "grey")


@pytest.mark.parametrize("kwargs, param", [
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]), "input"),
    (dict(input=[{"type": "web_search_call", "id": "ws_1", "status": "completed"}]), "input"),  # reasoning is taken
    (dict(input="Hi", tools=[{"type": "web_search"}]), "tools"),
    (dict(input="Hi", text={"format": {"type": "json_schema", "name": "x"}}), "text"),
    (dict(input="Hi", text={"format": "json_object"}), "text"),
    (dict(input="Hi", background=True), "background"),
])
def test_what_the_server_cannot_do_is_a_clear_400(tiny, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        tiny.openai().responses.create(model=tiny.model, **kwargs)
    assert err.value.body["param"] == param
