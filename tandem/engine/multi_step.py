"""Multi-step decoding: several greedy decode steps on the device per host round trip.

On a GPU the host's per-step work (scheduling, inputs, reading tokens back, stop checks) costs as much
as a decode step of a small model, and the device idles while it runs. When a step is plain decode,
the engine instead reserves KV slots `k` tokens ahead and the runner replays the decode CUDA graph `k`
times, feeding each step's argmax back as the next input on the device (cuda_graphs.run_greedy_steps).
The host then applies the k tokens of each request in order, exactly as k ordinary steps would; a
request that stops early drops the tokens after its stop, and the KV slots they were written into are
freed with it.

Prompt chunks the scheduler paced over the lookahead (the lof policy) ride along as prompt lanes
(prompt_lanes.py): rows after the decode rows, computed in the same graphed steps.

A step qualifies (`plan`) when: `num_scheduler_steps` > 1, decode graphs exist, nothing waits for
admission unless the step carries prompt lanes (then the scheduler paced admissions itself), no KV is
being sent (prefill role) or copied (copy-on-write), at least one row decodes, every decode row is one
token of a greedy request with no penalties, logprobs, bad words or LoRA adapter, prompt chunks fit the
lanes and want no prompt logprobs or adapter, and all rows fit the largest graph; requests still under min_tokens must share
their banned ids (EOS and stop ids). Anything else runs as an ordinary step.

The engine launches each lookahead before it reads the last one's tokens (lookaheads.py), so the
host's work between them (resolving, scheduling, packing inputs) runs while the device computes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tandem.engine import prompt_lanes
from tandem.engine.request import Request
from tandem.engine.scheduler import SchedulerOutput
from tandem.sampling_params import SamplingParams


@dataclass
class Lookahead:
    steps: int
    ban_ids: list[int]  # the EOS and stop ids banned before min_tokens (one set for every row)
    ban_steps: list[int]  # per decode row: how many of the steps still ban them
    decode: list[int] = field(default_factory=list)  # indices into the scheduled rows: the decode lanes
    # prompt lanes: (request, lanes = tokens per step, its computed tokens at the end of the lookahead)
    prompt: list[tuple[Request, int, int]] = field(default_factory=list)


def plain_greedy(p: SamplingParams) -> bool:
    return (p.greedy and p.logprobs is None and not p._bad_words_token_ids and p.repetition_penalty == 1.0
            and not p.frequency_penalty and not p.presence_penalty and p.structured_outputs is None and p.lora is None)


def plan(sched: SchedulerOutput, max_steps: int, max_model_len: int, max_rows: int,
         max_lanes: int = 0, max_mixed_rows: int = 0) -> Lookahead | None:
    """The lookahead for this step, or None for an ordinary step (KV slots are reserved by the caller).
    `max_rows`: the most rows a decode-only step's graph holds; `max_mixed_rows`: one with prompt lanes
    (decode-only graphs stop at the batch size; rows past it, n > 1 forks say, run as ordinary steps)."""
    if max_steps <= 1 or sched.block_copies or not sched.scheduled:
        return None
    ban_ids: frozenset[int] | None = None
    ban_steps: list[int] = []
    decode: list[int] = []
    chunks: list[tuple[Request, int]] = []  # (request, prompt tokens to compute in the lookahead)
    most_left = 0
    longest = 0
    for i, s in enumerate(sched.scheduled):
        r: Request = s.request
        n = len(r.all_token_ids)
        if r.kv_only or r.pending_forks:
            return None
        if r.num_computed_tokens + 1 < n:  # a prompt chunk: its tokens short of the last become lanes
            if sched.prompt_steps <= 1 or r.params.prompt_logprobs is not None or r.params.lora is not None:
                return None
            chunks.append((r, min(s.num_new_tokens, n - 1 - r.num_computed_tokens)))
            continue
        p = r.params
        if s.num_new_tokens != 1 or not plain_greedy(p):
            return None
        out = len(r.output_token_ids)
        ban = max(0, p.min_tokens - out)
        if ban:
            ids = frozenset(p.stop_token_ids) | frozenset(p._eos_token_ids)
            if ban_ids is not None and ids != ban_ids:
                return None
            ban_ids = ids
        decode.append(i)
        ban_steps.append(ban)
        most_left = max(most_left, p.max_tokens - out)
        longest = max(longest, n)
    steps = min(max_steps, most_left, max_model_len - longest)
    if not decode or steps <= 1:
        return None
    prompt = [(r, -(-t // steps), r.num_computed_tokens + t) for r, t in chunks]
    lanes = sum(c for _, c, _ in prompt)
    if lanes > max_lanes or len(prompt) > prompt_lanes.MAX_SEQS \
            or len(decode) + lanes > (max_mixed_rows if prompt else max_rows):
        return None
    return Lookahead(steps, sorted(ban_ids or ()), ban_steps, decode, prompt)

