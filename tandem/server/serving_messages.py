"""POST /v1/messages: Anthropic's Messages API over the chat route, as vLLM serves it; POST
/v1/messages/count_tokens.

A request becomes a chat completion (`system` as the system message; text blocks as content, `tool_use` blocks
as the assistant's tool_calls, `tool_result` blocks as tool messages; thinking blocks are dropped from the prompt,
as chat templates drop past reasoning), so templates, tool-call parsing, reasoning (--reasoning-parser; the
request's `thinking` is accepted, not needed) and sampling are the chat route's; vLLM's extra fields pass
through. The reply's content is a thinking block (the `<think>` part), a text block, then a tool_use block per
call. Streams send Anthropic's events: message_start, then each block's content_block_start / _delta / _stop,
then message_delta (stop reason, usage) and message_stop. A block cannot reopen once the next has started, so
a stream whose calls began but then did not parse ends as text in a later block (the non-streamed reply has
that text alone). Errors on these routes come in Anthropic's shape (errors.py), mid-stream as an `error` event.
"""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Literal

from fastapi import Request
from pydantic import Field, ValidationError
from starlette.responses import Response

from tandem.outputs import CompletionOutput, RequestOutput
from tandem.server.errors import anthropic_body, bad_request
from tandem.server.protocol import ChatCompletionRequest, OpenAIModel, SamplingRequest
from tandem.server.serving_chat import ChatServing, Sent, Started, final_output
from tandem.server.serving_common import (SSEResponse, cancel_on_disconnect, dumps, joined_text, merge_streams,
                                          stream_error, usage_of)


class AnthropicMessage(OpenAIModel):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicTool(OpenAIModel):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    type: str | None = None  # Anthropic's server tools (bash, web search...) have one: refused


class AnthropicToolChoice(OpenAIModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None  # accepted: the chat route has no such switch


class CountTokensRequest(OpenAIModel):
    """What count_tokens reads: the prompt's parts."""
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: dict[str, Any] | None = None  # accepted: reasoning comes from --reasoning-parser


class MessagesRequest(CountTokensRequest, SamplingRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    metadata: dict[str, Any] | None = None  # accepted (user_id), unused


def _messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    """The conversation in chat's shape."""
    system = joined_text(req.system, ("text",), "system", "system") if req.system else None
    out = [{"role": "system", "content": system}] if system is not None else []
    for i, m in enumerate(req.messages):
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        texts: list[str] = []
        calls: list[dict[str, Any]] = []

        def flush() -> None:  # the text so far as one turn (a user's text after its tool results is its own)
            if texts or calls:
                out.append({"role": m.role, "content": "\n".join(texts) if texts else None,
                            **({"tool_calls": list(calls)} if calls else {})})
            texts.clear()
            calls.clear()
        for j, block in enumerate(blocks):
            where, kind = f"messages[{i}].content[{j}]", block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind in ("thinking", "redacted_thinking") and m.role == "assistant":
                continue  # past reasoning does not go back into the prompt
            elif kind == "tool_use" and m.role == "assistant" and isinstance(block.get("name"), str):
                calls.append({"id": str(block.get("id")), "type": "function", "function": {
                    "name": block["name"], "arguments": json.dumps(block.get("input") or {})}})
            elif kind == "tool_result" and m.role == "user" and isinstance(block.get("tool_use_id"), str):
                flush()
                out.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                            "content": joined_text(block.get("content") or "", ("text",), f"{where}.content",
                                                   "messages")})
            else:
                raise bad_request(f"{where}: {kind!r} blocks are not supported in {m.role} messages (text, "
                                  "tool_use and thinking in assistant ones, text and tool_result in user ones)",
                                  "messages")
        flush()
    return out


def _tools(req: CountTokensRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """Anthropic's tools and tool_choice in chat's shape."""
    tools = None
    if req.tools:
        for i, tool in enumerate(req.tools):
            if tool.type not in (None, "custom"):
                raise bad_request(f"tools[{i}]: server tools ({tool.type}) are not supported: only custom tools",
                                  "tools")
        tools = [{"type": "function", "function": {"name": t.name, "parameters": t.input_schema,
                                                   **({"description": t.description} if t.description else {})}}
                 for t in req.tools]
    choice = req.tool_choice
    if choice is None:
        return tools, None
    if choice.type == "tool":
        if not choice.name:
            raise bad_request("tool_choice of type tool needs the tool's name", "tool_choice")
        return tools, {"type": "function", "function": {"name": choice.name}}
    return tools, {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def to_chat(req: CountTokensRequest) -> ChatCompletionRequest:
    """The chat request that makes this message (or, for count_tokens, renders its prompt)."""
    tools, choice = _tools(req)
    messages = _messages(req)
    if not any(m["role"] != "system" for m in messages):  # e.g. every message's content an empty list
        raise bad_request("messages hold no content", "messages")
    fields: dict[str, Any] = {}
    if isinstance(req, MessagesRequest):
        if req.n != 1:
            raise bad_request("a message is one reply: n must be 1", "n")
        fields = req.model_dump(include=set(SamplingRequest.model_fields) - {"model", "stop"}, exclude_unset=True)
        fields.update(max_tokens=req.max_tokens, stop=req.stop_sequences)
    try:
        return ChatCompletionRequest(**fields, model=req.model, messages=messages, tools=tools, tool_choice=choice)
    except ValidationError as exc:  # what chat's request refuses of the translation (its messages' shapes)
        raise bad_request(f"messages: {exc.errors()[0].get('msg', 'invalid value')}", "messages") from exc


def _stop(o: CompletionOutput, called: bool) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for a finished output."""
    if o.finish_reason == "length":
        return "max_tokens", None
    if called:
        return "tool_use", None
    if isinstance(o.stop_reason, str):  # the stop string that ended it
        return "stop_sequence", o.stop_reason
    return "end_turn", None


def _usage(final: RequestOutput) -> dict[str, int]:
    u = usage_of([final])
    return {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
            "cache_read_input_tokens": u["prompt_tokens_details"]["cached_tokens"], "cache_creation_input_tokens": 0}


def _input(arguments: str) -> Any:
    try:
        return json.loads(arguments or "{}")
    except ValueError:  # parsers give JSON; a forced call cut short may not be
        return {}


class MessagesServing:
    def __init__(self, chat: ChatServing) -> None:
        self.chat = chat

    async def create(self, req: MessagesRequest, raw: Request) -> Response | dict[str, Any]:
        chat_req = to_chat(req)
        started = await self.chat.start(chat_req, raw)
        shell = {"id": f"msg_{started.rid}", "type": "message", "role": "assistant", "model": started.head["model"],
                 "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": len(started.ids), "output_tokens": 0, "cache_read_input_tokens": 0,
                           "cache_creation_input_tokens": 0}}
        if req.stream:
            return SSEResponse(self._events(chat_req, started, shell))
        return await cancel_on_disconnect(raw, self._full(started, shell))

    async def count_tokens(self, req: CountTokensRequest, raw: Request) -> dict[str, int]:
        chat_req = to_chat(req)
        self.chat.ctx.model(req.model)
        ids, _ = await self.chat.ctx.prepare(raw, lambda: self.chat.prompt_ids(chat_req))
        return {"input_tokens": len(ids)}

    async def _full(self, started: Started, shell: dict[str, Any]) -> dict[str, Any]:
        final = await final_output(started.stream)
        o = final.outputs[0]
        reasoning, content, calls = self.chat.answer(started, o.text)
        blocks = [{"type": "thinking", "thinking": reasoning, "signature": ""}] if reasoning else []
        blocks += [{"type": "text", "text": content}] if content else []
        blocks += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                    "input": _input(c["function"]["arguments"])} for c in calls]
        stop_reason, stop_sequence = _stop(o, bool(calls))
        return {**shell, "content": blocks, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": _usage(final)}

    async def _events(self, chat_req: ChatCompletionRequest, started: Started,
                      shell: dict[str, Any]) -> AsyncIterator[bytes]:
        def event(kind: str, **body: Any) -> bytes:
            return b"event: " + kind.encode() + b"\ndata: " + dumps({"type": kind, **body}) + b"\n\n"

        yield event("message_start", message=shell)
        yield event("ping")
        opened: list[Any] = []  # each block's key, in order: "thinking", "text" or ("call", its chat index)
        sent: dict[int, Sent] = {}
        final: RequestOutput | None = None
        try:
            async for _, out in merge_streams([started.stream]):
                final = out
                delta = (self.chat.delta(chat_req, started, out.outputs[0], sent) or {}).get("delta", {})
                pieces: list[tuple[Any, dict[str, Any] | None, dict[str, Any] | None]] = []  # key, start, delta
                if delta.get("reasoning"):
                    pieces.append(("thinking", {"type": "thinking", "thinking": "", "signature": ""},
                                   {"type": "thinking_delta", "thinking": delta["reasoning"]}))
                if delta.get("content"):
                    pieces.append(("text", {"type": "text", "text": ""},
                                   {"type": "text_delta", "text": delta["content"]}))
                for call in delta.get("tool_calls", []):  # a call's name first, then its arguments' pieces
                    fn, args = call["function"], call["function"].get("arguments")
                    start = {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": {}} \
                        if "id" in call else None
                    pieces.append((("call", call["index"]), start,
                                   {"type": "input_json_delta", "partial_json": args} if args else None))
                for key, start, piece in pieces:
                    if not opened or key != opened[-1]:
                        if start is None:
                            continue  # a closed call's block cannot grow (see the module's docstring)
                        if opened:
                            yield event("content_block_stop", index=len(opened) - 1)
                        opened.append(key)
                        yield event("content_block_start", index=len(opened) - 1, content_block=start)
                    if piece is not None:
                        yield event("content_block_delta", index=len(opened) - 1, delta=piece)
        except Exception as exc:  # noqa: BLE001 - reported in-band: the status line has been sent
            yield event("error", error=anthropic_body(stream_error(exc))["error"])
            return
        if opened:
            yield event("content_block_stop", index=len(opened) - 1)
        called = bool(sent) and sent[0].calls is not None and bool(sent[0].calls.final)
        stop_reason, stop_sequence = _stop(final.outputs[0], called)
        yield event("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    usage=_usage(final))
        yield event("message_stop")
