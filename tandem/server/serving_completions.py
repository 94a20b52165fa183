"""POST /v1/completions: text or token-id prompts (one or many), streamed or not, with n, echo,
logprobs and vLLM's extra sampling fields. Choice index = prompt index * n + sample index."""
from __future__ import annotations

import secrets
import time
from typing import Any, AsyncIterator

from fastapi import Request
from starlette.responses import Response

from tandem.outputs import CompletionOutput, RequestOutput
from tandem.server.errors import APIError, bad_request
from tandem.server.protocol import CompletionChoice, CompletionLogProbs, CompletionRequest, CompletionResponse, UsageInfo
from tandem.server.serving_common import (SSE_DONE, ServingContext, SSEResponse, cancel_on_disconnect, clamp_logprob,
                                          merge_streams, now, resolve_max_tokens, sampling_params, sse, stop_holdback,
                                          stream_error, structured_outputs, usage_of)

Prompt = tuple[str | None, list[int]]  # (text if given as text, token ids)


class CompletionServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: CompletionRequest, raw: Request) -> Response | CompletionResponse:
        ctx = self.ctx
        model = ctx.model(req.model)
        if req.suffix is not None:
            raise bad_request("suffix is not supported (no fill-in-the-middle)", "suffix")
        prompts = await ctx.prepare(raw, lambda: self._prompts(req))
        if len(prompts) * (req.best_of or req.n) > ctx.config.max_seqs_per_request:
            raise bad_request(f"this request asks for {len(prompts) * (req.best_of or req.n)} sequences "
                              f"(prompts x best_of); the limit is {ctx.config.max_seqs_per_request}", "n")
        prompt_logprobs = req.prompt_logprobs
        if req.echo and req.logprobs is not None:  # echoed prompt tokens carry their logprobs too
            prompt_logprobs = max(prompt_logprobs or 0, req.logprobs)
        rid = ctx.request_id(raw, req.request_id)
        arrival, suffix = now(), secrets.token_hex(4)
        streams, stops = [], []
        for i, (_, ids) in enumerate(prompts):
            params = sampling_params(ctx, req, max_tokens=resolve_max_tokens(ctx, req.max_tokens, len(ids)),
                                     best_of=req.best_of, logprobs=req.logprobs, prompt_logprobs=prompt_logprobs)
            if i == 0:  # one constraint for every prompt
                await ctx.check_constraint(params, structured_outputs(req)[1])
            streams.append(ctx.track(f"cmpl-{rid}-{i}-{suffix}", ids, params, req.priority, arrival))
            stops.append(params.stop)
        ctx.log_request(rid, [len(ids) for _, ids in prompts], params)
        texts = [t if t is not None else ctx.client.tokenizer.decode(ids) for t, ids in prompts] \
            if req.echo else [""] * len(prompts)
        head = {"id": f"cmpl-{rid}", "created": int(time.time()), "model": model}
        if req.stream:
            return SSEResponse(self._stream(req, head, streams, stops, texts))
        return await cancel_on_disconnect(raw, self._full(req, head, streams, texts))

    def _prompts(self, req: CompletionRequest) -> list[Prompt]:
        p = req.prompt
        if isinstance(p, str):
            items: list[Any] = [p]
        elif not p:
            raise bad_request("prompt must not be empty", "prompt")
        elif isinstance(p[0], int):
            items = [p]
        else:
            items = list(p)
        out: list[Prompt] = []
        for item in items:
            if isinstance(item, str):
                try:
                    ids = self.ctx.client.tokenizer.encode(item, add_special_tokens=req.add_special_tokens)
                except Exception as exc:  # noqa: BLE001 - e.g. lone surrogates the tokenizer cannot take
                    raise bad_request(f"prompt could not be tokenized: {exc}", "prompt") from exc
                if not ids:
                    raise bad_request("prompt must not be empty", "prompt")
                out.append((item, ids))
            else:
                out.append((None, list(item)))
        return out

    # ---- responses ----------------------------------------------------------------------------

    async def _full(self, req: CompletionRequest, head: dict, streams: list, texts: list[str]) -> CompletionResponse:
        finals: list[RequestOutput | None] = [None] * len(streams)
        try:
            async for i, out in merge_streams(streams):
                if out.finished:
                    finals[i] = out
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - engine failures become OpenAI-shaped errors
            raise stream_error(exc) from exc
        choices = []
        for i, out in enumerate(finals):
            assert out is not None, "a stream ended without a finished output"
            for o in out.outputs:
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self._logprobs(o.token_ids, o.logprobs or [], len(texts[i]))
                    if req.echo:
                        logprobs = self._merge(self._prompt_logprobs(out), logprobs)
                choices.append(CompletionChoice(
                    index=i * req.n + o.index, text=texts[i] + o.text, logprobs=logprobs,
                    finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                    prompt_logprobs=self._vllm_prompt_logprobs(out) if req.prompt_logprobs is not None else None))
        return CompletionResponse(choices=choices, usage=UsageInfo(**usage_of(finals)), **head)

    async def _stream(self, req: CompletionRequest, head: dict, streams: list, stops: list[list[str]],
                      texts: list[str]) -> AsyncIterator[bytes]:
        opts = req.stream_options
        sent_text: dict[tuple[int, int], int] = {}
        sent_tokens: dict[tuple[int, int], int] = {}
        offsets: dict[tuple[int, int], int] = {}
        done: set[tuple[int, int]] = set()
        latest: dict[int, RequestOutput] = {}
        try:
            async for i, out in merge_streams(streams):
                latest[i] = out
                for o in out.outputs:
                    key = (i, o.index)
                    if key in done:
                        continue
                    choice = self._delta(req, key, o, out, stops[i], texts[i], sent_text, sent_tokens, offsets)
                    if choice is None:
                        continue
                    chunk = {**head, "object": "text_completion", "choices": [choice]}
                    if opts is not None and opts.continuous_usage_stats:
                        chunk["usage"] = usage_of(list(latest.values()))
                    yield sse(chunk)
                    if o.finish_reason is not None:
                        done.add(key)
            if opts is not None and opts.include_usage:
                yield sse({**head, "object": "text_completion", "choices": [], "usage": usage_of(list(latest.values()))})
        except Exception as exc:  # noqa: BLE001 - reported in-band: the status line has been sent
            yield sse(stream_error(exc).body())
        yield SSE_DONE

    def _delta(self, req: CompletionRequest, key: tuple[int, int], o: CompletionOutput, out: RequestOutput,
               stops: list[str], echo_text: str, sent_text: dict, sent_tokens: dict, offsets: dict) -> dict | None:
        """The next chunk of one choice, or None when there is nothing new to say yet."""
        finished = o.finish_reason is not None
        end = len(o.text) if finished else len(o.text) - stop_holdback(o.text, stops)
        start = sent_text.get(key, 0)
        first = key not in sent_tokens
        text = (echo_text if first else "") + o.text[start:max(end, start)]
        done_tokens = sent_tokens.get(key, 0)
        new_ids = o.token_ids[done_tokens:]
        logprobs = None
        if req.logprobs is not None and (new_ids or first):
            base = offsets.get(key, 0) + (len(echo_text) if first else 0)
            # the engine may already be appending the next step's entry: slice by token count
            entries = (o.logprobs or [])[done_tokens:len(o.token_ids)]
            logprobs = self._logprobs(new_ids, entries, base)
            if first and req.echo:
                logprobs = self._merge(self._prompt_logprobs(out), logprobs)
            offsets[key] = base + sum(len(self.ctx.token_text(t)) for t in new_ids)
        if not (text or finished or (logprobs and logprobs.tokens)):
            return None
        sent_text[key], sent_tokens[key] = max(end, start), len(o.token_ids)
        return {"index": key[0] * req.n + o.index, "text": text,
                "logprobs": logprobs.model_dump() if logprobs is not None else None,
                "finish_reason": o.finish_reason if finished else None,
                "stop_reason": o.stop_reason if finished else None}

    # ---- logprobs -----------------------------------------------------------------------------

    def _logprobs(self, token_ids: list[int], entries: list, offset: int) -> CompletionLogProbs:
        """OpenAI's completion logprobs of these tokens, text offsets counted from `offset`."""
        lp = CompletionLogProbs()
        for tid, entry in zip(token_ids, entries):
            token = self.ctx.token_text(tid)
            lp.tokens.append(token)
            lp.text_offset.append(offset)
            offset += len(token)
            if entry is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(clamp_logprob(entry[tid].logprob) if tid in entry else None)
            lp.top_logprobs.append({self.ctx.token_text(t): clamp_logprob(v.logprob) for t, v in entry.items()})
        return lp

    def _prompt_logprobs(self, out: RequestOutput) -> CompletionLogProbs:
        entries = list(out.prompt_logprobs or [])
        entries += [None] * (len(out.prompt_token_ids) - len(entries))
        return self._logprobs(out.prompt_token_ids, entries, 0)

    @staticmethod
    def _merge(a: CompletionLogProbs, b: CompletionLogProbs) -> CompletionLogProbs:
        return CompletionLogProbs(tokens=a.tokens + b.tokens, text_offset=a.text_offset + b.text_offset,
                                  token_logprobs=a.token_logprobs + b.token_logprobs,
                                  top_logprobs=a.top_logprobs + b.top_logprobs)

    def _vllm_prompt_logprobs(self, out: RequestOutput) -> list[dict[str, Any] | None]:
        """vLLM's `prompt_logprobs`: per prompt position, {token_id: {logprob, rank, decoded_token}}."""
        return [None if e is None else {
            str(t): {"logprob": clamp_logprob(v.logprob), "rank": v.rank, "decoded_token": self.ctx.token_text(t)}
            for t, v in e.items()} for e in (out.prompt_logprobs or [])]

