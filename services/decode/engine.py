"""DecodeEngine: the colocated engine host (AsyncEngine) plus the consumer role's commands.

A remote-prefill request's stream yields a `LeaseGranted` event first (or `PrefillingLocally`
when no blocks are free, which the router reads as a local prefill), then outputs once its KV
is in. Leases that pass their deadline end the request with `LeaseExpired`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from tandem.config import EngineConfig
from tandem.sampling_params import SamplingParams
from tandem.server.engine_client import AsyncEngine, EngineError


@dataclass(frozen=True)
class LeaseGranted:
    lease_id: str
    block_ids: tuple[int, ...]
    skip_tokens: int
    num_tokens: int
    lease_seconds: float
    shm_path: str = ""  # the lease's shared-memory staging area (same-host transfers), if any
    shm_bytes: int = 0


@dataclass(frozen=True)
class PrefillingLocally:
    reason: str


class LeaseExpired(EngineError):
    """The request's KV did not arrive before its lease's deadline; its blocks are free again."""


class DecodeEngine(AsyncEngine):
    def __init__(self, config: EngineConfig, model_name: str | None = None, *, engine: Any = None) -> None:
        super().__init__(config, model_name, engine=engine)
        self.engine.consumer.on_complete = self._wake.set  # a finished transfer admits its request now

    def generate_remote(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                        priority: int = 0, *, lease_seconds: float = 30.0, resume_token_ids: list[int] = (),
                        seed_index: int = 0) -> AsyncIterator[Any]:
        ids = self.check(request_id, prompt_token_ids, params, resume_token_ids)
        return self.open_stream(request_id, ("add_remote", request_id, ids, params, priority, time.monotonic(),
                                             lease_seconds, tuple(resume_token_ids), seed_index))

    def prefill_locally(self, request_id: str) -> None:
        self._submit(("prefill_locally", request_id))

    @property
    def num_leases(self) -> int:
        """Sequences waiting for their KV, as the engine counts running and waiting ones (a snapshot: the
        engine thread changes the leases meanwhile)."""
        return sum(lease.request.seats for lease in list(self.engine.consumer.leases.values()))

    # ---- engine thread ------------------------------------------------------------------------

    def _cmd_add_remote(self, rid: str, ids: list[int], params: SamplingParams, priority: int, arrival: float,
                        lease_seconds: float, resume: tuple[int, ...], seed_index: int) -> None:
        if rid not in self._streams:
            return
        lease = self.engine.add_remote_request(rid, ids, params, priority, arrival, lease_seconds=lease_seconds,
                                               resume_token_ids=list(resume), seed_index=seed_index)
        if lease is None:
            self._deliver(rid, PrefillingLocally("no free KV blocks for a lease"))
        else:
            staging = lease.staging
            self._deliver(rid, LeaseGranted(lease.lease_id, tuple(lease.block_ids), lease.skip_tokens,
                                            lease.num_tokens, lease_seconds, staging.path if staging else "",
                                            lease.staging_bytes if staging else 0))

    def _cmd_prefill_locally(self, rid: str) -> None:
        self.engine.prefill_locally(rid)

    def _tick(self) -> None:
        for rid in self.engine.expired_leases():
            self.engine.abort_request(rid)
            self._deliver(rid, LeaseExpired(f"request {rid}: its KV did not arrive before the lease expired"))

    def _idle_timeout(self) -> float | None:
        deadline = self.engine.consumer.next_deadline()
        return None if deadline is None else max(0.0, deadline - time.monotonic()) + 0.001

