"""How the router routes: thresholds, timeouts, retries and plugin weights."""
from __future__ import annotations

from dataclasses import dataclass, field

from tandem.router.plugins import DECODE_DEFAULTS, PREFILL_DEFAULTS


@dataclass
class RouterConfig:
    local_prefill_threshold: int = 128  # uncached prompt tokens below this are prefilled on decode
    lease_seconds: float = 30.0  # how long decode holds blocks for a remote prefill
    ticket_timeout: float = 10.0  # decode's answer (lease or local) to a remote-prefill request
    prefill_timeout: float = 60.0  # one remote prefill, compute and transfer
    prefill_attempts: int = 2  # prefill workers tried before decode prefills itself
    decode_attempts: int = 3  # decode workers tried (resuming) before the request fails
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 2.0  # a worker silent this long leaves the pool
    kv_store: str = ""  # the prefix KV store whose events count in prefix scoring and the prefill decision
    decode_filters: list[str] = field(default_factory=lambda: ["fits", "adapter"])
    decode_scorers: dict[str, float] = field(default_factory=lambda: dict(DECODE_DEFAULTS))
    prefill_filters: list[str] = field(default_factory=lambda: ["compatible", "adapter"])
    prefill_scorers: dict[str, float] = field(default_factory=lambda: dict(PREFILL_DEFAULTS))

    def __post_init__(self) -> None:
        if self.local_prefill_threshold < 0:
            raise ValueError("local_prefill_threshold must be >= 0")
        for name in ("lease_seconds", "ticket_timeout", "prefill_timeout", "heartbeat_interval", "heartbeat_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.prefill_attempts < 0 or self.decode_attempts < 1:
            raise ValueError("prefill_attempts must be >= 0 and decode_attempts >= 1")
