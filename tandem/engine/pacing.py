"""Deadline pacing of prompt work: the "lof" (longest output first) scheduling policy's budget.

An offline batch ends when its longest request does. Under FCFS with a large token budget every prompt
is computed first, and the batch then decodes a long tail of steps at a shrinking batch size, each step
a full read of the weights for a handful of tokens. "lof" admits the largest remaining max_tokens first
and gives each step only as many prompt tokens as keep every unfinished prompt able to end with the
longest running request: the prompt work moves into the decode steps, meant to ride on steps bound by
the weight read (bench/sched_sim.py models it). On the H200 it is not yet faster than FCFS: the paced
steps' attention costs more than the prompt work saves there (README, bench/results/trace-8b-W2-*).

It plans with max_tokens, an upper bound: a request that stops early leaves slack behind, and a prompt
with no slack (its request would outlast every running one) gets the whole budget, as under FCFS. For
interactive traffic the pacing delays first tokens: it is for offline batches, like SGLang's "lof".
"""
from __future__ import annotations

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
    longest running request's; the largest such rate, at most `budget`."""
    longest = max((output_left(r) for r in running), default=0)
    pending = 0
    need = 0.0
    for req in [r for r in running if prompt_left(r) > 0] + waiting:
        pending += prompt_left(req) + 1
        slack = longest - output_left(req)
        if slack <= 0 or req.kv_only:  # kv_only (prefill role): it decodes elsewhere, nothing to overlap
            return budget
        need = max(need, pending / slack)
    return min(budget, int(need) + 1)
