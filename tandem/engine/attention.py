"""Paged attention behind one interface: the model calls `AttentionBatch.forward(layer, q, k, v, rope)`
for every layer (q and k not yet rotated: the rotation fuses with the cache write); the batch owns the
step's metadata (built once per step, shared by all layers) and the KV cache tensors. `TorchAttention`
here is the reference backend (CPUs); `TritonAttention` (attention_triton.py) runs the Triton kernels
on CUDA. `build_attention` picks one for the device. On CPUs the reference hands every query token of
the step (decode rows, and prompt chunks up to NATIVE_MAX_CONTEXT) to the C++ paged decode kernel
(tandem.kernels.cpu) when it could be built, one row per token with its own causal context: that kernel
reads K/V in place, where the reference gathers them into a padded copy first.

Layout: one tensor per layer, [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V).
Token t of a request lives in slot `block_table[t // block_size] * block_size + t % block_size`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from tandem.engine import ops
from tandem.kernels import cpu as cpu_kernels

DECODE_GROUP_SIZE = 16  # reference backend: decode rows padded to the longest context of 16 rows
# C++ kernel on CPUs: prompt chunks with at most this many tokens of context run in it, one row per token;
# longer ones through SDPA, whose tiles reuse each K/V row across queries. Where the CPU has AMX, oneDNN's
# SDPA wins from ~64 tokens (Sapphire Rapids, SmolLM2 heads, 2 threads, 450-token prompt: bf16 0.9 vs
# 2.9 ms, float32 2.4 vs 2.9 ms); without (Zen 4), the kernel wins up to ~1,024 (450 tokens: 2.5 vs 5.2 ms;
# 2,048: 51 vs 42 ms).
NATIVE_MAX_CONTEXT = 64 if cpu_kernels.has_amx() else 1024


@dataclass
class SeqSlice:
    """One request's rows in the step's flat batch, in the order the batch holds them."""

    row: int
    query_len: int
    context_len: int  # tokens in the cache after this step, the query's own included
    block_table: list[int]  # the blocks covering context_len


def whole_prompts(lens: list[int], block_size: int, first_block: int = 1) -> tuple[list[SeqSlice], list[int]]:
    """Prompts of these lengths computed whole in one step, each in its own run of blocks from first_block
    on (a throwaway cache: profiling, benchmarks): their slices and the flat slot of every token."""
    seqs, slots, row = [], [], 0
    for n in lens:
        table = list(range(first_block, first_block + -(-n // block_size)))
        first_block += len(table)
        seqs.append(SeqSlice(row, n, n, table))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(n)]
        row += n
    return seqs, slots


@dataclass
class AttentionBatch:
    kv_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor  # [num_tokens] flat slot of each query token; < 0: padding
    scale: float
    sliding_window: int | None = None
    on_layer_written: Callable[[int, torch.Tensor], None] | None = None  # (layer, its cache): KV saving

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]; rope = (positions [T], cos, sin tables).
        Rotates q and k and writes k/v into the cache first."""
        cache = self.kv_caches[layer]
        q = ops.rope_and_cache(q, k, v, *rope, cache, self.slot_mapping)
        if self.on_layer_written is not None:
            self.on_layer_written(layer, cache)
        return self.attend(cache, q)

    def attend(self, cache: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def attention_backend(device: torch.device) -> str:
    """"triton" on CUDA, "torch" elsewhere; TANDEM_ATTENTION_BACKEND overrides it (tests run the Triton
    backend on CPUs through Triton's interpreter)."""
    chosen = os.environ.get("TANDEM_ATTENTION_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    if chosen not in ("triton", "torch"):
        raise ValueError(f"TANDEM_ATTENTION_BACKEND={chosen!r}: expected 'triton' or 'torch'")
    return chosen


def host_longs(values: list[int]) -> torch.Tensor:
    """Ints as an int64 CPU tensor, through numpy: a 16k-token prompt step's lists take 0.2 ms each this way
    against torch.tensor's 0.7, while the device waits for the step."""
    return torch.from_numpy(np.array(values, dtype=np.int64))


def build_attention(kv_caches: list[torch.Tensor], seqs: list[SeqSlice], slots: list[int], scale: float,
                    sliding_window: int | None, on_layer_written=None) -> AttentionBatch:
    """The device's backend for one step; `seqs` lists prompt chunks first, then single-token rows."""
    device = kv_caches[0].device
    slot_mapping = host_longs(slots).to(device, non_blocking=True)
    if attention_backend(device) == "triton":
        from tandem.engine.attention_triton import TritonAttention
        return TritonAttention.build(kv_caches, seqs, slot_mapping, scale, sliding_window, on_layer_written)
    return TorchAttention.build(kv_caches, seqs, slot_mapping, scale, sliding_window, on_layer_written)


@dataclass
class PrefillSeq:
    """A request computing more than one token this step (a prompt chunk)."""

    query_start: int
    query_len: int
    context_len: int  # tokens in the cache after this step, the query's own included
    block_table: torch.Tensor  # [ceil(context_len / block_size)]


@dataclass
class DecodeGroup:
    """Single-token queries of similar context length, padded to the group's longest."""

    rows: slice  # contiguous rows of the flat batch
    block_tables: torch.Tensor  # [B, max_blocks] padded with block 0; int32 for the C++ kernel
    context_lens: torch.Tensor  # [B]
    mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size], built once per step


@dataclass
class TorchAttention(AttentionBatch):
    decodes: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillSeq] = field(default_factory=list)
    native: bool = False  # one DecodeGroup of every row, for the C++ kernel (NATIVE_MAX_CONTEXT)

    @classmethod
    def build(cls, kv_caches, seqs: list[SeqSlice], slot_mapping, scale, sliding_window, on_layer_written):
        device = kv_caches[0].device  # the reference also runs on CUDA (the kernels' tests compare)
        head_dim = kv_caches[0].shape[-1]
        if device.type == "cpu" and head_dim % 16 == 0 and head_dim <= 256 and cpu_kernels.available():
            return cls._build_native(kv_caches, seqs, slot_mapping, scale, sliding_window, on_layer_written)
        prefills = [PrefillSeq(s.row, s.query_len, s.context_len, torch.tensor(s.block_table, device=device))
                    for s in seqs if s.query_len > 1]
        singles = [s for s in seqs if s.query_len == 1]
        decodes = []
        for start in range(0, len(singles), DECODE_GROUP_SIZE):
            members = singles[start:start + DECODE_GROUP_SIZE]
            width = max(len(s.block_table) for s in members)
            padded = torch.zeros(len(members), width, dtype=torch.long)
            for j, s in enumerate(members):  # on the host: filled row by row
                padded[j, : len(s.block_table)] = torch.tensor(s.block_table)
            decodes.append(DecodeGroup(slice(members[0].row, members[-1].row + 1), padded.to(device),
                                       torch.tensor([s.context_len for s in members], device=device)))
        return cls(kv_caches, slot_mapping, scale, sliding_window, on_layer_written, decodes, prefills)

    @classmethod
    def _build_native(cls, kv_caches, seqs, slot_mapping, scale, sliding_window, on_layer_written):
        """Every query token is a row of the C++ kernel, reading its own causal context in place: a
        decode row its whole context, prompt token i of a chunk the prefix and tokens up to i. Chunks
        longer than NATIVE_MAX_CONTEXT go to SDPA instead (their kernel rows stay empty)."""
        rows = slot_mapping.shape[0]
        in_kernel = [s for s in seqs if s.query_len == 1 or s.context_len <= NATIVE_MAX_CONTEXT]
        prefills = [PrefillSeq(s.row, s.query_len, s.context_len, torch.tensor(s.block_table))
                    for s in seqs if s.query_len > 1 and s.context_len > NATIVE_MAX_CONTEXT]
        decodes = []
        if in_kernel:
            tables = torch.zeros(rows, max(len(s.block_table) for s in in_kernel), dtype=torch.int32)
            context_lens = [0] * rows
            for s in in_kernel:  # a chunk's rows share its table (broadcast)
                tables[s.row:s.row + s.query_len, : len(s.block_table)] = torch.tensor(s.block_table)
                context_lens[s.row:s.row + s.query_len] = range(s.context_len - s.query_len + 1, s.context_len + 1)
            decodes.append(DecodeGroup(slice(0, rows), tables, torch.tensor(context_lens)))
        return cls(kv_caches, slot_mapping, scale, sliding_window, on_layer_written, decodes, prefills, True)

    def __post_init__(self) -> None:
        # Masks depend on the step only, not the layer: build them once.
        block_size = self.kv_caches[0].shape[2]
        device = self.kv_caches[0].device
        for g in self.decodes if not self.native else ():
            key_pos = torch.arange(g.block_tables.shape[1] * block_size, device=device)
            ctx = g.context_lens[:, None]
            mask = key_pos[None, :] < ctx
            if self.sliding_window:
                mask &= key_pos[None, :] > ctx - 1 - self.sliding_window
            g.mask = mask[:, None, None, :]
        self._prefill_masks = [self._causal_mask(p) for p in self.prefills]

    def _causal_mask(self, p: PrefillSeq) -> torch.Tensor | None:
        prefix = p.context_len - p.query_len
        if prefix == 0 and not self.sliding_window:
            return None  # plain causal: let SDPA use is_causal
        q_pos = torch.arange(prefix, p.context_len, device=p.block_table.device)[:, None]
        k_pos = torch.arange(p.context_len, device=p.block_table.device)[None, :]
        mask = k_pos <= q_pos
        if self.sliding_window:
            mask &= k_pos > q_pos - self.sliding_window
        return mask

    def attend(self, cache: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        group = q.shape[1] // cache.shape[3]
        out = torch.empty_like(q)
        for g in self.decodes:
            if self.native:  # writes its rows of `out` in place
                cpu_kernels.paged_decode_attention(out[g.rows], q[g.rows].contiguous(), cache, g.block_tables,
                                                   g.context_lens, self.scale, self.sliding_window)
            else:
                out[g.rows] = self._decode(cache, q[g.rows], g, group)
        for p, mask in zip(self.prefills, self._prefill_masks):
            rows = slice(p.query_start, p.query_start + p.query_len)
            out[rows] = self._prefill(cache, q[rows], p, mask, group)
        return out

    @staticmethod
    def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks, [len(block_ids) * block_size, Hkv, D] each. index_select on
        block rows copies contiguous runs: several times faster on CPUs than advanced indexing."""
        _, num_blocks, block_size, num_kv, head_dim = cache.shape
        ids = block_ids.flatten()
        k = cache[0].view(num_blocks, -1).index_select(0, ids)
        v = cache[1].view(num_blocks, -1).index_select(0, ids)
        return k.view(-1, num_kv, head_dim), v.view(-1, num_kv, head_dim)

    def _decode(self, cache: torch.Tensor, q: torch.Tensor, g: DecodeGroup, group: int) -> torch.Tensor:
        b, _, d = q.shape
        keys, values = self._gather(cache, g.block_tables)
        num_kv = keys.shape[1]
        # slots past a row's context (its last block's tail, the table's padding) hold whatever earlier
        # requests left, NaN included, and SDPA's masked weights are 0 * value: zero them in the copies
        unread = ~g.mask.view(b, -1, 1, 1)
        keys = keys.view(b, -1, num_kv, d).masked_fill_(unread, 0.0).transpose(1, 2)  # [B, Hkv, L, D]
        values = values.view(b, -1, num_kv, d).masked_fill_(unread, 0.0).transpose(1, 2)
        # The query heads sharing a KV head become that head's "query rows": no K/V repeat.
        qg = q.view(b, num_kv, group, d)
        o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=g.mask, scale=self.scale)
        return o.reshape(b, num_kv * group, d)

    def _prefill(self, cache: torch.Tensor, q: torch.Tensor, p: PrefillSeq, mask: torch.Tensor | None,
                 group: int) -> torch.Tensor:
        keys, values = self._gather(cache, p.block_table)
        keys = keys[: p.context_len].transpose(0, 1)  # [Hkv, L, D]
        values = values[: p.context_len].transpose(0, 1)
        qh = q.transpose(0, 1)  # [Hq, Lq, D]
        o = F.scaled_dot_product_attention(
            qh.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask,
            is_causal=mask is None, scale=self.scale, enable_gqa=group > 1)
        return o[0].transpose(0, 1)
