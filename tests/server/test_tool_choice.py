"""Forced tool calls through the chat API on the embedded SmolLM2 (tool_choice "required" or a named
function): the reply is held to the call's JSON and comes back as the message's tool_calls, streamed or
not, arguments that follow each tool's parameter schema; bad tool choices are 400s."""
from __future__ import annotations

import json

import jsonschema
import pytest

from tests.server.test_tool_parsers import streamed_calls

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
TIME = {"type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"type": "string", "maxLength": 20}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_a_named_function_is_called(smol):
    r = smol.openai().chat.completions.create(model=smol.model, messages=ASK, tools=TOOLS, max_tokens=60,
                                              temperature=0,
                                              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    _check(choice.message.tool_calls)


def test_required_calls_one_or_more_of_the_tools_streamed_and_n_2(smol):
    r = smol.openai().chat.completions.create(model=smol.model, messages=ASK, tools=TOOLS, tool_choice="required",
                                              max_tokens=120, temperature=0.7, seed=4, n=2)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        _check(choice.message.tool_calls)
    stream = smol.openai().chat.completions.create(model=smol.model, messages=ASK, tools=TOOLS, max_tokens=120,
                                                   tool_choice="required", temperature=0, stream=True, logprobs=True)
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = streamed_calls(deltas)
    assert deltas[-1].finish_reason == "tool_calls" and not any(d.delta.content for d in deltas)
    _check(calls)
    assert "".join(t.token for d in deltas if d.logprobs for t in d.logprobs.content).startswith("[")  # every token's


@pytest.mark.parametrize("body, words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, ["launch"]),
    ({"tool_choice": "required"}, ["at least one tool"]),
    ({"tools": [{"type": "function", "function": {}}], "tool_choice": "required"}, ["tools[0]"]),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, ["constraint"]),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, []),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": "get_weather"}}, []),
])
def test_bad_tool_choices_are_400(smol, body, words):
    r = smol.post("/v1/chat/completions", json={"model": smol.model, "messages": ASK, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] in ("tool_choice", "tools"), err
    assert all(w in err["message"] for w in words), err
