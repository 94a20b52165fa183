"""The CUDA attention backend: one launch of the paged prefill kernel for every prompt chunk of the
step and one of the paged decode kernel (split-K) for every single-token row, both reading K/V
through the block tables (no gathers).

When a step has both, the prefill launch runs on a second stream beside the decode launch (on CUDA;
in order elsewhere): decode reads memory while the prompt tiles compute, and each writes only its own
rows (a mixed graph's decode kernel leaves the prompt lanes' rows alone, and rows neither covers,
unused lanes and padding, stay zero).

Every value the kernels' grids need is a host int passed in, never read back from the device, so a
decode batch can be captured in a CUDA graph (cuda_graphs.py) and replayed with new tensors' contents.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from tandem.engine.attention import AttentionBatch, SeqSlice


def _table(seqs: list[SeqSlice], width: int | None = None) -> torch.Tensor:
    width = width or max(len(s.block_table) for s in seqs)
    rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
    return torch.tensor(rows, dtype=torch.int32)


@dataclass
class DecodeMeta:
    start: int  # first single-token row; they run to the end of the batch
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32; 0 for padding rows
    max_context_len: int
    num_splits: int | None = None
    min_split_tokens: int | None = None  # no sequence splits finer (None: paged_decode_attention's default)


@dataclass
class PrefillMeta:
    num_rows: int  # prompt-chunk rows come first: [0, num_rows)
    cu_seqlens_q: torch.Tensor  # [N + 1] int32
    context_lens: torch.Tensor  # [N] int32
    block_tables: torch.Tensor  # [N, max_blocks] int32
    max_query_len: int  # the longest chunk; with `packed`, all chunks' rows together
    num_splits: int = 1  # slices of each query tile's keys (prompt lanes: short chunks, long prefixes)
    packed: bool = False  # the grid numbers all chunks' query tiles together


@dataclass
class TritonAttention(AttentionBatch):
    decode: DecodeMeta | None = None
    prefill: PrefillMeta | None = None

    @classmethod
    def build(cls, kv_caches, seqs: list[SeqSlice], slot_mapping, scale, sliding_window, on_layer_written):
        device = kv_caches[0].device

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t

        chunks = [s for s in seqs if s.query_len > 1]
        singles = [s for s in seqs if s.query_len == 1]
        prefill = decode = None
        if chunks:
            cu = [0]
            for s in chunks:
                cu.append(cu[-1] + s.query_len)
            prefill = PrefillMeta(cu[-1], dev(torch.tensor(cu, dtype=torch.int32)),
                                  dev(torch.tensor([s.context_len for s in chunks], dtype=torch.int32)),
                                  dev(_table(chunks)), max(s.query_len for s in chunks))
        if singles:
            decode = DecodeMeta(singles[0].row, dev(_table(singles)),
                                dev(torch.tensor([s.context_len for s in singles], dtype=torch.int32)),
                                max(s.context_len for s in singles))
        return cls(kv_caches, slot_mapping, scale, sliding_window, on_layer_written, decode, prefill)

    def attend(self, cache: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        from tandem.kernels.paged_decode_attention import paged_decode_attention

        d, p = self.decode, self.prefill
        # prompt lanes (`packed`, prompt_lanes.py) leave rows that no kernel writes: zeros, not garbage
        out = torch.zeros_like(q) if p is not None and p.packed else torch.empty_like(q)
        side = _side_stream(q.device) if d is not None and p is not None else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(q.device))
            with torch.cuda.stream(side):
                self._prefill(cache, q, out)
        if d is not None:
            paged_decode_attention(q[d.start:], cache, d.block_tables, d.context_lens, self.scale,
                                   self.sliding_window, num_splits=d.num_splits, out=out[d.start:],
                                   max_context_len=d.max_context_len, write_empty_rows=p is None,
                                   min_split_tokens=d.min_split_tokens)
        if side is not None:
            torch.cuda.current_stream(q.device).wait_stream(side)
        elif p is not None:
            self._prefill(cache, q, out)
        return out

    def _prefill(self, cache: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
        from tandem.kernels.paged_prefill_attention import paged_prefill_attention

        p = self.prefill
        paged_prefill_attention(q[:p.num_rows], cache, p.cu_seqlens_q, p.context_lens, p.block_tables,
                                self.scale, self.sliding_window, out=out[:p.num_rows],
                                max_query_len=p.max_query_len, num_splits=p.num_splits, packed=p.packed)


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> "torch.cuda.Stream | None":
    """The stream prompt attention runs on beside decode attention; high priority, so its few programs
    start among the decode kernel's many instead of after them. None off CUDA or with TANDEM_OVERLAP=0."""
    if device.type != "cuda" or os.environ.get("TANDEM_OVERLAP", "1") == "0":
        return None
    return torch.cuda.Stream(device, priority=-1)
