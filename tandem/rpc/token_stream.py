"""The two ends of a request's token stream between a decode worker and the router.

`DeltaEncoder` (decode side) turns the engine's cumulative RequestOutputs into TokenUpdates
that carry only what changed: per sequence, the tokens from `token_start` and the text from
`text_start` replace what the router had (text can shrink when a stop string is cut).
A finished update carries every sequence of the final output (a finished sequence is always resent).
`OutputAssembler` (router side) applies them and rebuilds cumulative RequestOutputs, so the
OpenAI layer cannot tell a remote engine from a local one. A sequence resumed on another decode
worker continues where the assembler stands: the new worker's first delta starts past the
tokens it was given.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from tandem.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tandem.proto import decode_pb2
from tandem.rpc.convert import logprobs_from_proto, logprobs_to_proto


class DeltaEncoder:
    def __init__(self, resumed_tokens: list[int] = (), resumed_text: str = "") -> None:
        # a resumed sequence: the router has these tokens and their text already
        self._tokens: dict[int, list[int]] = {0: list(resumed_tokens)} if resumed_tokens else {}
        self._text: dict[int, str] = {0: resumed_text} if resumed_tokens else {}
        self._prompt_logprobs_sent = False

    def encode(self, out: RequestOutput) -> decode_pb2.TokenUpdate:
        update = decode_pb2.TokenUpdate(finished=out.finished)
        for o in out.outputs:
            old_tokens, old_text = self._tokens.get(o.index, []), self._text.get(o.index, "")
            n = len(old_tokens)
            token_start = n if o.token_ids[:n] == old_tokens else 0
            text_start = len(old_text) if o.text.startswith(old_text) else len(os.path.commonprefix([old_text, o.text]))
            if o.index in self._tokens and token_start == len(o.token_ids) and text_start == len(o.text) \
                    and o.finish_reason is None:
                continue
            delta = decode_pb2.SeqDelta(
                index=o.index, token_start=token_start, token_ids=o.token_ids[token_start:],
                text_start=text_start, text=o.text[text_start:],
                cumulative_logprob=o.cumulative_logprob or 0.0, finish_reason=o.finish_reason or "")
            if o.logprobs is not None:
                delta.logprobs.extend(logprobs_to_proto(e) for e in o.logprobs[token_start:len(o.token_ids)])
            if isinstance(o.stop_reason, str):
                delta.stop_str = o.stop_reason
            elif isinstance(o.stop_reason, int):
                delta.stop_token = o.stop_reason
            update.seqs.append(delta)
            self._tokens[o.index], self._text[o.index] = list(o.token_ids), o.text
        if out.prompt_logprobs is not None and not self._prompt_logprobs_sent:
            update.prompt_logprobs.extend(logprobs_to_proto(e) for e in out.prompt_logprobs)
            self._prompt_logprobs_sent = True
        m = out.metrics
        if m is not None:
            update.metrics.num_cached_tokens = out.num_cached_tokens
            update.metrics.num_preemptions = m.num_preemptions
            if m.first_scheduled_time and m.arrival_time:
                update.metrics.queue_s = max(m.first_scheduled_time - m.arrival_time, 0.0)
        return update


@dataclass
class _Seq:
    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob] | None] | None = None
    text: str = ""
    cumulative_logprob: float = 0.0
    base_logprob: float = 0.0  # what a worker that failed had accumulated (resumed sequences)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class OutputAssembler:
    def __init__(self, request_id: str, prompt_token_ids: list[int], arrival_time: float,
                 want_logprobs: bool) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.arrival_time = arrival_time
        self.want_logprobs = want_logprobs
        self.seqs: dict[int, _Seq] = {}
        self.prompt_logprobs: list | None = None
        self.finished = False
        self.metrics = RequestMetrics(arrival_time)
        self.num_cached_tokens = 0

    def apply(self, update: decode_pb2.TokenUpdate) -> RequestOutput:
        for d in update.seqs:
            seq = self.seqs.get(d.index)
            if seq is None:
                seq = self.seqs[d.index] = _Seq(d.index, logprobs=[] if self.want_logprobs else None)
            del seq.token_ids[d.token_start:]
            seq.token_ids.extend(d.token_ids)
            if seq.logprobs is not None:
                del seq.logprobs[d.token_start:]
                seq.logprobs.extend(logprobs_from_proto(e) or {} for e in d.logprobs)
            seq.text = seq.text[:d.text_start] + d.text
            seq.cumulative_logprob = seq.base_logprob + d.cumulative_logprob
            seq.finish_reason = d.finish_reason or None
            kind = d.WhichOneof("stop_reason")
            seq.stop_reason = getattr(d, kind) if kind else None
        if update.finished:
            # the final update lists every sequence the request returns; with best_of > n the engine keeps
            # the best n, renumbered from 0, and the others it streamed while running are dropped here
            kept = {d.index for d in update.seqs}
            self.seqs = {i: s for i, s in self.seqs.items() if i in kept}
        if update.prompt_logprobs:
            self.prompt_logprobs = [logprobs_from_proto(e) for e in update.prompt_logprobs]
        now = time.monotonic()
        if self.metrics.first_token_time is None and any(s.token_ids for s in self.seqs.values()):
            self.metrics.first_token_time = now
            self.metrics.first_scheduled_time = self.arrival_time + update.metrics.queue_s
        self.metrics.last_token_time = now
        self.metrics.num_preemptions = update.metrics.num_preemptions
        self.num_cached_tokens = update.metrics.num_cached_tokens
        self.finished = update.finished
        if self.finished:
            self.metrics.finished_time = now
        return self.output()

    def resume_point(self) -> list[int]:
        """The single sequence's tokens so far, for another worker to continue after; the
        cumulative logprob it reached becomes the base the new worker's values add to."""
        seq = self.seqs.get(0)
        if seq is None:
            return []
        seq.base_logprob = seq.cumulative_logprob
        return list(seq.token_ids)

    def output(self) -> RequestOutput:
        outs = [CompletionOutput(index=s.index, text=s.text, token_ids=list(s.token_ids),
                                 cumulative_logprob=s.cumulative_logprob,
                                 logprobs=list(s.logprobs) if s.logprobs is not None else None,
                                 finish_reason=s.finish_reason, stop_reason=s.stop_reason)
                for _, s in sorted(self.seqs.items())]
        return RequestOutput(self.request_id, None, self.prompt_token_ids, self.prompt_logprobs, outs,
                             self.finished, self.metrics, self.num_cached_tokens)
