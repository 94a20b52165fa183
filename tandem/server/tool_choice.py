"""Forced tool calls: `tool_choice` of "required" or a named function, as vLLM makes them. The reply is
held by structured outputs to the tool-call JSON (a named function: an object of its arguments;
"required": a non-empty array of {"name": one of the tools, "parameters": its arguments}), then parsed into
the message's `tool_calls` instead of `content`. "auto" (or no choice) lets the model decide: its own call
syntax is parsed by tool_parsers.py; "none" keeps the tools from the template. Streamed, a named function's
call shows from the first chunk, each of "required"'s calls once its name is written; each call's arguments
come whole once its JSON closes (they are re-serialized, so no earlier piece is sure to begin them).
"""
from __future__ import annotations

import json
from typing import Any

from tandem.server.errors import bad_request
from tandem.server.call_stream import (JSON_SPACE, Begun, arguments_text, json_list_calls, make_call, tool_call_id,
                                       whole_json)

_ANY_OBJECT = {"type": "object"}


def functions(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """name -> JSON schema of its parameters, for the request's function tools."""
    out = {}
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                              "'parameters': {...}}}}", "tools")
        params = fn.get("parameters") or _ANY_OBJECT
        if not isinstance(params, dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        out[fn["name"]] = params
    return out


def forced(tool_choice: Any) -> bool:
    return tool_choice not in (None, "none", "auto")


def forced_schema(tools: list[dict[str, Any]] | None, tool_choice: Any) -> dict[str, Any] | None:
    """The JSON schema the reply must follow for this tool_choice; None when no call is forced."""
    if not forced(tool_choice):
        return None
    schemas = functions(tools)
    if tool_choice == "required":
        if not schemas:
            raise bad_request('tool_choice "required" needs at least one tool in tools', "tool_choice")
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                  "properties": {"name": {"const": name}, "parameters": params}} for name, params in schemas.items()]
        return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise bad_request('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                          '{"name": ...}}', "tool_choice")
    if name not in schemas:
        raise bad_request(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return schemas[name]


def tool_calls(text: str, tool_choice: Any) -> list[dict[str, Any]] | None:
    """The reply's calls in OpenAI's shape, or None when it is not the whole JSON (cut by max_tokens)."""
    try:
        value = json.loads(text)
        pairs = ([(call["name"], call["parameters"]) for call in value] if tool_choice == "required"
                 else [(tool_choice["function"]["name"], value)])
    except (ValueError, KeyError, TypeError):  # cut by max_tokens; or, unlike the grammar's, no list of calls
        return None
    return [make_call(name, args) for name, args in pairs]


class ForcedCalls:
    """A forced call's reply read as the model-syntax parsers read theirs (tool_parsers.py): all of it is
    the calls' JSON, so nothing streams as content before the end."""

    def __init__(self, tool_choice: Any) -> None:
        self.tool_choice = tool_choice

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        calls = tool_calls(text, self.tool_choice)
        return (None, calls) if calls else (text, [])

    def content_end(self, text: str) -> int:
        return 0

    def begun(self, text: str) -> list[Begun]:
        """The calls begun in a prefix of the reply (tool_parsers.py says what that is)."""
        at = JSON_SPACE.match(text).end()
        if self.tool_choice == "required":
            return json_list_calls(text, at + 1, self._read, lambda name: True) if text.startswith("[", at) else []
        whole = whole_json(text, at)  # the reply is the arguments
        return [Begun(self.tool_choice["function"]["name"], arguments_text(whole[0]) if whole else "")]

    @staticmethod
    def _read(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict) or "name" not in value or "parameters" not in value:
            raise ValueError("not a call")
        return make_call(value["name"], value["parameters"])

    def new_id(self) -> str:
        return tool_call_id()

    def strips_its_markers(self, tokenizer: Any) -> bool:
        return False
