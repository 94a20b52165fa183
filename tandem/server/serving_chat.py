"""POST /v1/chat/completions: messages through the chat template, streamed or not, with n,
logprobs / top_logprobs, continue_final_message, per-request templates and template kwargs, and tool
calls (forced ones held to their JSON by tool_choice.py, the model's own parsed by tool_parsers.py).
Streamed tool calls go out as they grow, as OpenAI's and vLLM's do: a call's name once it is written, its
arguments once no later text can change them (call_stream.CallStream). With --reasoning-parser a reply's
`<think>` part comes back as the message's `reasoning` (and its alias `reasoning_content`), streamed as it
comes (reasoning.py); tool calls and stop-string hold-back concern the content after it only."""
from __future__ import annotations

import dataclasses
import inspect
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request
from starlette.responses import Response

from tandem.outputs import CompletionOutput, RequestOutput
from tandem.sampling_params import SamplingParams
from tandem.server.errors import APIError, bad_request
from tandem.server.protocol import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessage,
                                    ChoiceLogprobs, ResponseMessage, TokenLogprob, TopLogprob, UsageInfo)
from tandem.server.serving_common import (SSE_DONE, ServingContext, SSEResponse, cancel_on_disconnect, clamp_logprob,
                                          merge_streams, now, resolve_max_tokens, sampling_params, sse, stop_holdback,
                                          stream_error, structured_outputs, usage_of)
from tandem.server.tool_choice import ForcedCalls, forced, forced_schema, functions
from tandem.server import tool_parsers
from tandem.server.reasoning import CLOSE, Thinking
from tandem.server.call_stream import CallStream
from tandem.tokenizer import apply_chat_template

# a template that loops over a message's content expects OpenAI's list of parts, not a string
_ITERATES_CONTENT = re.compile(r"for\s+\w+\s+in\s+\w+\s*(\[\s*['\"]content['\"]\s*\]|\.content\b)")


def content_format(template: str | None, configured: str) -> str:
    if configured != "auto":
        return configured
    return "openai" if isinstance(template, str) and _ITERATES_CONTENT.search(template) else "string"


def _message(m: ChatMessage, fmt: str) -> dict[str, Any]:
    content: Any = m.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise bad_request(f"message content parts of type {part.type!r} are not supported: "
                                  "only text parts", "messages")
            texts.append(part.text)
        content = "\n".join(texts) if fmt == "string" else [{"type": "text", "text": t} for t in texts]
    elif fmt == "openai":
        content = [] if content is None else [{"type": "text", "text": content}]
    elif content is None:
        content = ""  # string templates concatenate content; an assistant turn with tool calls has none
    out: dict[str, Any] = {"role": m.role, "content": content}
    for key in ("name", "tool_calls", "tool_call_id"):
        if getattr(m, key) is not None:
            out[key] = getattr(m, key)
    return out


def render_chat(ctx: ServingContext, messages: list[ChatMessage], *, add_generation_prompt: bool,
                continue_final_message: bool, chat_template: str | None,
                chat_template_kwargs: dict[str, Any] | None, tools: list | None = None) -> str:
    """The prompt text for a conversation; any template failure is the request's fault (400)."""
    tok = ctx.client.tokenizer
    if add_generation_prompt and continue_final_message:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be true "
                          "(set add_generation_prompt to false)", "continue_final_message")
    if continue_final_message and messages[-1].role != "assistant":
        raise bad_request("continue_final_message needs an assistant message last", "continue_final_message")
    template = chat_template or ctx.config.chat_template
    kwargs = dict(chat_template_kwargs or {})
    reserved = sorted(set(kwargs) & _reserved_kwargs(tok))
    if reserved:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")
    fmt = content_format(template or tok.chat_template, ctx.config.chat_template_content_format)
    conversation = [_message(m, fmt) for m in messages]
    try:
        text = apply_chat_template(tok, conversation, add_generation_prompt=add_generation_prompt,
                                   continue_final_message=continue_final_message, chat_template=template,
                                   tools=tools, **kwargs)
    except Exception as exc:  # noqa: BLE001 - template errors come from the request's messages/template
        raise bad_request(f"the chat template failed on these messages: {type(exc).__name__}: {exc}",
                          "messages") from exc
    if not isinstance(text, str):
        raise bad_request("the chat template did not produce text", "chat_template")
    return text


_RESERVED: set[str] | None = None


def _reserved_kwargs(tok: Any) -> set[str]:
    """apply_chat_template's own arguments: template kwargs must not override them."""
    global _RESERVED
    if _RESERVED is None:
        params = inspect.signature(tok.apply_chat_template).parameters
        _RESERVED = {p for p, v in params.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)}
        _RESERVED |= {"messages", "conversation", "tokenize", "return_dict", "tokenizer_kwargs"}
    return _RESERVED


class ChatServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def prompt_ids(self, req: ChatCompletionRequest) -> tuple[list[int], str]:
        """The conversation through the chat template, tokenized (and as text)."""
        text = render_chat(self.ctx, req.messages, add_generation_prompt=req.add_generation_prompt,
                           continue_final_message=req.continue_final_message, chat_template=req.chat_template,
                           chat_template_kwargs=req.chat_template_kwargs,
                           tools=req.tools if req.tool_choice != "none" else None)
        try:
            return self.ctx.client.tokenizer.encode(text, add_special_tokens=req.add_special_tokens), text
        except Exception as exc:  # noqa: BLE001 - e.g. lone surrogates in the messages
            raise bad_request(f"messages could not be tokenized: {exc}", "messages") from exc

    def _tool_parser(self, req: ChatCompletionRequest):
        """What reads the reply's tool calls: the forced calls' JSON, or the model's own syntax when the
        request lets it call its tools; None when the reply is text."""
        if forced(req.tool_choice):
            return ForcedCalls(req.tool_choice)
        if not req.tools or req.tool_choice == "none":
            return None
        template = req.chat_template or self.ctx.config.chat_template or self.ctx.client.tokenizer.chat_template
        parser = tool_parsers.pick(self.ctx.config.tool_call_parser, template if isinstance(template, str) else None)
        return parser(functions(req.tools)) if parser is not None else None

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response | ChatCompletionResponse:
        started = await self.start(req, raw)
        if req.stream:
            return SSEResponse(self._stream(req, started, len(started.ids)))
        return await cancel_on_disconnect(raw, self._full(req, started))

    async def start(self, req: ChatCompletionRequest, raw: Request) -> "Started":
        """The request checked, rendered and submitted (what /v1/responses shares with this route)."""
        ctx = self.ctx
        model = ctx.model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        if req.n > ctx.config.max_seqs_per_request:
            raise bad_request(f"n must be <= {ctx.config.max_seqs_per_request}", "n")
        ids, prompt = await ctx.prepare(raw, lambda: self.prompt_ids(req))
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = resolve_max_tokens(ctx, requested, len(ids), ctx.client.generation_defaults.get("max_tokens"),
                                        prompt_param="messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling_params(ctx, req, max_tokens=max_tokens, logprobs=top, logprobs_param="top_logprobs")
        schema = forced_schema(req.tools, req.tool_choice)
        if schema is not None:
            if params.structured_outputs is not None:
                raise bad_request("a forced tool call takes no other output constraint", "tool_choice")
            params.structured_outputs = {"json": schema}
        thinking = Thinking.for_prompt(prompt) if ctx.config.reasoning_parser else None
        spec = params.structured_outputs
        if thinking is not None and thinking.opened and spec is not None and "after" not in spec:
            # the prompt opened a think block: the constraint holds the answer after it, not the thinking
            # (a request's own `after`, null included, says otherwise)
            params.structured_outputs = {**spec, "after": CLOSE}
        await ctx.check_constraint(params, "tool_choice" if schema is not None else structured_outputs(req)[1])
        parser = self._tool_parser(req)
        if parser is not None and parser.strips_its_markers(ctx.client.tokenizer):
            params.skip_special_tokens = False  # the calls' markers must reach the text to be parsed
        rid = ctx.request_id(raw, req.request_id)
        stream = ctx.track(f"chatcmpl-{rid}-{secrets.token_hex(4)}", ids, params, req.priority, now())
        ctx.log_request(rid, [len(ids)], params)
        head = {"id": f"chatcmpl-{rid}", "created": int(time.time()), "model": model}
        return Started(rid, head, parser, stream, ids, params, thinking)

    @staticmethod
    def reply(parser, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """A finished reply as (content, tool calls)."""
        return parser.parse(text) if parser is not None else (text, [])

    @staticmethod
    def answer(started: "Started", text: str) -> tuple[str | None, str | None, list[dict[str, Any]]]:
        """A finished reply as (reasoning, content, tool calls): calls are read from the content only."""
        reasoning, content = started.thinking.split(text) if started.thinking is not None else (None, text)
        if content is None:
            return reasoning, None, []
        return (reasoning, *ChatServing.reply(started.parser, content))

    async def _full(self, req: ChatCompletionRequest, started: "Started") -> ChatCompletionResponse:
        final = await final_output(started.stream)
        choices = []
        for o in final.outputs:
            logprobs = None
            if req.logprobs:
                logprobs = ChoiceLogprobs(content=self._logprobs(o.token_ids, o.logprobs or [], req.top_logprobs or 0))
            reasoning, content, calls = self.answer(started, o.text)
            message = ResponseMessage(role=self.ctx.config.response_role, content=content, tool_calls=calls,
                                      reasoning=reasoning, reasoning_content=reasoning)
            finish = "tool_calls" if calls and o.finish_reason == "stop" else o.finish_reason
            choices.append(ChatChoice(index=o.index, message=message, logprobs=logprobs, finish_reason=finish,
                                      stop_reason=o.stop_reason))
        usage = UsageInfo(**usage_of([final], reasoning_tokens=self.reasoning_tokens(started, [final])))
        return ChatCompletionResponse(choices=choices, usage=usage, **started.head)

    def reasoning_tokens(self, started: "Started", outs: list[RequestOutput]) -> int | None:
        """Output tokens spent in think blocks (None without a reasoning parser)."""
        if started.thinking is None:
            return None
        skip = started.params.skip_special_tokens
        decode = lambda ids: self.ctx.client.tokenizer.decode(ids, skip_special_tokens=skip)  # noqa: E731
        return sum(started.thinking.tokens(o.text, o.token_ids, decode) for out in outs for o in out.outputs)

    def _usage(self, started: "Started", latest: RequestOutput | None, prompt_len: int) -> dict[str, Any]:
        outs = [latest] if latest else []
        return usage_of(outs, prompt_len, self.reasoning_tokens(started, outs))

    async def _stream(self, req: ChatCompletionRequest, started: "Started", prompt_len: int) -> AsyncIterator[bytes]:
        opts = req.stream_options
        head = {**started.head, "object": "chat.completion.chunk"}
        sent: dict[int, Sent] = {}
        latest: RequestOutput | None = None

        def chunk(choice: dict) -> bytes:
            body = {**head, "choices": [choice]}
            if opts is not None and opts.continuous_usage_stats:
                body["usage"] = self._usage(started, latest, prompt_len)
            return sse(body)

        try:
            for i in range(req.n):  # the role first, as OpenAI does, before any token exists
                yield chunk({"index": i, "delta": {"role": self.ctx.config.response_role, "content": ""},
                             "logprobs": None, "finish_reason": None})
            async for _, out in merge_streams([started.stream]):
                latest = out
                for o in out.outputs:
                    if o.index in sent and sent[o.index].done:
                        continue  # that choice has finished
                    choice = self.delta(req, started, o, sent)
                    if choice is not None:
                        yield chunk(choice)
            if opts is not None and opts.include_usage:
                yield sse({**head, "choices": [], "usage": self._usage(started, latest, prompt_len)})
        except Exception as exc:  # noqa: BLE001 - reported in-band: the status line has been sent
            yield sse(stream_error(exc).body())
        yield SSE_DONE

    def delta(self, req: ChatCompletionRequest, started: "Started", o: CompletionOutput,
              sent: dict[int, Sent]) -> dict | None:
        """The next chunk of one choice. Text that may still turn out to be a stop string or a tool call is
        held back; tool calls go out as they grow (CallStream), the rest of them in the choice's last chunk. A
        reply whose calls began but did not parse ends as the non-streamed one: its text all content. Reasoning
        goes out first, as it comes; the rest of this works on the content after it."""
        parser, stops = started.parser, started.params.stop
        state = sent.setdefault(o.index, Sent(CallStream(parser) if parser is not None else None))
        finished = o.finish_reason is not None
        think = ""
        if started.thinking is not None:
            # reasoning a stop string may still cut is held back too: the stream reassembles to the full reply
            think, state.reasoned, content = started.thinking.step(o.text, finished, stop_holdback(o.text, stops),
                                                                   state.reasoned)
            o = dataclasses.replace(o, text=content)
        start, done_tokens = state.text, state.tokens
        calls: list[dict[str, Any]] | None = None
        if finished:
            content, parsed = self.reply(parser, o.text)
            calls = state.calls.finish(parsed) if parsed else None
            end = len(content or "") if calls is not None else len(o.text)
        else:
            end = len(o.text) - stop_holdback(o.text, stops)
            if parser is not None:
                content_end = parser.content_end(o.text)
                if content_end < end:  # the rest may be calls; what a stop string may still cut is no call's yet
                    calls = state.calls.update(o.text[:end])
                end = min(end, content_end)
        text = o.text[start:max(start, end)]
        new_ids = o.token_ids[done_tokens:]
        logprobs = None
        if req.logprobs and new_ids:
            # the engine may already be appending the next step's entry: slice by token count
            entries = (o.logprobs or [])[done_tokens:len(o.token_ids)]
            logprobs = {"content": [e.model_dump() for e in self._logprobs(new_ids, entries, req.top_logprobs or 0)]}
        if not (text or think or finished or logprobs or calls):
            return None
        state.text, state.tokens, state.done = max(start, end), len(o.token_ids), finished
        delta: dict[str, Any] = {"reasoning": think, "reasoning_content": think} if think else {}
        if text:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = calls
        called = state.calls is not None and bool(state.calls.final)
        finish = ("tool_calls" if called and o.finish_reason == "stop" else o.finish_reason) if finished else None
        return {"index": o.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                "stop_reason": o.stop_reason if finished else None}

    def _logprobs(self, token_ids: list[int], entries: list, k: int) -> list[TokenLogprob]:
        out = []
        for tid, entry in zip(token_ids, entries):
            top = sorted(((t, v) for t, v in entry.items() if v.rank is not None and v.rank <= k),
                         key=lambda tv: tv[1].rank)[:k]
            chosen = entry.get(tid)
            out.append(TokenLogprob(**self._token(tid, chosen.logprob if chosen else float("-inf")),
                                    top_logprobs=[TopLogprob(**self._token(t, v.logprob)) for t, v in top]))
        return out

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.ctx.token_text(token_id)
        return {"token": text, "logprob": clamp_logprob(logprob),
                "bytes": list(text.encode("utf-8", errors="replace"))}


@dataclass
class Started:
    """A chat request submitted: its ids for responses, what reads its tool calls, and its output stream."""
    rid: str
    head: dict[str, Any]
    parser: Any
    stream: AsyncIterator[RequestOutput]
    ids: list[int]
    params: SamplingParams
    thinking: Thinking | None = None  # reads the reply's reasoning part (--reasoning-parser)


@dataclass
class Sent:
    """What a stream has sent of one choice: its text up to `text`, the logprobs of its first `tokens` tokens,
    its tool calls so far (None: the reply is text); `done` once its last chunk is out."""
    calls: CallStream | None
    text: int = 0
    tokens: int = 0
    done: bool = False
    reasoned: int = 0  # the reply's text sent as reasoning ends here


async def final_output(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """A request's finished output, engine failures as OpenAI-shaped errors."""
    final: RequestOutput | None = None
    try:
        async for _, out in merge_streams([stream]):
            final = out
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - engine failures become OpenAI-shaped errors
        raise stream_error(exc) from exc
    assert final is not None and final.finished, "a stream ended without a finished output"
    return final

