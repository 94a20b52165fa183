"""Deadline pacing of prompt work: the "lof" (longest output first) scheduling policy's budget.

An offline batch ends when its longest request does. Under FCFS with a large token budget every prompt
is computed first, and the batch then decodes a long tail of steps at a shrinking batch size, each step
a full read of the weights for a handful of tokens. "lof" admits the largest remaining max_tokens first
and gives each step only as many prompt tokens as keep every unfinished prompt able to end with the
longest request: the prompt work moves into the decode steps, meant to ride on steps bound by
the weight read (bench/sched_sim.py models it). On the H200, 8B W2 ran 6,011 out tok/s under lof against
5,479 under FCFS (README, bench/results/trace-8b-W2-*).

It plans with max_tokens, an upper bound: a request that stops early leaves slack behind. The horizon
is the longest request running or waiting; a prompt with no slack (its request sets the horizon) is
computed at once with every prompt ahead of it, so the first step of a batch computes only the longest
requests' prompts and every other prompt rides the decode steps (a bulk first step cost the H200 ~23 us
a prompt token, a lane ~14). For interactive traffic the pacing delays first tokens: it is for offline
batches, like SGLang's "lof".
"""
from __future__ import annotations

import itertools
import math

from tandem.engine.request import Request


def output_left(req: Request) -> int:
    """Tokens the request may still generate."""
    return req.params.max_tokens - len(req.output_token_ids)


def prompt_left(req: Request) -> int:
    """Tokens to compute before the request decodes (its prompt, or all it had after a preemption)."""
    return max(0, req.num_tokens - 1 - req.num_computed_tokens)


def prompt_allowance(running: list[Request], waiting: list[Request], budget: int) -> int:
    """Prompt tokens this step may compute: for each unfinished prompt, in admission order, the prompt
    tokens up to and including its own, spread over the steps between its last output token and the
    longest request's (running or waiting; none between: this step); the largest such rate, at most
    `budget`."""
    # over every request at every step: output_left inlined here
    longest = max((r.params.max_tokens - len(r.output_token_ids) for r in itertools.chain(running, waiting)),
                  default=0)
    pending = 0
    need = 0.0
    for req in itertools.chain((r for r in running if prompt_left(r) > 0), waiting):
        if req.kv_only:  # prefill role: it decodes elsewhere, nothing to overlap
            return budget
        pending += prompt_left(req) + 1
        need = max(need, pending / max(1, longest - output_left(req)))
    return min(budget, max(1, math.ceil(need)))
