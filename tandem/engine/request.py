"""A request's state as the scheduler and runner see it.

One `Request` is one sequence. A prompt asked for `best_of > 1` samples becomes a `RequestGroup`:
its first sequence prefills the prompt; when that prompt's last token is computed, the group's
other sequences fork from it (sharing its KV blocks, copy-on-write) with their own first tokens.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from tandem.outputs import Logprob
from tandem.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    group: "RequestGroup"
    index: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    block_hashes: list[int] = field(default_factory=list)
    seed: int | None = None  # this sequence's sampling seed (None: unseeded)
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling; -1 until then
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    kv_only: bool = False  # prefill role: compute the KV of every token, update nothing
    sample_first_token: bool = False  # kv_only: also sample the first output token (it goes with the KV)
    num_ahead: int = 0  # placeholder tokens at the end of the token lists: still on the device (lookaheads.py)
    grammar: Any = None  # structured outputs: this sequence's xgrammar matcher (tandem/engine/structured.py)

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def pending_forks(self) -> list["Request"]:
        """Sequences to fork from this one at its first sample (only the group's first has any)."""
        if self.index == 0 and not self.output_token_ids and not self.group.forked:
            return self.group.seqs[1:]
        return []

    @property
    def seats(self) -> int:
        """The sequences it stands for in the batch: itself and the forks it will make (max_num_seqs counts
        these, as the workers' reports do)."""
        return 1 + len(self.pending_forks)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)


@dataclass(eq=False)
class RequestGroup:
    """All samples of one user request (n / best_of)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Request] = field(default_factory=list)
    forked: bool = False
    prompt_logprobs: list | None = None
    arrival_time: float = field(default_factory=time.monotonic)

    @classmethod
    def create(cls, request_id: str, prompt: str | None, prompt_token_ids: list[int],
               params: SamplingParams, arrival_time: float, priority: int = 0,
               seed_index: int = 0) -> "RequestGroup":
        """`seed_index`: the sample number of the first sequence, for a sequence continued alone."""
        group = cls(request_id, prompt, list(prompt_token_ids), params, arrival_time=arrival_time)
        for i in range(params.best_of):
            seed = None if params.seed is None else (params.seed * 1_000_003 + seed_index + i) % 2**63
            group.seqs.append(Request(
                seq_id=request_id if i == 0 else f"{request_id}#{i}", prompt_token_ids=group.prompt_token_ids,
                params=params, group=group, index=i, arrival_time=arrival_time, priority=priority, seed=seed))
        return group

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
