"""POST /v1/responses: OpenAI's Responses API over the chat route; GET and DELETE /v1/responses/{id}.

A request becomes a chat completion (instructions as the system message; input messages, function calls and
their outputs as the conversation; function tools, tool_choice and text.format as chat's tools, tool_choice and
response_format), so templates, tool-call parsing, structured outputs and sampling are the chat route's. The
reply comes back as output items: a message with its output_text, then one function_call item per call; a
reply cut by max_output_tokens is `incomplete`. Streams send Responses' typed events (response.created ...
response.output_text.delta ... response.completed), a function call's as chat streams it: its item added once
its name is written, response.function_call_arguments.delta as its arguments grow, .done once the reply has
ended (with the message's); the completed response is the non-streamed one. With --reasoning-parser the reply's
`<think>` part is a reasoning item before the message (its text as `reasoning_text` content), streamed as
response.reasoning_text.delta ... .done; reasoning items in the input (clients send them back, and stored
conversations hold them) are dropped from the prompt, as chat templates drop past reasoning. A finished
response (completed or incomplete, not failed) is stored unless `store: false` (response_store.py): `previous_response_id` continues
its conversation (its instructions are not carried over, as OpenAI's are not), so an agent sends only the
new turn or its calls' outputs. `background` is refused.
"""
from __future__ import annotations

import json
import secrets
import time
from typing import Any, AsyncIterator, Callable, Literal

from fastapi import Request
from pydantic import Field
from starlette.responses import Response

from tandem.outputs import RequestOutput
from tandem.server.errors import bad_request
from tandem.server.protocol import ChatCompletionRequest, SamplingRequest
from tandem.server.response_items import (call_item, finished, item_id, message_item, reasoning_item,
                                          reasoning_part, text_part)
from tandem.server.response_store import ResponseStore
from tandem.server.serving_chat import ChatServing, Sent, Started, final_output
from tandem.server.serving_common import (SSEResponse, cancel_on_disconnect, dumps, joined_text, merge_streams,
                                          stream_error)

_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(SamplingRequest):
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    background: bool = False


def input_items(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as items: a string is one user message."""
    if isinstance(req.input, str):
        return [{"type": "message", "role": "user", "content": req.input}]
    return req.input


def _messages(instructions: str | None, history: list[dict[str, Any]],
              items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages from the stored conversation's items and the request's own."""
    messages = [{"role": "system", "content": instructions}] if instructions else []
    numbered = [(f"previous_response_id's item {i}", item) for i, item in enumerate(history)]
    for where, item in numbered + [(f"input[{i}]", item) for i, item in enumerate(items)]:
        kind = item.get("type", "message")
        if kind == "reasoning":
            continue  # past reasoning does not go back into the prompt, as chat templates drop it
        if kind == "message" and item.get("role") in ("user", "system", "developer", "assistant"):
            text = joined_text(item.get("content"), _TEXT_PARTS, f"{where}.content", "input")
            messages.append({"role": item["role"], "content": text})
        elif kind == "function_call" and isinstance(item.get("name"), str):
            call = {"id": item.get("call_id") or item.get("id") or f"call_{secrets.token_hex(8)}", "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}
            if messages and messages[-1]["role"] == "assistant":  # one assistant turn: its text, then its calls
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output" and isinstance(item.get("call_id"), str):
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise bad_request(f"{where}: items of type {kind!r} are not supported (messages, function_call, "
                              "function_call_output and reasoning are)", "input")
    if not messages:
        raise bad_request("input is empty", "input")
    return messages


def _tools(req: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """Responses' function tools and tool_choice in chat's shape."""
    tools = None
    if req.tools:
        tools = []
        for i, tool in enumerate(req.tools):
            if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
                raise bad_request(f"tools[{i}]: only function tools are supported", "tools")
            tools.append({"type": "function", "function": {key: tool[key] for key in
                                                           ("name", "description", "parameters") if key in tool}})
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise bad_request("tool_choice must be none, auto, required or {type: function, name}", "tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools, choice


def _response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = (req.text or {}).get("format")
    if fmt is not None and not isinstance(fmt, dict):
        raise bad_request("text.format must be an object: {type: text | json_object | json_schema, ...}", "text")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        return {"type": "json_schema", "json_schema": {key: fmt[key] for key in ("name", "schema", "strict")
                                                       if key in fmt}}
    raise bad_request("text.format must be text, json_object or json_schema with a schema", "text")


def to_chat(req: ResponsesRequest, history: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request that makes this response, after the stored conversation `history`."""
    if req.background:
        raise bad_request("background responses are not supported", "background")
    if req.n != 1:
        raise bad_request("the Responses API makes one output: n must be 1", "n")
    tools, choice = _tools(req)
    sampling = req.model_dump(include=set(SamplingRequest.model_fields) - {"response_format"}, exclude_unset=True)
    return ChatCompletionRequest(**sampling, messages=_messages(req.instructions, history, input_items(req)),
                                 max_completion_tokens=req.max_output_tokens,
                                 tools=tools, tool_choice=choice, response_format=_response_format(req))


class ResponsesServing:
    def __init__(self, chat: ChatServing, store: ResponseStore) -> None:
        self.chat, self.store = chat, store

    async def create(self, req: ResponsesRequest, raw: Request) -> Response | dict[str, Any]:
        chat_req = to_chat(req, self._history(req.previous_response_id))
        started = await self.chat.start(chat_req, raw)
        shell = self._shell(req, started, self.store.enabled)

        def keep(response: dict[str, Any]) -> dict[str, Any]:
            if response["store"]:
                self.store.put(response, input_items(req), req.previous_response_id)
            return response
        if req.stream:
            return SSEResponse(self._events(chat_req, started, shell, keep))
        return keep(await cancel_on_disconnect(raw, self._full(started, shell)))

    def _history(self, previous_id: str | None) -> list[dict[str, Any]]:
        if previous_id is None:
            return []
        if not self.store.enabled:
            raise bad_request("this server stores no responses (--responses-store-size 0): send the whole "
                              "conversation in input", "previous_response_id")
        return self.store.history(previous_id)

    @staticmethod
    def _shell(req: ResponsesRequest, started: Started, storing: bool) -> dict[str, Any]:
        """The response object before its output: what the request asked for, echoed."""
        return {"id": f"resp_{started.rid}", "object": "response", "created_at": int(time.time()),
                "status": "in_progress", "model": started.head["model"], "output": [], "error": None,
                "incomplete_details": None, "instructions": req.instructions,
                "max_output_tokens": req.max_output_tokens, "temperature": started.params.temperature,
                "top_p": started.params.top_p, "tools": req.tools or [], "tool_choice": req.tool_choice or "auto",
                "parallel_tool_calls": req.parallel_tool_calls, "text": req.text or {"format": {"type": "text"}},
                "previous_response_id": req.previous_response_id, "store": req.store and storing,
                "metadata": req.metadata or {}, "usage": None}

    async def _full(self, started: Started, shell: dict[str, Any]) -> dict[str, Any]:
        final = await final_output(started.stream)
        reasoning, content, calls = self.chat.answer(started, final.outputs[0].text)
        items = [reasoning_item(item_id("rs"), reasoning, "completed")] if reasoning else []
        items += [message_item(item_id("msg"), content, "completed")] if content else []
        items += [call_item(call, "completed") for call in calls]
        return finished(shell, final, items, self.chat.reasoning_tokens(started, [final]) or 0)

    async def _events(self, chat_req: ChatCompletionRequest, started: Started, shell: dict[str, Any],
                      keep: Callable[[dict[str, Any]], dict[str, Any]]) -> AsyncIterator[bytes]:
        seq = iter(range(1 << 62))

        def event(kind: str, **body: Any) -> bytes:
            return b"event: " + kind.encode() + b"\ndata: " + dumps({"type": kind, "sequence_number": next(seq),
                                                                      **body}) + b"\n\n"

        yield event("response.created", response=shell)
        yield event("response.in_progress", response=shell)
        msg_id, text = item_id("msg"), ""
        rs_id, thought, thinking = item_id("rs"), "", False  # the reasoning item, while it is open
        calls: list[dict[str, Any]] = []  # the function_call items opened, by the chat call's index
        index: dict[str, int] = {}  # each item's output_index: items count in the order they open
        items: list[dict[str, Any]] = []  # the finished items, in order
        sent: dict[int, Sent] = {}
        final: RequestOutput | None = None

        def end_reasoning(status: str) -> list[bytes]:
            nonlocal thinking
            thinking, at = False, index[rs_id]
            items.append(reasoning_item(rs_id, thought, status))
            return [event("response.reasoning_text.done", item_id=rs_id, output_index=at, content_index=0,
                          text=thought),
                    event("response.content_part.done", item_id=rs_id, output_index=at, content_index=0,
                          part=reasoning_part(thought)),
                    event("response.output_item.done", output_index=at, item=items[-1])]
        try:
            async for _, out in merge_streams([started.stream]):
                final, o = out, out.outputs[0]
                delta = (self.chat.delta(chat_req, started, o, sent) or {}).get("delta", {})
                if delta.get("reasoning"):
                    if not thought:  # the reasoning item opens with its first text
                        index[rs_id], thinking = len(index), True
                        yield event("response.output_item.added", output_index=index[rs_id],
                                    item=reasoning_item(rs_id, None, "in_progress"))
                        yield event("response.content_part.added", item_id=rs_id, output_index=index[rs_id],
                                    content_index=0, part=reasoning_part(""))
                    thought += delta["reasoning"]
                    yield event("response.reasoning_text.delta", item_id=rs_id, output_index=index[rs_id],
                                content_index=0, delta=delta["reasoning"])
                if thinking and (delta.get("content") or delta.get("tool_calls")):
                    for e in end_reasoning("completed"):  # the content began: the reasoning has ended
                        yield e
                piece = delta.get("content", "")
                if piece:
                    if not text:  # the message item opens with its first text
                        index[msg_id] = len(index)
                        yield event("response.output_item.added", output_index=index[msg_id],
                                    item=message_item(msg_id, None, "in_progress"))
                        yield event("response.content_part.added", item_id=msg_id, output_index=index[msg_id],
                                    content_index=0, part=text_part(""))
                    text += piece
                    yield event("response.output_text.delta", item_id=msg_id, output_index=index[msg_id],
                                content_index=0, delta=piece, logprobs=[])
                for call in delta.get("tool_calls", []):
                    if "id" in call:  # a call begins: its item opens
                        calls.append(call_item({**call, "function": {**call["function"], "arguments": ""}},
                                               "in_progress"))
                        index[calls[-1]["id"]] = len(index)
                        yield event("response.output_item.added", output_index=index[calls[-1]["id"]],
                                    item=calls[-1])
                    item, args = calls[call["index"]], call["function"]["arguments"]
                    if args:
                        item["arguments"] += args
                        yield event("response.function_call_arguments.delta", item_id=item["id"],
                                    output_index=index[item["id"]], delta=args)
        except Exception as exc:  # noqa: BLE001 - reported in-band: the status line has been sent
            error = stream_error(exc)
            yield event("error", code=str(error.status), message=error.message, param=error.param)
            yield event("response.failed", response={**shell, "status": "failed",
                                                     "error": {"code": "server_error", "message": error.message}})
            return
        cut = final.outputs[0].finish_reason == "length"
        if thinking:  # the reply ended in (or right after) its reasoning
            for e in end_reasoning("incomplete" if cut else "completed"):
                yield e
        if text:
            yield event("response.output_text.done", item_id=msg_id, output_index=index[msg_id], content_index=0,
                        text=text, logprobs=[])
            yield event("response.content_part.done", item_id=msg_id, output_index=index[msg_id],
                        content_index=0, part=text_part(text))
            done = message_item(msg_id, text, "incomplete" if cut else "completed")
            yield event("response.output_item.done", output_index=index[msg_id], item=done)
            items.append(done)
        ended = sent[0].calls.final if sent and sent[0].calls is not None else []
        for j, item in enumerate(calls):
            if j >= len(ended):  # a call that began, but the reply did not parse: it stays text
                yield event("response.output_item.done", output_index=index[item["id"]],
                            item={**item, "status": "incomplete"})
                continue
            yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index[item["id"]],
                        arguments=item["arguments"])
            items.append({**item, "status": "completed"})
            yield event("response.output_item.done", output_index=index[item["id"]], item=items[-1])
        response = keep(finished(shell, final, items, self.chat.reasoning_tokens(started, [final]) or 0))
        yield event("response.completed" if response["status"] == "completed" else "response.incomplete",
                    response=response)
