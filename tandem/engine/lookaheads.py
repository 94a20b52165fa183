"""The engine's multi-step lookaheads (multi_step.py), scheduled one ahead of the host: a part of
LLMEngine, kept apart from its loop. It uses the engine's `runner`, `scheduler`, `kv`, `config` and
`_append`.

A lookahead's lifecycle across `step()` calls:
  launched  -- `_launch` reserves its KV slots and queues its steps on the device; the call returns
               (after resolving the lookahead before it, if any) while the device computes.
  applied   -- the next `step()` first applies it optimistically (`_apply`): each decode row takes
               placeholder tokens for the steps it will keep (as if no row stops early; a row that
               reaches its length limit leaves `running`), prompt lanes count as computed. The
               scheduler then plans the next step on that state, and a next lookahead is launched
               before this one's tokens are read: its rows that continue take their first input from
               this lookahead's last tokens on the device (`prev`), so the device never waits for the
               host.
  resolved  -- `_resolve` reads the tokens and puts them in place of the placeholders, with every
               stop check an ordinary step makes. A row that stopped early (EOS, a stop string) leaves
               the next lookahead's rows for it computed for nothing; they are dropped when that one
               resolves, and the slots they wrote are freed with the request (the device writes them
               before any later step can reuse them).

Placeholders live only inside one `step()` call, between `_apply` and `_resolve`, and never reach the
prefix cache (`Request.num_ahead`). When the step planned on the optimistic state is not a lookahead,
the engine resolves first and then runs it as an ordinary step, minus the requests that stopped.
"""
from __future__ import annotations

import time

from tandem.engine import multi_step
from tandem.engine.request import Request, Status
from tandem.engine.scheduler import SchedulerOutput

PLACEHOLDER = -1  # a token still on the device (an embedding lookup of it fails loudly on CPUs)


class Lookaheads:
    def _lookahead(self, sched: SchedulerOutput) -> multi_step.Lookahead | None:
        """Multi-step decoding for this step (multi_step.py), its KV slots reserved; None: an ordinary step."""
        graphs = self.runner.graphs
        if graphs is None or self.producer is not None:
            return None
        ahead = multi_step.plan(sched, self.config.scheduler.num_scheduler_steps, self.max_model_len,
                                graphs.max_decode_rows, graphs.max_lanes, graphs.max_mixed_rows)
        if ahead is None or (self.scheduler.waiting and not ahead.prompt):
            return None
        # blocks reserved before a failure stay with their requests: they are used next
        if not all(self.kv.allocate(sched.scheduled[i].request, ahead.steps, publish=False) for i in ahead.decode):
            return None
        if not all(self.kv.allocate(r, end - r.num_computed_tokens, publish=False) for r, _, end in ahead.prompt):
            return None
        return ahead

    def _launch(self, sched: SchedulerOutput, ahead: multi_step.Lookahead, prev: tuple | None) -> tuple:
        """Queues the lookahead on the device; returns it in flight: (decode rows, lookahead, tokens).
        `prev`: the lookahead in flight before it, whose rows' last tokens feed rows that continue."""
        rows = SchedulerOutput([sched.scheduled[i] for i in ahead.decode])
        feed = None
        if prev is not None:
            row_of = {s.request: j for j, s in enumerate(prev[0].scheduled)}
            pairs = [(i, row_of[s.request]) for i, s in enumerate(rows.scheduled) if s.request.num_ahead]
            if pairs:
                feed = (prev[2], [i for i, _ in pairs], [j for _, j in pairs])
            self.num_chained_lookaheads += 1
        self.num_lookahead_steps += ahead.steps
        return rows, ahead, self.runner.launch_greedy_steps(rows, self.kv.tables, ahead, feed)

    def _apply(self, inflight: tuple) -> None:
        """The lookahead in flight, taken as if every row keeps all of its tokens (see the docstring)."""
        rows, ahead, _ = inflight
        for req, _, end in ahead.prompt:
            if not req.finished:  # aborted meanwhile: its blocks are gone already
                self.num_lookahead_prompt_tokens += end - req.num_computed_tokens
                req.num_computed_tokens = end
                self.kv.publish(req, end)
        for s in rows.scheduled:
            req = s.request
            if req.finished:
                continue
            p = req.params
            held = min(ahead.steps, p.max_tokens - len(req.output_token_ids), self.max_model_len - req.num_tokens)
            req.output_token_ids.extend([PLACEHOLDER] * held)
            req.all_token_ids.extend([PLACEHOLDER] * held)
            req.num_ahead = held
            req.num_computed_tokens += held
            if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
                self.scheduler.done_scheduling(req)  # it stops in this lookahead at the latest

    def _resolve(self, inflight: tuple, touched: dict) -> None:
        """Waits for the lookahead's tokens and applies each row's in order, as that many ordinary steps
        would, in place of its placeholders."""
        rows, ahead, pending = inflight
        tokens, logprobs = pending.result()
        now = time.monotonic()
        for s, toks, lps in zip(rows.scheduled, tokens, logprobs):
            req: Request = s.request
            if req.finished:  # aborted, or stopped in the lookahead before this one
                continue
            held, req.num_ahead = req.num_ahead, 0
            if held:
                del req.output_token_ids[-held:]
                del req.all_token_ids[-held:]
            counted = req.status is Status.RUNNING  # preempted meanwhile: it recomputes from zero
            if counted:
                req.num_computed_tokens -= held
            taken = self._append(req, toks, lps, None, now)
            if counted:
                req.num_computed_tokens += taken
                if not req.finished:
                    self.kv.publish(req, req.num_computed_tokens)
            touched[req.group.request_id] = req.group
