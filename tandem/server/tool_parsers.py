"""Tool calls a model writes in its own syntax, for tool_choice "auto" (vLLM's --tool-call-parser).

Which parser a request gets: the server's `tool_call_parser` names one, or "auto" (the default) reads the
chat template the request is rendered with: one that shows the model `<tool_call>` gets `hermes` (Qwen2/2.5,
Hermes), one with Mistral's `[TOOL_CALLS]` gets `mistral`, one with Llama 3.1's `<|python_tag|>` or its
JSON-call instructions gets `llama3_json`, one with Llama 4's `<|python_start|>` or Llama 3.2's pythonic
instructions (`[func_name1(...)]`) gets `pythonic`; any other template, or "none", gets no parser, and the
reply stays text.

A parser is made per request, for its tools' names, and has two jobs, one per kind of response:
- `parse(text)`: the finished reply as (content, calls). A reply whose call syntax does not parse, or that
  calls a function not among the tools or gives no arguments, stays all content, with no calls.
- `content_end(text)`: while a reply streams, how much of it is surely content: the rest might be the
  start of a call, so the stream holds it back until the reply ends and `parse` decides.
"""
from __future__ import annotations

import ast
import functools
import json
import re
import secrets
from typing import Any, Collection

PARSERS = ("auto", "none", "hermes", "llama3_json", "mistral", "pythonic")


def make_call(name: str, arguments: Any, call_id: str | None = None) -> dict[str, Any]:
    """One call in OpenAI's shape: arguments as a JSON string (a string the model wrote stays as it is)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id or f"chatcmpl-tool-{secrets.token_hex(8)}", "type": "function",
            "function": {"name": name, "arguments": args}}


def _call(value: Any, tools: Collection[str], *arg_keys: str, call_id: str | None = None) -> dict[str, Any]:
    """A decoded call object to OpenAI's shape; ValueError unless it is {"name": one of `tools`, <arguments>}
    (JSON that merely has a "name" is not a call)."""
    if not isinstance(value, dict) or value.get("name") not in tools:
        raise ValueError("not a call of one of the tools")
    for key in arg_keys:
        if key in value:
            return make_call(value["name"], value[key], call_id)
    raise ValueError("a tool call needs its arguments")


def _held_prefix(text: str, marker: str) -> int:
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
        end = start if start >= 0 else len(text) - _held_prefix(text, self.MARKER)
        return end if text[:end].strip() else 0  # whitespace alone before a call is no content


class HermesParser(_MarkedParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks after optional text."""

    name = "hermes"
    MARKER = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def _calls(self, text: str, start: int) -> list[dict[str, Any]]:
        return [_call(json.loads(block), self.tools, "arguments", "parameters") for block in self._BLOCK.findall(text)]


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

    def _new_id(self) -> str:
        return "".join(secrets.choice(self._ID) for _ in range(9))

    def _calls(self, text: str, start: int) -> list[dict[str, Any]]:
        body = text[start + len(self.MARKER):]
        if body.lstrip().startswith("["):  # v3-v10: one JSON list
            value = json.loads(body)
            if not isinstance(value, list) or not value:
                raise ValueError("not a list of calls")
            return [_call(v, self.tools, "arguments", "parameters", call_id=self._new_id()) for v in value]
        calls, at, decoder = [], 0, json.JSONDecoder()
        while True:  # v11+: name, maybe its id, then its arguments' JSON object (which may hold any text)
            named = self._NAMED.match(body, at)
            if named is None or not body.startswith("{", named.end()):
                raise ValueError("not a named call with arguments")
            arguments, at = decoder.raw_decode(body, named.end())
            calls.append(_call({"name": named.group(1), "arguments": arguments}, self.tools, "arguments",
                               call_id=named.group(2) or self._new_id()))
            rest = body[at:].lstrip()
            if not rest:
                return calls
            if not rest.startswith(self.MARKER):
                raise ValueError("text after a call")
            at = len(body) - len(rest) + len(self.MARKER)


class Llama3JsonParser(_Parser):
    """A reply that is one JSON call `{"name": ..., "parameters": {...}}` (or several joined by ";"),
    maybe after `<|python_tag|>`; a reply that starts any other way is text."""

    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        body = text.lstrip()
        body = body[len(self.TAG):].lstrip() if body.startswith(self.TAG) else body
        if not body.startswith("{"):
            return text, []
        decoder, calls, at = json.JSONDecoder(), [], 0
        try:
            while at < len(body):
                value, at = decoder.raw_decode(body, at)
                calls.append(_call(value, self.tools, "parameters", "arguments"))
                at = len(body) - len(body[at:].lstrip().removeprefix(";").lstrip())
        except ValueError:
            return text, []
        return None, calls

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
