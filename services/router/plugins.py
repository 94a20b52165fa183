"""Routing policy as plugins, llm-d style: filters drop workers that cannot serve a request,
scorers rate each remaining worker in [0, 1], a profile sums the weighted scores and picks the
best. One profile picks the decode worker, another the prefill worker (among those whose KV
layout matches that decode worker's). Weights come from the router's configuration. Prefix scoring
counts the blocks a worker's cache holds (its events) and, at a discount, those it would load from
the prefix KV store (the store's events, store_index.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Container

from tandem.engine.kv_cache.block_hash import chain_seed, common_prefix_blocks, hash_blocks
from tandem.router.pool import Worker
from tandem.router.store_index import StoreIndex


# A block the worker loads from the KV store is worth this much of one in its own cache: it skips the compute
# but crosses the network and waits for its turn on the engine thread.
STORE_BLOCK_WORTH = 0.5


@dataclass
class RoutingRequest:
    prompt_token_ids: list[int]
    max_tokens: int = 0
    decode: Worker | None = None  # set when picking a prefill worker for this decode worker
    lora: str | None = None  # the LoRA adapter the request runs under
    store: StoreIndex | None = None  # what the prefix KV store holds, when the router follows one
    _hashes: dict[tuple[int, str], list[int]] = field(default_factory=dict)

    def block_hashes(self, block_size: int, seed: str) -> list[int]:
        key = (block_size, seed)
        if key not in self._hashes:
            self._hashes[key] = hash_blocks(self.prompt_token_ids, block_size, seed)
        return self._hashes[key]

    def _prefix_tokens(self, w: Worker, held: Container[int]) -> int:
        """Leading prompt tokens whose blocks are in `held`, hashed as `w` keys them under the request's adapter."""
        bs = w.info.layout.block_size or 16
        if self.lora is not None and self.lora not in w.info.lora_keys:
            return 0
        seed = chain_seed(w.info.kv_hash_seed, None if self.lora is None else w.info.lora_keys[self.lora])
        return common_prefix_blocks(self.block_hashes(bs, seed), held) * bs

    def cached_tokens(self, w: Worker) -> int:
        """Prompt tokens the worker's prefix cache holds (leading full blocks, as its events say)."""
        return self._prefix_tokens(w, w.cached)

    def store_tokens(self, w: Worker) -> int:
        """Prompt tokens the worker can load from the KV store (as the store's events say): 0 unless it loads
        from the store the router follows."""
        if self.store is None or not self.store.serves(w.info.kv_store):
            return 0
        return self._prefix_tokens(w, self.store.held(w.compat_hash))

    def reusable_tokens(self, w: Worker) -> int:
        """Prompt tokens the worker need not compute: cached there, or loaded from the store."""
        return max(self.cached_tokens(w), self.store_tokens(w))


Filter = Callable[[RoutingRequest, list[Worker]], list[Worker]]
Scorer = Callable[[RoutingRequest, Worker], float]


def compatible(req: RoutingRequest, workers: list[Worker]) -> list[Worker]:
    """Prefill: only workers whose KV layout (compat hash) equals the decode worker's."""
    if req.decode is None:
        return workers
    return [w for w in workers if w.compat_hash == req.decode.compat_hash]


def fits(req: RoutingRequest, workers: list[Worker]) -> list[Worker]:
    """Decode: only workers whose context is long enough for prompt plus output."""
    need = len(req.prompt_token_ids) + req.max_tokens
    return [w for w in workers if w.info.max_model_len >= need]


def adapter(req: RoutingRequest, workers: list[Worker]) -> list[Worker]:
    """Only workers that serve the request's LoRA adapter (all of them for the base model)."""
    if req.lora is None:
        return workers
    return [w for w in workers if req.lora in w.info.loras]


def kv_free(req: RoutingRequest, w: Worker) -> float:
    """Free KV blocks in the last report, less the prompts the router sent here since (each prompt once,
    however many samples share it; those sent before the report are in it already)."""
    total = w.load.num_blocks or 1
    return min(1.0, max(0.0, (w.load.num_free_blocks - w.blocks_since_report) / total))


def load(req: RoutingRequest, w: Worker) -> float:
    busy = w.reported_busy(w.load.num_running + w.load.num_waiting + w.load.num_leases) + w.in_flight
    return 1.0 / (1.0 + busy)


def queue(req: RoutingRequest, w: Worker) -> float:
    return 1.0 / (1.0 + w.reported_busy(w.load.num_prefilling) + w.in_flight)


def prefix(req: RoutingRequest, w: Worker) -> float:
    """The prompt's share the worker holds, the part it would load from the KV store at STORE_BLOCK_WORTH."""
    cached = req.cached_tokens(w)
    loaded = max(0, req.store_tokens(w) - cached)
    return (cached + STORE_BLOCK_WORTH * loaded) / max(1, len(req.prompt_token_ids))


FILTERS: dict[str, Filter] = {"adapter": adapter, "compatible": compatible, "fits": fits}
SCORERS: dict[str, Scorer] = {"kv_free": kv_free, "load": load, "queue": queue, "prefix": prefix}
DECODE_DEFAULTS = {"kv_free": 1.0, "load": 1.0, "prefix": 1.0}
PREFILL_DEFAULTS = {"prefix": 1.0, "queue": 1.0}


@dataclass
class Profile:
    filters: list[str]
    weights: dict[str, float]
    _turn: int = 0  # rotates ties, so equally good workers take turns

    def __post_init__(self) -> None:
        unknown = [n for n in self.filters if n not in FILTERS] + [n for n in self.weights if n not in SCORERS]
        if unknown:
            raise ValueError(f"unknown routing plugins {unknown}; filters: {sorted(FILTERS)}, "
                             f"scorers: {sorted(SCORERS)}")

    def scores(self, req: RoutingRequest, workers: list[Worker]) -> dict[Worker, float]:
        for name in self.filters:
            workers = FILTERS[name](req, workers)
        return {w: sum(weight * SCORERS[name](req, w) for name, weight in self.weights.items()) for w in workers}

    def pick(self, req: RoutingRequest, workers: list[Worker]) -> Worker | None:
        """The best-scoring worker; among equals, the fewest requests in flight, then the workers
        take turns in id order (deterministic: a replayed workload routes the same way)."""
        scored = self.scores(req, workers)
        if not scored:
            return None
        best = min((-round(v, 9), w.in_flight) for w, v in scored.items())
        tied = sorted((w for w, v in scored.items() if (-round(v, 9), w.in_flight) == best), key=lambda w: w.worker_id)
        self._turn += 1
        return tied[(self._turn - 1) % len(tied)]


def parse_weights(spec: str | dict | None, defaults: dict[str, float]) -> dict[str, float]:
    """'kv_free=1,load=2' (or a mapping, from a config file) to weights; None: the defaults."""
    if spec is None:
        return dict(defaults)
    if isinstance(spec, dict):
        return {str(k): float(v) for k, v in spec.items()}
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, weight = item.partition("=")
        out[name.strip()] = float(weight or 1.0)
    return out
