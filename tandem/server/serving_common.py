"""Pieces both OpenAI endpoints share: the serving context, request -> SamplingParams, context-length
checks, stop-string hold-back for streams, stream merging, SSE framing and disconnect handling."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tandem.outputs import RequestOutput
from tandem.sampling_params import SamplingParams
from tandem.server.config import ServerConfig
from tandem.server.engine_client import EngineClient, EngineDeadError, EngineError
from tandem.server.errors import APIError, bad_request, model_not_found, server_error
from tandem.server.metrics import ServerMetrics
from tandem.server.protocol import SamplingRequest
from tandem.tokenizer import TokenTexts

log = logging.getLogger("tandem.server")
T = TypeVar("T")
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; OpenAI and vLLM clamp the same way
LARGE_BODY_BYTES = 256 * 1024  # request bodies from here on are prepared off the event loop
_CHECKED_FIELDS = {"prompt", "stop_token_ids", "logprobs", "prompt_logprobs", "max_tokens"}  # engine-side checks
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


@dataclass
class ServingContext:
    client: EngineClient
    config: ServerConfig
    metrics: ServerMetrics
    names: list[str]
    _token_texts: TokenTexts | None = None
    _prep: ThreadPoolExecutor | None = None

    async def prepare(self, raw: Request, work: Callable[[], T]) -> T:
        """Runs a request's input preparation (chat template, tokenizing): on the event loop for small
        bodies, on one helper thread for large ones, whose tokenizing takes seconds (10 MB: 6.6 s) that
        every other stream would otherwise wait out. One thread: the tokenizer is used by one at a time."""
        if int(raw.headers.get("content-length") or 0) < LARGE_BODY_BYTES:
            return work()
        if self._prep is None:
            self._prep = ThreadPoolExecutor(1, thread_name_prefix="tandem-prep")
        return await asyncio.get_running_loop().run_in_executor(self._prep, work)

    async def check_constraint(self, params: SamplingParams, field: str) -> None:
        """Compiles the request's output constraint (structured outputs) on the helper thread: a large schema
        takes a good part of a second the first time, which every stream would wait out on the event loop.
        One that does not compile is a 400 naming `field`, where the request put it."""
        if params.structured_outputs is None:
            return
        if self._prep is None:
            self._prep = ThreadPoolExecutor(1, thread_name_prefix="tandem-prep")
        try:
            await asyncio.get_running_loop().run_in_executor(self._prep, self.client.check_structured, params)
        except ValueError as exc:
            raise bad_request(str(exc), field) from exc

    def model(self, requested: str | None) -> str:
        """The served name a request addresses: the model's, or a LoRA adapter's (404 for an unknown one)."""
        if requested is None or requested == "":
            return self.names[0]
        if requested not in self.names and requested not in self.client.loras:
            raise model_not_found(requested)
        return requested

    def token_text(self, token_id: int) -> str:
        """A token on its own as text (cached)."""
        if self._token_texts is None:
            self._token_texts = TokenTexts(self.client.tokenizer)
        return self._token_texts(token_id)

    def request_id(self, raw: Request, body_id: str | None) -> str:
        """vLLM's order: the X-Request-Id header, the body's request_id, else random."""
        return raw.headers.get("x-request-id") or body_id or secrets.token_hex(16)

    def log_request(self, request_id: str, prompt_lens: list[int], params: SamplingParams) -> None:
        if not self.config.disable_log_requests:
            log.info("request %s: prompt tokens %s, %s", request_id, prompt_lens, params)

    def track(self, request_id: str, ids: list[int], params: SamplingParams, priority: int,
              arrival: float) -> AsyncIterator[RequestOutput]:
        """Start one engine request (validating now) with its metrics recorded."""
        try:
            stream = self.client.generate(request_id, ids, params, priority)
        except EngineError as exc:
            raise stream_error(exc) from exc
        except ValueError as exc:  # the engine's input checks name the field first
            field_name = str(exc).split(" ", 1)[0]
            raise bad_request(str(exc), field_name if field_name in _CHECKED_FIELDS else None) from exc
        return self.metrics.track(stream, arrival)


def _pick(req: SamplingRequest, defaults: dict[str, Any], name: str, fallback: Any) -> Any:
    value = getattr(req, name)
    return value if value is not None else defaults.get(name, fallback)


def sampling_params(ctx: ServingContext, req: SamplingRequest, *, max_tokens: int, best_of: int | None = None,
                    logprobs: int | None = None, prompt_logprobs: int | None = None,
                    logprobs_param: str = "logprobs") -> SamplingParams:
    """Request fields over generation_config.json defaults over OpenAI's; bad values are a 400.
    `logprobs_param`: the request field that asked for `logprobs` (chat's is top_logprobs)."""
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    structured, _ = structured_outputs(req)
    for name, k in ((logprobs_param, logprobs), ("prompt_logprobs", prompt_logprobs)):
        if k is not None and k > ctx.config.max_logprobs:
            raise bad_request(f"{name} must be <= {ctx.config.max_logprobs}, got {k}", name)
    if req.stream and best_of is not None and best_of != req.n:
        raise bad_request("best_of must equal n when streaming", "best_of")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    for word in req.bad_words or []:  # the engine tokenizes these on its thread: fail here instead
        try:
            ctx.client.tokenizer.encode(word, add_special_tokens=False)
        except Exception as exc:  # noqa: BLE001 - e.g. lone surrogates
            raise bad_request(f"bad_words entry could not be tokenized: {exc}", "bad_words") from exc
    d = ctx.client.generation_defaults
    top_k = _pick(req, d, "top_k", 0)
    try:
        return SamplingParams(
            n=req.n, best_of=best_of, temperature=_pick(req, d, "temperature", 1.0),
            top_p=_pick(req, d, "top_p", 1.0), top_k=min(top_k, 2**31 - 1),  # beyond the vocabulary is off
            min_p=_pick(req, d, "min_p", 0.0), repetition_penalty=_pick(req, d, "repetition_penalty", 1.0),
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=req.seed,
            stop=req.stop, stop_token_ids=req.stop_token_ids, bad_words=req.bad_words, ignore_eos=req.ignore_eos,
            max_tokens=max_tokens, min_tokens=req.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens, structured_outputs=structured,
            lora=req.model if req.model in ctx.client.loras and req.model not in ctx.names else None)
    except ValueError as exc:
        raise bad_request(str(exc), str(exc).split(" ", 1)[0]) from exc


def structured_outputs(req: SamplingRequest) -> tuple[dict[str, Any] | None, str]:
    """The one output constraint a request asks for (OpenAI's response_format, vLLM's structured_outputs, or
    its older guided_* fields) and the field it came in; asking in two ways is a 400."""
    asked: dict[str, dict[str, Any]] = {}
    fmt = req.response_format
    if fmt is not None:
        kind = fmt.get("type", "text")
        if kind == "json_object":
            asked["response_format"] = {"json_object": True}
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise bad_request("response_format json_schema needs json_schema.schema, a JSON schema object",
                                  "response_format")
            asked["response_format"] = {"json": schema}
        elif kind != "text":
            raise bad_request(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                              "response_format")
    if req.structured_outputs is not None:
        asked["structured_outputs"] = req.structured_outputs
    for name, kind in _GUIDED.items():
        if getattr(req, name) is not None:
            asked[name] = {kind: getattr(req, name)}
    if len(asked) > 1:
        raise bad_request(f"one output constraint at a time, got {sorted(asked)}", sorted(asked)[1])
    return next(iter(asked.values()), None), next(iter(asked), "structured_outputs")


def resolve_max_tokens(ctx: ServingContext, requested: int | None, prompt_len: int,
                       default: int | None = None, prompt_param: str = "prompt") -> int:
    """max_tokens checked against the context length, or all the room left when unset."""
    limit = ctx.client.max_model_len
    if prompt_len >= limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens. However, your prompt is "
                          f"{prompt_len} tokens, which leaves no room for output. Please shorten the prompt.",
                          prompt_param)
    room = limit - prompt_len
    if requested is None:
        return min(room, default) if default else room
    if prompt_len + requested > limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                          f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the "
                          "completion). Please reduce the length of the prompt or completion.", "max_tokens")
    return requested


def usage_of(outs: list[RequestOutput], prompt_tokens: int | None = None,
             reasoning_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage of some requests' latest outputs; `prompt_tokens` when there may be none yet;
    `reasoning_tokens` with a reasoning parser."""
    prompt = sum(len(o.prompt_token_ids) for o in outs) if prompt_tokens is None else prompt_tokens
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outs)},
            **({} if reasoning_tokens is None else
               {"completion_tokens_details": {"reasoning_tokens": reasoning_tokens}})}


def joined_text(content: Any, kinds: tuple[str, ...], what: str, param: str) -> str:
    """Message content as one string: a string, or text parts (of the given types) joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") in kinds
                                         and isinstance(part.get("text"), str) for part in content):
        return "\n".join(part["text"] for part in content)
    raise bad_request(f"{what} must be a string or a list of text parts ({', '.join(kinds)}): no other kinds "
                      "are supported", param)


def stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string: text a
    stream must not emit yet, since the next token may complete the stop (and cut it)."""
    best = 0
    if not text:
        return 0
    last = text[-1]
    for stop in stops:
        k = stop.rfind(last, 0, len(stop) - 1)
        while k >= best:  # candidate: stop[:k + 1] ends with the text's last character
            n = k + 1
            if n <= len(text) and text.endswith(stop[:n]):
                best = n
                break
            k = stop.rfind(last, 0, k)
    return best


def clamp_logprob(value: float) -> float:
    return LOGPROB_FLOOR if math.isnan(value) else max(value, LOGPROB_FLOOR)


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, tagged with the stream's index. Closing the merge
    closes every stream (which aborts their requests)."""
    pending: dict[asyncio.Future, int] = {}
    try:
        for i, s in enumerate(streams):
            pending[asyncio.ensure_future(anext(s))] = i
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=pending.__getitem__):
                i = pending.pop(fut)
                try:
                    item = fut.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, item
    finally:
        for fut in pending:
            fut.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for s in streams:
            aclose = getattr(s, "aclose", None)
            if aclose is not None:
                await aclose()


def dumps(obj: Any) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from the request: escape them
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def stream_error(exc: BaseException) -> APIError:
    """An exception inside a running stream, as the error event the client gets."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc))
    if isinstance(exc, EngineError):
        return server_error(str(exc))
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    log.exception("stream failed", exc_info=exc)
    return server_error(f"internal server error: {type(exc).__name__}")


class SSEResponse(StreamingResponse):
    """A server-sent-event stream that closes its generator however the response ends, so a
    client that goes away aborts its requests at once rather than at garbage collection."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def cancel_on_disconnect(raw: Request, work: Awaitable[T]) -> T | Response:
    """Run a non-streaming handler, cancelling it (and so aborting its requests) if the client
    disconnects first. The body has been read already, so the next message is the disconnect."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        try:
            while (await raw.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # noqa: BLE001 - cannot watch this connection: just let the work finish
            await asyncio.Event().wait()

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


def now() -> float:
    return time.monotonic()
