"""A parallel group's KV cache as transfers and the KV store see it (codec.LocalCaches' two methods): every
layer, every KV head. Rank 0 reads its own share and asks the other ranks for theirs over their command
connections (between forward passes: a worker reads its connection only then), and scatters what arrives the same way. A
layer lives on its pipeline stage's ranks, its KV heads spread over their tensor-parallel shards; a KV head
replicated over several shards is read from the first."""
from __future__ import annotations

import torch

from tandem.engine.kv_transfer import codec
from tandem.engine.parallel_group import ParallelGroup
from tandem.engine.sharding import Shard


class GroupCaches:
    def __init__(self, local: list[torch.Tensor], group: ParallelGroup, num_kv_heads: int) -> None:
        self.local, self.group = local, group
        self.num_layers, self.num_kv_heads = len(local), num_kv_heads
        self.dtype, self.head_dim = local[0].dtype, local[0].shape[-1]
        self.holds = [p.layers(self.num_layers) for p in group.placements]  # each rank's layers
        self.spans = [Shard(p.rank % p.tp, p.tp).kv_span(num_kv_heads) for p in group.placements]
        # per rank: whether it is the first holder of its heads within its stage
        self.reads = [p.rank % p.tp == 0 or self.spans[p.rank][0] >= self.spans[p.rank - 1][1]
                      for p in group.placements]

    def encode(self, layers: range, slots: torch.Tensor) -> memoryview:
        answers = [codec.encode([self.local[i] for i in self.holds[0] if i in layers], slots)
                   if any(i in layers for i in self.holds[0]) else b""]
        answers += self.group.call("kv_read", layers, slots.numpy())
        n = len(slots)
        by_rank = []
        for rank, data in enumerate(answers):
            mine = [i for i in self.holds[rank] if i in layers]
            by_rank.append(torch.frombuffer(data, dtype=self.dtype).view(len(mine), 2, n, -1, self.head_dim)
                           if mine else None)
        out = torch.empty(len(layers), 2, n, self.num_kv_heads, self.head_dim, dtype=self.dtype)
        for rank, part in enumerate(by_rank):
            if part is None or not self.reads[rank]:
                continue
            lo, hi = self.spans[rank]
            first = max(layers.start, self.holds[rank].start)
            out[first - layers.start:first - layers.start + part.shape[0], :, :, lo:hi] = part
        return memoryview(out.view(torch.uint8).numpy().reshape(-1))

    def decode_into(self, layer: int, slots: torch.Tensor, data: bytes | memoryview) -> None:
        whole = torch.frombuffer(data, dtype=self.dtype).view(2, len(slots), self.num_kv_heads, -1)
        shares = [whole[:, :, lo:hi].contiguous() if layer in held else None
                  for (lo, hi), held in zip(self.spans, self.holds)]
        self.group.send_each("kv_write", [None if share is None else
                                          (layer, slots.numpy(), share.view(torch.uint8).numpy().tobytes())
                                          for share in shares[1:]])
        if shares[0] is not None:
            codec.decode_into(self.local[layer], slots, memoryview(shares[0].view(torch.uint8).numpy().reshape(-1)))
