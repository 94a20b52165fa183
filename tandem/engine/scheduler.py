"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

There is no prefill phase and no decode phase: each step every scheduled request computes
`num_new_tokens` more of its tokens (a prompt chunk, or the one token sampled last step), so
chunked prefill and prefix hits need no special mode.

Queues and lifecycle:
  waiting  -- add() puts new requests here (fcfs: arrival order; priority: (priority, arrival);
              lof: the most tokens left to generate first, then arrival).
              A request whose prompt KV came from another worker (see kv_transfer) arrives
              holding its blocks, with all but its last prompt token computed.
  running  -- schedule() admits waiting requests while the token budget, max_num_seqs (sequences:
              a request's n > 1 samples count from admission) and free blocks allow; with max_loras, a
              request under an adapter the running ones do not use waits while they use max_loras
              adapters (requests behind it may pass it). A running
              request that cannot get a block preempts the lowest-ranked running request: its blocks
              are freed, its computed tokens reset to zero (recompute), and it goes back to the front
              of waiting. Under lof the prompt tokens of a step (chunks of running requests, then
              admissions) are also held to pacing.prompt_allowance.
              A request whose last tokens are still on the device (a lookahead in flight, lookaheads.py)
              leaves running early through done_scheduling(): nothing more to schedule, blocks still held.
  finished -- finish() frees the blocks at once and drops the request from both queues.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from tandem.config import SchedulerConfig
from tandem.engine import pacing
from tandem.engine.kv_cache.manager import KVCacheManager
from tandem.engine.request import Request, Status


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """This step computes the request's last known token, so the step yields a new token."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    prompt_steps: int = 1  # the steps its prompt chunks are paced over (lof with lookaheads: multi_step.py)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 lookahead_steps: int = 1) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.lookahead_steps = lookahead_steps  # the engine's multi-step depth (lof paces per lookahead)
        self._rank = self._rank_key(config.policy)

    @staticmethod
    def _rank_key(policy: str):
        """The policy's sort key: lof ranks by tokens left to generate, largest first (inlined: it runs
        for every request at every step)."""
        if policy == "priority":
            return lambda r: (r.priority, r.arrival_time, r.seq_id)
        if policy == "lof":
            return lambda r: (len(r.output_token_ids) - r.params.max_tokens, r.arrival_time, r.seq_id)
        return lambda r: (r.arrival_time, r.seq_id)

    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)
        self.waiting.sort(key=self._rank)

    def add_running(self, req: Request) -> None:
        """A sequence forked from a running one: it shares the parent's blocks already."""
        req.status = Status.RUNNING
        self.running.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=self._rank)
        prompt_budget = budget  # prompt tokens (chunks and admissions) this step may compute
        if self.config.policy == "lof":
            per_step = pacing.prompt_allowance(self.running, self.waiting, budget)
            prompt_budget = min(budget, per_step * self.lookahead_steps)
            out.prompt_steps = self.lookahead_steps
        kept: list[Request] = []
        queue = self.running
        head, tail = 0, len(queue)  # queue[head:tail]: not yet scheduled; victims leave from the tail
        while head < tail and budget > 0:
            req = queue[head]
            head += 1
            num_new = min(len(req.all_token_ids) - req.num_computed_tokens, budget)
            if num_new > 1:  # a prompt chunk
                num_new = min(num_new, prompt_budget)
                if num_new < 1:
                    kept.append(req)
                    continue
                prompt_budget -= num_new
            while not self.kv.allocate(req, num_new):
                victim = queue[tail - 1] if head < tail else req
                tail -= victim is not req
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                kept.append(req)
                out.scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new
        kept.extend(queue[head:tail])  # not scheduled this step (no budget left) but still running
        self.running = kept
        if not out.preempted:  # admitting new work while preempting would thrash
            self._admit(out, min(budget, prompt_budget))
        out.block_copies = self.kv.take_copies()
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        if not self.waiting:
            return budget
        # max_num_seqs counts sequences, as vLLM's does: a request's n > 1 samples fork from it at its first
        # token and run beside it, so its seats are held from admission (one request always fits)
        seats = self.config.max_num_seqs - sum(r.seats for r in self.running)
        limit = self.config.max_loras
        loras = set() if limit is None else {r.params.lora for r in self.running if r.params.lora is not None}
        i = 0
        while i < len(self.waiting) and budget > 0:
            req = self.waiting[i]
            lora = req.params.lora
            if limit is not None and lora is not None and lora not in loras and len(loras) >= limit:
                i += 1  # its adapter waits for a slot; requests behind it may run (vLLM's rule)
                continue
            need = req.seats
            if need > seats and self.running:
                break
            if self.kv.has_table(req):  # KV loaded from another worker: its blocks are held already
                prefix, cached = [], req.num_computed_tokens
            else:
                prefix = self.kv.computed_prefix(req)
                cached = len(prefix) * self.kv.block_size
            num_new = req.num_tokens - cached
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate(req, num_new, prefix):
                break
            self.waiting.pop(i)
            if lora is not None:
                loras.add(lora)
            req.num_computed_tokens = cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = cached
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            req.status = Status.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
            seats -= need
        return budget

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = Status.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(req)
        self.waiting.insert(0, req)
        self.waiting.sort(key=self._rank)

    def done_scheduling(self, req: Request) -> None:
        """A running request with nothing left to schedule; finish() ends it once its last tokens are read."""
        self.running.remove(req)

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        if req.finished:
            return
        req.status = Status.FINISHED
        req.finish_reason, req.stop_reason = reason, stop_reason
        self.kv.free(req)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
