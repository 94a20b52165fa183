"""Stored responses: `previous_response_id` continues a conversation as if the client had sent it whole,
retrieve and delete by id, `store: false`, the store's bound, and a store of size 0 refusing follow-ups."""
from __future__ import annotations

import json

import openai
import pytest

from tandem.server.config import ServerConfig
from tests.server.test_tool_parsers import HERMES, HERMES_REPLY

TOOLS = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
         {"type": "function", "name": "get_time", "parameters": {"type": "object"}}]


def _chat(server, messages, **kwargs):
    return server.openai().chat.completions.create(model=server.model, messages=messages, temperature=0, **kwargs)


@pytest.mark.parametrize("stream", [False, True])
def test_a_follow_up_continues_the_stored_conversation(tiny, stream):
    client = tiny.openai()
    kwargs = dict(model=tiny.model, max_output_tokens=5, temperature=0)
    if stream:
        first = list(client.responses.create(instructions="Be brief.", input="Hello", stream=True, **kwargs))[-1].response
    else:
        first = client.responses.create(instructions="Be brief.", input="Hello", **kwargs)
    assert first.store is True
    second = client.responses.create(instructions="Be kind.", input="And then?", previous_response_id=first.id,
                                     **kwargs)
    assert second.previous_response_id == first.id
    # the earlier instructions are not carried over (as OpenAI's); the earlier turn is
    chat = _chat(tiny, [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
                        {"role": "assistant", "content": first.output_text},
                        {"role": "user", "content": "And then?"}], max_tokens=5)
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == chat.choices[0].message.content
    third = client.responses.create(input=[{"role": "user", "content": "Last one."}],
                                    previous_response_id=second.id, **kwargs)
    chat = _chat(tiny, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.output_text},
                        {"role": "user", "content": "And then?"}, {"role": "assistant", "content": second.output_text},
                        {"role": "user", "content": "Last one."}], max_tokens=5)
    assert third.usage.input_tokens == chat.usage.prompt_tokens


def test_a_tool_loop_sends_only_the_outputs(tiny_engine, serve):
    """The agent loop: the model calls tools, the follow-up carries only the calls' outputs."""
    server = serve(tiny_engine, ServerConfig(chat_template=HERMES))
    client = server.openai()
    first = client.responses.create(model=server.model, input="Weather in Paris, and the time in UTC?", tools=TOOLS,
                                    max_output_tokens=120, temperature=0,
                                    extra_body={"structured_outputs": {"choice": [HERMES_REPLY]}})
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 2
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": f"result {i}"}
               for i, c in enumerate(calls)]
    second = client.responses.create(model=server.model, input=outputs, previous_response_id=first.id, tools=TOOLS,
                                     max_output_tokens=4, temperature=0)
    tool_calls = [{"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                  for c in calls]
    chat = _chat(server, [{"role": "user", "content": "Weather in Paris, and the time in UTC?"},
                          {"role": "assistant", "content": first.output_text, "tool_calls": tool_calls},
                          *({"role": "tool", "tool_call_id": o["call_id"], "content": o["output"]} for o in outputs)],
                 tools=[{"type": "function", "function": {"name": t["name"], "parameters": t["parameters"]}}
                        for t in TOOLS], max_tokens=4)
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert json.loads(calls[0].arguments) == {"city": "Paris"}


def test_retrieve_and_delete(tiny):
    client = tiny.openai()
    resp = client.responses.create(model=tiny.model, input="Hi", max_output_tokens=3, temperature=0)
    got = client.responses.retrieve(resp.id)
    assert got.model_dump() == resp.model_dump()
    streamed = list(client.responses.create(model=tiny.model, input="Hi", max_output_tokens=3, temperature=0,
                                            stream=True))[-1].response
    assert client.responses.retrieve(streamed.id).model_dump() == streamed.model_dump()
    client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=tiny.model, input="Hi", previous_response_id=resp.id, max_output_tokens=3)
    assert err.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(resp.id)


def test_store_false_keeps_nothing(tiny):
    client = tiny.openai()
    resp = client.responses.create(model=tiny.model, input="Hi", max_output_tokens=3, temperature=0, store=False)
    assert resp.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)


def test_the_store_keeps_the_most_recently_used(tiny_engine, serve):
    server = serve(tiny_engine, ServerConfig(responses_store_size=2))
    client = server.openai()

    def create(**kwargs):
        return client.responses.create(model=server.model, input="Hi", max_output_tokens=2, temperature=0, **kwargs)

    a = create()
    b = create(previous_response_id=a.id)  # a chain of two: a, b
    client.responses.retrieve(a.id)  # a used last: c pushes b out
    create()
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(b.id)
    assert client.responses.retrieve(a.id).id == a.id


def test_a_server_that_stores_nothing_says_so(tiny_engine, serve):
    server = serve(tiny_engine, ServerConfig(responses_store_size=0))
    client = server.openai()
    resp = client.responses.create(model=server.model, input="Hi", max_output_tokens=2, temperature=0)
    assert resp.store is False
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=server.model, input="Hi", previous_response_id=resp.id)
    assert err.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)
