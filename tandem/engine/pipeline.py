"""Pipeline parallelism: the layer stack cut into contiguous stages, each on its own ranks (tensor-parallel
within a stage). Rank r is stage r // tp, tensor-parallel rank r % tp; rank 0 (stage 0) runs the engine.

A forward pass, on every rank at once: stage 0 embeds the tokens, every stage runs its layers on the
(output, residual) pair the stage before sent it and sends its own on, to the rank of the same
tensor-parallel index in the next stage; the last stage's tensor-parallel rank 0 applies the final norm and
sends the hidden states back to rank 0, which computes logits and samples. One batch is in flight at a time:
this splits a model too large for one device (weights and KV cache, each rank holding only its layers'),
it does not overlap the stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from tandem.engine.sharding import Shard


@dataclass(frozen=True)
class Placement:
    """Where rank `rank` of a tp x pp group sits."""
    rank: int
    tp: int
    pp: int

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def shard(self) -> Shard | None:
        return Shard(self.rank % self.tp, self.tp) if self.tp > 1 else None

    def layers(self, num_layers: int) -> range:
        return stage_layers(num_layers, self.stage, self.pp)


def stage_layers(num_layers: int, stage: int, stages: int) -> range:
    """Stage `stage`'s layers: equal runs, the first stages one longer when they do not divide evenly."""
    per, extra = divmod(num_layers, stages)
    start = stage * per + min(stage, extra)
    return range(start, start + per + (stage < extra))


class Elsewhere(nn.Module):
    """A layer another stage holds: no weights here, and never run here."""


def keep_layers(model: nn.Module, layers: range) -> None:
    """Drop the layers outside `layers` (on the meta device, before anything is allocated)."""
    for i in range(len(model.layers)):
        if i not in layers:
            model.layers[i] = Elsewhere()


def stage_weights(weights: Iterable[tuple[str, torch.Tensor]], layers: range) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors this stage holds: its layers' and the rest (embedding, final norm, head)."""
    for name, tensor in weights:
        parts = name.removeprefix("model.").split(".")
        if parts[0] == "layers" and int(parts[1]) not in layers:
            continue
        yield name, tensor


class Pipeline:
    """One rank's part of every forward pass (`links`: its sends and receives, parallel_group.Links or, on rank 0, the ParallelGroup)."""

    def __init__(self, placement: Placement, links, num_layers: int) -> None:
        self.placement, self.links = placement, links
        self.layers = placement.layers(num_layers)
        self.first, self.last = placement.stage == 0, placement.stage == placement.pp - 1
        tp = placement.tp
        self.prev = placement.rank - tp if not self.first else None
        self.next = placement.rank + tp if not self.last else None
        self.head = (placement.pp - 1) * tp  # the last stage's tensor-parallel rank 0: it sends rank 0 the result

    def forward(self, model, input_ids: torch.Tensor, positions: torch.Tensor, attn, keep: torch.Tensor | None):
        """Rank 0: the final hidden states (of the `keep` rows); other ranks: None."""
        n = input_ids.shape[0]
        if self.first:
            h, residual = model.embed_tokens(input_ids), None
        else:
            h, residual = self._empty(model, n), self._empty(model, n)
            self.links.recv(h, self.prev)
            self.links.recv(residual, self.prev)
        h, residual = model.forward_layers(h, residual, positions, attn, keep, self.layers)
        if not self.last:
            self.links.send(h.contiguous(), self.next)
            self.links.send(residual.contiguous(), self.next)
            hidden = None
        else:
            hidden = model.finish(h, residual)
        rows = n if keep is None else keep.shape[0]
        if self.placement.rank == 0 and not self.last:
            hidden = self._empty(model, rows)
            if rows:
                self.links.recv(hidden, self.head)
            return hidden
        if self.placement.rank == self.head and self.placement.rank != 0 and rows:
            self.links.send(hidden.contiguous(), 0)
        return hidden if self.placement.rank == 0 else None

    @staticmethod
    def _empty(model, rows: int) -> torch.Tensor:
        w = model.embed_tokens.weight
        return torch.empty(rows, w.shape[1], dtype=w.dtype, device=w.device)
