"""Tool calls as a stream sees them: a call in OpenAI's shape, `Begun` (a call as far as a prefix of the reply
shows it), the JSON readers the parsers' `begun` share, and `CallStream`, which sends a reply's calls as they
grow. Every parser re-serializes its calls' arguments (json.dumps of the decoded value; a later duplicate key
may replace an earlier one), so a call's arguments go out whole once it closes: never a piece the final string
might not start with.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Callable


def tool_call_id() -> str:
    return f"chatcmpl-tool-{secrets.token_hex(8)}"


def arguments_text(arguments: Any) -> str:
    """A call's arguments as OpenAI's JSON string (a string the model wrote stays as it is)."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def make_call(name: str, arguments: Any, call_id: str | None = None) -> dict[str, Any]:
    """One call in OpenAI's shape."""
    return {"id": call_id or tool_call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments_text(arguments)}}


@dataclass
class Begun:
    """A call as far as a prefix of the reply shows it: its name, the start of its arguments string that no
    later text can change (all of it once the call is complete), and the id the model wrote for it, if any."""
    name: str
    arguments: str = ""
    call_id: str | None = None


_DECODER = json.JSONDecoder()
JSON_SPACE = re.compile(r"[ \t\n\r]*")
_NAME_FIRST = re.compile(r'\{[ \t\n\r]*"name"[ \t\n\r]*:[ \t\n\r]*("(?:[^"\\]|\\.)*")')  # {"name": "<whole string>"


def whole_json(text: str, at: int) -> tuple[Any, int] | None:
    """The JSON value at text[at] and where it ends, once no later text can change it; None before."""
    try:
        value, end = _DECODER.raw_decode(text, at)
    except (ValueError, RecursionError):
        return None
    if end == len(text) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return None  # a number at the end may still grow
    return value, end


def _json_call(text: str, at: int, read: Callable[[Any], dict[str, Any]],
               named: Callable[[str], bool]) -> tuple[Begun | None, int]:
    """The call object at text[at] as far as text shows it, and where it ends (-1: not yet). Its name shows
    once written, where it is the first key; its arguments once the object closes, as `read` makes the call
    of the decoded object (ValueError: the object is whole but no call, so the reply will not parse)."""
    whole = whole_json(text, at)
    if whole is None:
        first = _NAME_FIRST.match(text, at)
        try:
            name = json.loads(first.group(1)) if first else None
        except ValueError:
            return None, -1
        return (Begun(name) if isinstance(name, str) and named(name) else None), -1
    function = read(whole[0])["function"]
    return Begun(function["name"], function["arguments"]), whole[1]


def json_calls(text: str, at: int, read: Callable[[Any], dict[str, Any]], named: Callable[[str], bool],
               next_at: Callable[[str, int], int | None]) -> tuple[list[Begun], bool]:
    """The calls begun in a run of JSON call objects, the first at text[at] (after spaces), each next one
    where `next_at(text, end of the last)` says (None: the run ends there); and whether every call it
    began is complete."""
    calls: list[Begun] = []
    while at is not None:
        try:
            call, end = _json_call(text, JSON_SPACE.match(text, at).end(), read, named)
        except ValueError:
            return calls, False
        if call is not None:
            calls.append(call)
        if end < 0:
            return calls, False
        at = next_at(text, end)
    return calls, True


def _after_comma(text: str, end: int) -> int | None:
    at = JSON_SPACE.match(text, end).end()
    return at + 1 if text.startswith(",", at) else None


def json_list_calls(text: str, at: int, read: Callable[[Any], dict[str, Any]],
                    named: Callable[[str], bool]) -> list[Begun]:
    """The calls begun in a JSON list of call objects whose first item starts at text[at] (after spaces)."""
    return json_calls(text, at, read, named, _after_comma)[0]


def held_prefix(text: str, marker: str) -> int:
    """Length of text's longest suffix that begins `marker` (a marker that may still be arriving)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class CallStream:
    """One streamed reply's calls, sent as they grow: `update` with each longer prefix of the reply (one that
    no stop string can still cut), `finish` with the calls it parsed to. Both give deltas in OpenAI's shape: a
    call's first has its index, id, type, name and the arguments known then, later ones the next piece of its
    arguments, so the pieces join to the parsed arguments string. `parser`: a tool parser or ForcedCalls."""

    def __init__(self, parser: Any) -> None:
        self.parser = parser
        self.sent: list[dict[str, Any]] = []  # each call as far as sent (arguments: its pieces joined)
        self.final: list[dict[str, Any]] = []  # the calls the reply ended with, under the ids sent

    def update(self, text: str) -> list[dict[str, Any]]:
        return [d for j, call in enumerate(self.parser.begun(text))
                if (d := self._grow(j, call.name, call.arguments, call.call_id)) is not None]

    def finish(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """The last deltas of a reply that parsed to `calls`; None if what was sent does not begin them (a
        reply whose calls began but then did not parse, say cut by max_tokens: the stream ends it as text)."""
        if len(calls) < len(self.sent) or any(
                c["function"]["name"] != s["function"]["name"]
                or not c["function"]["arguments"].startswith(s["function"]["arguments"])
                for c, s in zip(calls, self.sent)):
            return None
        deltas = [d for j, c in enumerate(calls)
                  if (d := self._grow(j, c["function"]["name"], c["function"]["arguments"], c["id"])) is not None]
        self.final = self.sent
        return deltas

    def _grow(self, j: int, name: str, arguments: str, call_id: str | None) -> dict[str, Any] | None:
        """The delta that takes call j to `arguments`: the whole call if it is new; None if there is nothing
        to add, or if it contradicts what was sent (a reply that will not parse: see finish)."""
        if j == len(self.sent):
            self.sent.append(make_call(name, arguments, call_id or self.parser.new_id()))
            return {"index": j, **self.sent[j], "function": dict(self.sent[j]["function"])}
        have = self.sent[j]["function"]
        if have["name"] != name or len(arguments) <= len(have["arguments"]) or \
                not arguments.startswith(have["arguments"]):
            return None
        piece, have["arguments"] = arguments[len(have["arguments"]):], arguments
        return {"index": j, "function": {"arguments": piece}}
