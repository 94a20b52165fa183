"""Tool calls a model writes in its own syntax, for tool_choice "auto" (vLLM's --tool-call-parser).

Which parser a request gets: the server's `tool_call_parser` names one, or "auto" (the default) reads the
chat template the request is rendered with: one that shows the model `<tool_call>` gets `hermes` (Qwen2/2.5,
Hermes), one with Mistral's `[TOOL_CALLS]` gets `mistral`, one with Llama 3.1's `<|python_tag|>` or its
JSON-call instructions gets `llama3_json`, one with Llama 4's `<|python_start|>` or Llama 3.2's pythonic
instructions (`[func_name1(...)]`) gets `pythonic`; any other template, or "none", gets no parser, and the
reply stays text.

A parser is made per request, for its tools' names, and has three jobs:
- `parse(text)`: the finished reply as (content, calls). A reply whose call syntax does not parse, or that
  calls a function not among the tools or gives no arguments, stays all content, with no calls.
- `content_end(text)`: while a reply streams, how much of it is surely content: the rest might be the
  start of a call, so the stream holds it back until the reply ends and `parse` decides.
- `begun(text)`: while a reply streams, the calls its prefix `text` has begun (`Begun`): a call's name once
  it is written, its arguments string once no later text can change it. No parser here keeps the text the
  model wrote as the arguments (it decodes them, then json.dumps them), and a later key may still replace
  an earlier one, so a call's arguments come whole, once that call is complete: never a piece the final
  string might not start with. What `begun` shows holds if the reply parses in the end; `CallStream` sends
  it, and ends a reply that then does not parse as text, as `parse` does.
"""
from __future__ import annotations

import ast
import functools
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Collection

PARSERS = ("auto", "none", "hermes", "llama3_json", "mistral", "pythonic")


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


def _call(value: Any, tools: Collection[str], *arg_keys: str, call_id: str | None = None) -> dict[str, Any]:
    """A decoded call object to OpenAI's shape; ValueError unless it is {"name": one of `tools`, <arguments>}
    (JSON that merely has a "name" is not a call)."""
    if not isinstance(value, dict) or value.get("name") not in tools:
        raise ValueError("not a call of one of the tools")
    for key in arg_keys:
        if key in value:
            return make_call(value["name"], value[key], call_id)
    raise ValueError("a tool call needs its arguments")


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


class _Parser:
    name = ""
    MARKER = ""  # the token that opens a call, where the syntax has one

    def __init__(self, tools: Collection[str]) -> None:
        self.tools = frozenset(tools)

    def new_id(self) -> str:
        """An id for a call whose reply gives it none."""
        return tool_call_id()

    def strips_its_markers(self, tokenizer: Any) -> bool:
        """Whether decoding with skip_special_tokens would drop the marker a call needs (a special token
        there: Hermes 2 Pro's <tool_call>, Mistral's [TOOL_CALLS]), so the reply is decoded with them."""
        if not self.MARKER or not hasattr(tokenizer, "convert_tokens_to_ids"):
            return False
        marker = tokenizer.convert_tokens_to_ids(self.MARKER)  # an unknown token reads as the unknown id
        return tokenizer.convert_ids_to_tokens(marker) == self.MARKER and marker in tokenizer.all_special_ids


class _MarkedParser(_Parser):
    """Calls that follow a marker, after optional text; `_calls` reads what follows the first marker."""

    def _calls(self, text: str, start: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        start = text.find(self.MARKER)
        if start < 0:
            return text, []
        try:
            calls = self._calls(text, start)
        except ValueError:
            return text, []
        return (text[:start] if text[:start].strip() else None), calls

    def content_end(self, text: str) -> int:
        start = text.find(self.MARKER)
        end = start if start >= 0 else len(text) - held_prefix(text, self.MARKER)
        return end if text[:end].strip() else 0  # whitespace alone before a call is no content


class HermesParser(_MarkedParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks after optional text."""

    name = "hermes"
    MARKER = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def _calls(self, text: str, start: int) -> list[dict[str, Any]]:
        return [self._read(json.loads(block)) for block in self._BLOCK.findall(text)]

    def _read(self, value: Any) -> dict[str, Any]:
        return _call(value, self.tools, "arguments", "parameters")

    def begun(self, text: str) -> list[Begun]:
        calls: list[Begun] = []
        for block in self._BLOCK.finditer(text):  # the blocks `parse` will read, the last maybe unclosed yet
            got, complete = json_calls(block.group(1), 0, self._read, self.tools.__contains__, lambda *_: None)
            calls += got
            if not complete:
                break
        return calls


class MistralParser(_MarkedParser):
    """Mistral's calls after optional text, in either of its tokenizers' forms: v3-v10's `[TOOL_CALLS]` then a
    JSON list of {"name": ..., "arguments": {...}}, and v11+'s `[TOOL_CALLS]name[ARGS]{...}` per call (v13 puts
    `[CALL_ID]id` before `[ARGS]`; its id is kept). Call ids are 9 letters and digits: Mistral's templates
    refuse others in the history."""

    name = "mistral"
    MARKER = "[TOOL_CALLS]"
    ARGS, CALL_ID = "[ARGS]", "[CALL_ID]"
    _ID = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    _NAMED = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[CALL_ID\]\s*([A-Za-z0-9]{9})\s*)?(?:\[ARGS\])?\s*")

    def new_id(self) -> str:
        return "".join(secrets.choice(self._ID) for _ in range(9))

    def _read(self, value: Any) -> dict[str, Any]:
        return _call(value, self.tools, "arguments", "parameters", call_id=self.new_id())

    def _calls(self, text: str, start: int) -> list[dict[str, Any]]:
        body = text[start + len(self.MARKER):]
        if body.lstrip().startswith("["):  # v3-v10: one JSON list
            value = json.loads(body)
            if not isinstance(value, list) or not value:
                raise ValueError("not a list of calls")
            return [self._read(v) for v in value]
        calls, at, decoder = [], 0, json.JSONDecoder()
        while True:  # v11+: name, maybe its id, then its arguments' JSON object (which may hold any text)
            named = self._NAMED.match(body, at)
            if named is None or not body.startswith("{", named.end()):
                raise ValueError("not a named call with arguments")
            arguments, at = decoder.raw_decode(body, named.end())
            calls.append(_call({"name": named.group(1), "arguments": arguments}, self.tools, "arguments",
                               call_id=named.group(2) or self.new_id()))
            rest = body[at:].lstrip()
            if not rest:
                return calls
            if not rest.startswith(self.MARKER):
                raise ValueError("text after a call")
            at = len(body) - len(rest) + len(self.MARKER)

    def begun(self, text: str) -> list[Begun]:
        start = text.find(self.MARKER)
        if start < 0:
            return []
        body = text[start + len(self.MARKER):]
        if body.lstrip().startswith("["):
            return json_list_calls(body, len(body) - len(body.lstrip()) + 1, self._read, self.tools.__contains__)
        calls: list[Begun] = []
        at = 0
        while True:  # as `_calls` reads them: a call shows once its header is whole (its id is in it)
            named = self._NAMED.match(body, at)
            if named is None or not body.startswith("{", named.end()) or named.group(1) not in self.tools:
                return calls
            whole = whole_json(body, named.end())
            if whole is None:
                return [*calls, Begun(named.group(1), call_id=named.group(2))]
            calls.append(Begun(named.group(1), arguments_text(whole[0]), named.group(2)))
            rest = body[whole[1]:].lstrip()
            if not rest.startswith(self.MARKER):
                return calls
            at = len(body) - len(rest) + len(self.MARKER)


def _next_call(body: str, end: int) -> int:
    """Where Llama 3's next JSON call starts after one that ends at `end`: past spaces and a ";"."""
    return len(body) - len(body[end:].lstrip().removeprefix(";").lstrip())


class Llama3JsonParser(_Parser):
    """A reply that is one JSON call `{"name": ..., "parameters": {...}}` (or several joined by ";"),
    maybe after `<|python_tag|>`; a reply that starts any other way is text."""

    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        body = self._body(text)
        if not body.startswith("{"):
            return text, []
        decoder, calls, at = json.JSONDecoder(), [], 0
        try:
            while at < len(body):
                value, at = decoder.raw_decode(body, at)
                calls.append(self._read(value))
                at = _next_call(body, at)
        except ValueError:
            return text, []
        return None, calls

    def _read(self, value: Any) -> dict[str, Any]:
        return _call(value, self.tools, "parameters", "arguments")

    def _body(self, text: str) -> str:
        body = text.lstrip()
        return body[len(self.TAG):].lstrip() if body.startswith(self.TAG) else body

    def begun(self, text: str) -> list[Begun]:
        body = self._body(text)
        if not body.startswith("{"):
            return []
        return json_calls(body, 0, self._read, self.tools.__contains__, _next_call)[0]

    def content_end(self, text: str) -> int:
        body = text.lstrip()
        maybe_call = not body or body.startswith(("{", self.TAG)) or self.TAG.startswith(body)
        return 0 if maybe_call else len(text)


class PythonicParser(_Parser):
    """A reply that is a Python list of calls with keyword arguments, `[get_weather(city="Paris"), get_time()]`
    (Llama 3.2's and Llama 4's pythonic tool calling; Llama 4 wraps it in <|python_start|> <|python_end|>).
    Argument values must be literals (ast.literal_eval: strings, numbers, booleans, None, lists, dicts): a
    reply with anything else, or that starts any other way, is text."""

    name = "pythonic"
    START, END = "<|python_start|>", "<|python_end|>"
    _NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(")  # ASCII names: Python normalizes others (NFKC)

    def __init__(self, tools: Collection[str]) -> None:
        super().__init__(tools)
        self._open: dict[int, str] = {}  # where a call starts -> its text up to a ")" that did not close it

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        body = text.strip().removeprefix(self.START).removesuffix(self.END).strip()
        if not body.startswith("["):
            return text, []
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                raise ValueError("not a list of calls")
            return None, [self._call(node) for node in tree.elts]
        except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
            return text, []

    def _call(self, node: ast.AST) -> dict[str, Any]:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            raise ValueError("not a call with keyword arguments")
        if node.func.id not in self.tools or any(kw.arg is None for kw in node.keywords):
            raise ValueError("not a call of one of the tools")
        return make_call(node.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords})

    def content_end(self, text: str) -> int:
        body = text.lstrip()
        maybe_call = not body or body.startswith(("[", self.START)) or self.START.startswith(body)
        return 0 if maybe_call else len(text)

    def begun(self, text: str) -> list[Begun]:
        body = text.lstrip()
        body = body[len(self.START):].lstrip() if body.startswith(self.START) else body
        if not body.startswith("["):
            return []
        calls: list[Begun] = []
        at = 1
        while (named := self._NAME.match(body, at)) is not None and named.group(1) in self.tools:
            end, call = self._whole_call(body, named)
            if call is None:  # not whole yet; or whole, but not a call `parse` takes (end 0): the reply stays text
                return [*calls, Begun(named.group(1))] if end < 0 else calls
            calls.append(Begun(named.group(1), call["function"]["arguments"]))
            rest = body[end:].lstrip()
            if not rest.startswith(","):
                break
            at = len(body) - len(rest) + 1
        return calls

    def _whole_call(self, body: str, named: re.Match) -> tuple[int, dict[str, Any] | None]:
        """The call that `named` opens and where it ends (after its ")"), once it is whole; (-1, None) before,
        (0, None) if it is whole but not a call of literals. Its ")" is the first after which it parses: one
        inside a string or inner brackets leaves them open."""
        start = named.start(1)
        seen = self._open.get(start, "")  # the call's text up to a ")" that did not close it: nor will it later
        seen = seen if body.startswith(seen, start) else ""
        at = start + len(seen)
        while (at := body.find(")", at) + 1) > 0:
            try:
                return at, self._call(ast.parse(body[start:at], mode="eval").body)
            except (SyntaxError, RecursionError, MemoryError):
                self._open[start] = body[start:at]  # so each update tries only the ")"s that came since
            except (ValueError, TypeError):
                return 0, None
        return -1, None


_BY_NAME = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser, PythonicParser)}


@functools.lru_cache(maxsize=64)
def pick(configured: str, template: str | None) -> type[_Parser] | None:
    """The parser (a class: make one per request, for its tools) for replies to prompts rendered with
    `template`, under the server's setting."""
    if configured != "auto":
        return _BY_NAME.get(configured)
    template = template or ""
    if HermesParser.MARKER in template:
        return _BY_NAME["hermes"]
    if MistralParser.MARKER in template:
        return _BY_NAME["mistral"]
    if Llama3JsonParser.TAG in template or '"parameters": dictionary of argument name' in template:
        return _BY_NAME["llama3_json"]
    if PythonicParser.START in template or "[func_name1(" in template:  # Llama 4; Llama 3.2's pythonic prompt
        return _BY_NAME["pythonic"]
    return None


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
