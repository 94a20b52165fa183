"""The producer role (prefill): send a prompt's KV, layer by layer as the forward pass makes it or
each step's after its forward pass (`layerwise`, `stream_layerwise`).

Lifecycle of one transfer: `attach` (the request is added, with the sink a transport gave and the
first token the consumer lacks) -> every step, `plan` (scheduler side) picks the token range the
step completes that is not sent yet, and `save_layer` (worker side, called by attention right
after it wrote that layer's K and V; or `save_step` for every layer once the forward pass ended)
encodes the range into chunks for the sink -> `step_done` advances the transfer and calls
`sink.finish(first)` once every wanted token went out, with the first output token when the
request samples one (`Request.sample_first_token`: the step that computes the last prompt token
samples it) -> `detach` on abort. A preempted request recomputes
its prompt; tokens already sent are not sent again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tandem.engine.kv_transfer import codec
from tandem.engine.kv_transfer.codec import KVChunkData
from tandem.engine.kv_transfer.layout import LayoutDescriptor
from tandem.engine.request import Request
from tandem.engine.sampler import Sample


class KVSink(Protocol):
    """Where a transfer's chunks go (a transport). Called on the engine thread: must not block."""

    def put(self, chunk: KVChunkData) -> None: ...

    def finish(self, first: Sample | None = None) -> None:
        """Every chunk was put; `first`: the first output token, when the request sampled one."""


@dataclass(eq=False)
class _Transfer:
    sink: KVSink
    next_token: int  # first token not sent yet
    end_token: int  # KV of tokens [.., end_token) is wanted
    pieces: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # this step: (start, end, slots)


def stream_layerwise(device: torch.device) -> bool:
    """Whether a step's chunks should leave layer by layer during its forward pass (so the transfer
    overlaps compute) rather than all at its end: yes when sending cannot slow the forward pass, on a
    GPU or when the CPU engine's threads leave a core free. On 2 cores that both compute, sending
    each layer as attention wrote it made attention's small GEMMs 40% slower (the sender, the
    transport and decode woke right then) and a 1,000-token prompt's TTFT +13% over colocated;
    sending after the forward pass, +8-10% (bench/pd.py, 2026-12-02)."""
    if device.type != "cpu":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return torch.get_num_threads() < cores


class KVProducer:
    def __init__(self, layout: LayoutDescriptor, block_size: int, max_chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
                 layerwise: bool = True):
        self.layout = layout
        self.block_size = block_size
        self.max_chunk_bytes = max_chunk_bytes
        self.layerwise = layerwise  # chunks leave as each layer is written; else after the forward pass
        self.transfers: dict[Request, _Transfer] = {}
        self._planned: list[_Transfer] = []

    def attach(self, req: Request, sink: KVSink, skip_tokens: int) -> None:
        """Send KV of the request's tokens from `skip_tokens` on (the consumer has the rest)."""
        self.transfers[req] = _Transfer(sink, skip_tokens, req.num_tokens)

    def detach(self, req: Request) -> None:
        self.transfers.pop(req, None)

    # ---- scheduler side -----------------------------------------------------------------------

    def plan(self, scheduled: list, tables: dict[str, list[int]]) -> bool:
        """This step's sends; True when save_layer has work."""
        self._planned = []
        for s in scheduled:
            t = self.transfers.get(s.request)
            if t is None:
                continue
            end = min(s.request.num_computed_tokens + s.num_new_tokens, t.end_token)
            if end <= t.next_token:
                continue
            table = tables[s.request.seq_id]
            t.pieces = [(a, b, codec.slots_of(table, self.block_size, a, b))
                        for a, b in codec.split(t.next_token, end, self.layout.token_bytes, self.max_chunk_bytes)]
            self._planned.append(t)
        return bool(self._planned)

    # ---- worker side --------------------------------------------------------------------------

    def save_layer(self, layer: int, cache: torch.Tensor) -> None:
        for t in self._planned:
            for a, b, slots in t.pieces:
                t.sink.put(KVChunkData(layer, a, b - a, codec.encode([cache], slots)))

    def save_step(self, caches: codec.LocalCaches) -> None:
        """Not layerwise: every layer's chunks of this step, once its forward pass ended. A chunk
        holds as many consecutive layers of a token range as fit `max_chunk_bytes` (at least one)."""
        for t in self._planned:
            chunks = []
            for a, b, slots in t.pieces:
                per_layer = (b - a) * self.layout.token_bytes
                group = max(1, self.max_chunk_bytes // per_layer)
                for first in range(0, caches.num_layers, group):
                    layers = range(first, min(first + group, caches.num_layers))
                    chunks.append(KVChunkData(first, a, b - a, caches.encode(layers, slots), num_layers=len(layers)))
            for chunk in chunks:  # all encoded before the first leaves: the gather does not race the wire
                t.sink.put(chunk)

    def step_done(self, samples: dict[Request, Sample]) -> None:
        """`samples`: this step's first tokens of requests that sample one."""
        for t in self._planned:
            t.next_token = t.pieces[-1][1]
            t.pieces = []
        self._planned = []
        for req, t in list(self.transfers.items()):
            if t.next_token >= t.end_token:
                del self.transfers[req]
                t.sink.finish(samples.get(req))
