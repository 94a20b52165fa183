"""What the engine returns: vLLM's RequestOutput / CompletionOutput shape."""
from __future__ import annotations

from dataclasses import dataclass, field

# position -> {token_id: Logprob}
SampleLogprobs = list[dict[int, "Logprob"]]
PromptLogprobs = list[dict[int, "Logprob"] | None]


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(0.0))
    num_cached_tokens: int = 0


@dataclass
class EngineStats:
    """The numbers behind /metrics and a worker's reports (a snapshot; counters are cumulative). The colocated
    engine fills every field; a router's view of its decode workers, the ones they report."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_free_blocks: int = 0
    num_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_lookahead_steps: int = 0  # decode steps run on the device ahead of the host (multi_step.py)
    num_chained_lookaheads: int = 0  # lookaheads launched before the host applied the previous one
    num_lookahead_prompt_tokens: int = 0  # prompt tokens computed in lookaheads' prompt lanes
    # LoRA: the adapters loaded, and those the running and the waiting requests run under
    max_loras: int = 0
    running_loras: tuple[str, ...] = ()
    waiting_loras: tuple[str, ...] = ()
