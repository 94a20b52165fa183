"""Engine objects <-> `tandem.proto` messages: sampling parameters, layouts, tickets, logprobs, first tokens."""
from __future__ import annotations

import json

from tandem.engine.kv_transfer.layout import LayoutDescriptor
from tandem.engine.sampler import Sample
from tandem.outputs import Logprob
from tandem.proto import common_pb2, decode_pb2
from tandem.sampling_params import SamplingParams

_OPTIONAL = ("seed", "max_tokens", "logprobs", "prompt_logprobs", "lora")
_PLAIN = ("n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p",
          "top_k", "min_p", "ignore_eos", "min_tokens", "include_stop_str_in_output", "skip_special_tokens",
          "spaces_between_special_tokens")
_LISTS = ("stop", "stop_token_ids", "bad_words")


def params_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(**{f: getattr(p, f) for f in _PLAIN + _LISTS})
    for f in _OPTIONAL:
        if getattr(p, f) is not None:
            setattr(msg, f, getattr(p, f))
    if p.structured_outputs is not None:
        msg.structured_outputs = json.dumps(p.structured_outputs)
    return msg


def params_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Validated again here: a worker does not trust its caller's checks."""
    values = {f: getattr(msg, f) for f in _PLAIN}
    values.update({f: list(getattr(msg, f)) for f in _LISTS})
    values.update({f: getattr(msg, f) if msg.HasField(f) else None for f in _OPTIONAL})
    if msg.HasField("structured_outputs"):
        values["structured_outputs"] = json.loads(msg.structured_outputs)
    return SamplingParams(**values)


def layout_to_proto(layout: LayoutDescriptor) -> common_pb2.LayoutDescriptor:
    return common_pb2.LayoutDescriptor(**layout.to_dict())


def layout_from_proto(msg: common_pb2.LayoutDescriptor) -> LayoutDescriptor:
    return LayoutDescriptor(**{f.name: getattr(msg, f.name) for f in common_pb2.LayoutDescriptor.DESCRIPTOR.fields})


def logprobs_to_proto(entry: dict[int, Logprob] | None) -> decode_pb2.TokenLogprobs:
    return decode_pb2.TokenLogprobs(entries=[decode_pb2.LogprobEntry(token_id=t, logprob=v.logprob, rank=v.rank or 0)
                                             for t, v in (entry or {}).items()])


def logprobs_from_proto(msg: decode_pb2.TokenLogprobs) -> dict[int, Logprob] | None:
    if not msg.entries:
        return None
    return {e.token_id: Logprob(e.logprob, e.rank or None) for e in msg.entries}


def first_token_to_proto(first: Sample | None) -> decode_pb2.FirstToken | None:
    if first is None:
        return None
    # logprob None (not wanted): proto's default 0.0, which the receiver's request then ignores too
    return decode_pb2.FirstToken(token_id=first.token_id, logprob=first.logprob or 0.0,
                                 top=logprobs_to_proto(first.top))


def first_token_from_proto(close: decode_pb2.TransferClose) -> Sample | None:
    if not close.HasField("first_token"):
        return None
    f = close.first_token
    return Sample(f.token_id, f.logprob, logprobs_from_proto(f.top))
