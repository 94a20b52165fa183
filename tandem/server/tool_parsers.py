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
from typing import Any, Collection

from tandem.server.call_stream import (Begun, arguments_text, held_prefix, json_calls, json_list_calls, make_call,
                                       tool_call_id, whole_json)

PARSERS = ("auto", "none", "hermes", "llama3_json", "mistral", "pythonic")


def _call(value: Any, tools: Collection[str], *arg_keys: str, call_id: str | None = None) -> dict[str, Any]:
    """A decoded call object to OpenAI's shape; ValueError unless it is {"name": one of `tools`, <arguments>}
    (JSON that merely has a "name" is not a call)."""
    if not isinstance(value, dict) or value.get("name") not in tools:
        raise ValueError("not a call of one of the tools")
    for key in arg_keys:
        if key in value:
            return make_call(value["name"], value[key], call_id)
    raise ValueError("a tool call needs its arguments")


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
