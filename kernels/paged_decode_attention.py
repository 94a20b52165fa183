"""Paged decode attention (flash-decoding): one query token per sequence against its K/V in the
paged cache [2, num_blocks, block_size, Hkv, D], read through the block table.

One program per (sequence, KV head, split): the `group` query heads sharing that KV head are the
rows of one tl.dot (padded to 16), so each K/V tile is read from memory once per KV head. A tile is
BLOCK_N tokens spanning several pages; their page ids are gathered from the block table. With
split-K, each split works on its own slice of the sequence's tiles (sliced on the device from the
sequence's own length, no slice shorter than min_split_tokens: a short sequence leaves splits unused,
which exit at once) and writes an unnormalised partial; a second small kernel merges the used ones.

Nothing on the launch path reads a device tensor, so a decode batch can be captured in a CUDA graph:
the grid depends only on host ints. Padding rows (context length 0) produce zeros, or with
`write_empty_rows=False` are left as they are: a mixed step's prompt lanes are such rows, and the
prefill kernel writes them from another stream meanwhile (attention_triton.py).
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from tandem.kernels.attention_common import (LOG2E, ROWS_BY_CONTEXT, ROWS_WITH_CONTEXT, attend_tile, check_cache,
                                             check_heads, check_index, check_out, dot_precision, merge_splits,
                                             split_tiles)
from tandem.kernels.pdl import launch_options, wait_for_inputs

__all__ = ["paged_decode_attention", "paged_decode_attention_ref"]

_MIN_ROWS = 16  # tl.dot needs M >= 16 on GPUs
# Each sequence's split floor in the kernel. Where the batch's programs cannot fill the SMs, one tile a
# split is worth its partial (H200, 8B, one row of 576 tokens: 5.1 us in 16 splits of 64 tokens, 8.8 us
# of 256); where a spread batch is split for its longest sequences (SPREAD_*), short ones must not
# splinter (bench/gpu_decode_mix.py; TANDEM_MIN_SPLIT_TOKENS sets the spread floor for sweeps).
MIN_SPLIT_TOKENS = 64
SPREAD_MIN_SPLIT_TOKENS = int(os.environ.get("TANDEM_MIN_SPLIT_TOKENS", "256"))
SPREAD_SPLITS = 8  # H200, 8B, 128 rows of W2's spread contexts: 1 split 46% of copy bandwidth, 8 splits 75%
_MAX_SPLITS = 64


@triton.jit(do_not_specialize=["table_stride"])  # varies every step: one compiled variant for all
def _decode_kernel(q_ptr, cache_ptr, tables_ptr, lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
                   scale_log2, q_stride_b, q_stride_h, out_stride_b, out_stride_h, table_stride, v_plane,
                   window, NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                   SLOT_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, SKIP_EMPTY: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + seq)
    if SKIP_EMPTY and ctx == 0:  # padding (or a prompt lane's row): the merge writes its zeros, or nobody
        return
    kv_begin, first, num_tiles, per_split = split_tiles(ctx, window, NUM_SPLITS, MIN_SPLIT_TILES, BLOCK_N, HAS_WINDOW)
    tile_lo = split * per_split
    tile_hi = tl.minimum(tile_lo + per_split, num_tiles)
    if NUM_SPLITS > 1 and tile_lo >= num_tiles:  # an unused split: the merge reads none of it
        return

    rows = tl.arange(0, ROWS)
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + seq * q_stride_b + heads[:, None] * q_stride_h + dims[None, :], mask=q_mask, other=0.0)

    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    l_sum = tl.zeros([ROWS], dtype=tl.float32)
    m_max = tl.full([ROWS], -1e30, dtype=tl.float32)
    table_row = tables_ptr + seq * table_stride
    head_ptr = cache_ptr + kv_head * HEAD_DIM
    for tile in range(tile_lo, tile_hi):  # one query position: [kv_begin, ctx) is the whole mask
        acc, l_sum, m_max = attend_tile(acc, l_sum, m_max, q, rows, kv_begin, first + tile * BLOCK_N, ctx, table_row,
                                        head_ptr, v_plane, dims, dim_ok, window, scale_log2, BLOCK_N, BLOCK_SIZE,
                                        SLOT_SIZE, False, False, PRECISION, True)

    if NUM_SPLITS == 1:
        o = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]  # context 0: zeros
        tl.store(out_ptr + seq * out_stride_b + heads[:, None] * out_stride_h + dims[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:  # partials [B, Hq, S, D] and (m, l) [B, Hq, S, 2] of the used splits
        part = (seq * NUM_HEADS + heads) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=q_mask)
        tl.store(part_ml_ptr + part * 2, m_max, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_sum, mask=row_ok)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def choose_num_splits(batch: int, num_kv: int, max_context_len: int, sm_count: int,
                      min_split_tokens: int = MIN_SPLIT_TOKENS) -> int:
    """Enough (sequence, KV head, split) programs for ~4 per SM, no split shorter than min_split_tokens;
    a power of two, since NUM_SPLITS is compiled in: a few kernel variants serve every batch size."""
    if batch * num_kv == 0:
        return 1
    wanted = max(1, 4 * sm_count // (batch * num_kv))  # rounded down: 64 x 8 heads on 132 SMs need no split
    splits = max(1, min(wanted, math.ceil(max_context_len / min_split_tokens), _MAX_SPLITS))
    return 1 << (splits.bit_length() - 1)  # rounded down: never shorter splits than asked


def spread_contexts(longest: int, total: int, rows: int, num_kv: int, sm_count: int) -> bool:
    """Whether one program per (sequence, KV head) would leave the longest sequences' programs walking
    alone (then SPREAD_SPLITS pays): a program streams about a quarter of an SM's share of bandwidth
    (H200: ~7 of ~32 GB/s), so a context longer than the batch's K/V per ~4 program slots an SM sets
    the kernel's pace; and it must be at least twice the mean, since equal contexts finish together
    (64 rows of 384 tokens: 29.5 us in one split, 35 in SPREAD_SPLITS; bench/gpu_decode_mix.py --small).
    total: the batch's context lengths summed."""
    return longest * 4 * sm_count > num_kv * total and longest * rows >= 2 * total


def launch_decode(q, kv_cache, block_tables, context_lens, scale, sliding_window, num_splits, out,
                  block_n: int, num_warps: int, num_stages: int, write_empty_rows: bool = True,
                  min_split_tokens: int = MIN_SPLIT_TOKENS) -> None:
    """The kernels with an explicit tile config (bench/kernels.py sweeps it); inputs already checked."""
    batch, num_heads, head_dim = q.shape
    _, _, block_size, num_kv, _ = kv_cache.shape
    group = num_heads // num_kv
    block_d = triton.next_power_of_2(head_dim)
    common = dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d)
    if num_splits > 1:
        part_acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(batch, num_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    min_split_tiles = max(1, min_split_tokens // block_n) if num_splits > 1 else 1
    _decode_kernel[(batch, num_kv, num_splits)](
        q, kv_cache, block_tables, context_lens, out, part_acc, part_ml, scale * LOG2E, q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0), kv_cache.stride(0), sliding_window or 0,
        GROUP=group, SLOT_SIZE=num_kv * head_dim, ROWS=max(_MIN_ROWS, triton.next_power_of_2(group)),
        BLOCK_N=block_n, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits,
        MIN_SPLIT_TILES=min_split_tiles, HAS_WINDOW=bool(sliding_window),
        PRECISION=dot_precision(q.dtype), SKIP_EMPTY=num_splits > 1 or not write_empty_rows, num_warps=num_warps,
        num_stages=num_stages, **common, **launch_options(q.device, batch))
    if num_splits > 1:
        rows = ROWS_BY_CONTEXT if write_empty_rows else ROWS_WITH_CONTEXT
        merge_splits(part_acc, part_ml, out, context_lens, 0, rows,
                     decode_splits=(block_n, min_split_tiles, sliding_window), **launch_options(q.device, batch))


def decode_config(head_dim: int, device: torch.device, programs_per_sm: float = 0.0, num_splits: int = 1) -> dict:
    """Tile config (bench/gpu_decode_mix.py --tiles, H200, 8B attention, one split): with 6 or more programs
    per SM, 32-token tiles in 2-warp programs, which keep more loads in flight per SM (128 x 384 tokens:
    51.6 vs 55.8 us; 256 x 384: 99 vs 107); from 3 in one split, 64-token tiles in 2-warp programs
    (64 x 384: 29.1 vs 29.9 us; 64 x 192: 13.2 vs 14.4); else 4 warps (one row in 64 splits, most of them
    unused: 2 warps made the 8B single-request step ~1% slower). Split batches with 6 or more programs per
    SM (W2's mixed and spread steps, 8 splits) take 64-token tiles in 4-warp programs, 2 stages deep
    (bench/gpu_decode_mix.py --mixed-tiles: 96 / 128 decode rows 76.2 / 103.2 us against 80.9 / 108.7 in
    32-token 2-warp tiles; 3 stages 83.7 / 110.7). Bigger tiles in the interpreter, where each tile step
    costs the same whatever its size."""
    if device.type != "cuda":
        return dict(block_n=32, num_warps=4, num_stages=1)
    if programs_per_sm >= 6 and num_splits > 1 and head_dim <= 128:
        return dict(block_n=64, num_warps=4, num_stages=2)
    if programs_per_sm >= 6 and head_dim <= 128:
        return dict(block_n=32, num_warps=2, num_stages=2)
    warps = 2 if programs_per_sm >= 3 and num_splits == 1 and head_dim <= 128 else 4
    return dict(block_n=64, num_warps=warps, num_stages=3 if head_dim <= 128 else 2)


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                           num_splits: int | None = None, out: torch.Tensor | None = None,
                           max_context_len: int | None = None, write_empty_rows: bool = True,
                           min_split_tokens: int | None = None) -> torch.Tensor:
    """q [B, Hq, D] (one token per sequence, its K/V already cached) attends to the first
    context_lens[b] tokens (the last `sliding_window` of them when given) -> [B, Hq, D].

    block_tables [B, max_blocks] int32, context_lens [B] int32 (0: padding row, output zeros; with
    write_empty_rows=False such rows of `out` are left as they are).
    max_context_len (a host int; default: what the block table can hold) and the SM count choose
    num_splits when it is None; a sequence splits no finer than min_split_tokens (default
    MIN_SPLIT_TOKENS, rounded to whole tiles), so short ones leave splits empty. Nothing here reads a
    device tensor (CUDA-graph safe)."""
    name = "paged_decode_attention"
    check_cache(name, kv_cache)
    check_heads(name, "q", q, kv_cache)
    batch = q.shape[0]
    check_index(name, "block_tables", block_tables, (batch, block_tables.shape[-1] if block_tables.dim() else 0),
                kv_cache)
    check_index(name, "context_lens", context_lens, (batch,), kv_cache)
    out = check_out(name, out, q)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"{name}: num_splits must be >= 1, got {num_splits}")
    if batch == 0:
        return out
    min_split_tokens = min_split_tokens or MIN_SPLIT_TOKENS
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * kv_cache.shape[2]
    if sliding_window:
        max_context_len = min(max_context_len, sliding_window)
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_cache.shape[3], max_context_len, sm_count(q.device),
                                       min_split_tokens)
    per_sm = batch * kv_cache.shape[3] * num_splits / sm_count(q.device)
    launch_decode(q, kv_cache, block_tables, context_lens, scale, sliding_window, num_splits, out,
                  **decode_config(q.shape[2], q.device, per_sm, num_splits), write_empty_rows=write_empty_rows,
                  min_split_tokens=min_split_tokens)
    return out


def paged_decode_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                               context_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                               num_splits: int | None = None, out: torch.Tensor | None = None,
                               max_context_len: int | None = None, write_empty_rows: bool = True) -> torch.Tensor:
    """Plain-torch twin: gathers every row's blocks, masks, softmax in float32. num_splits and
    max_context_len only steer the kernel's launch; they change nothing here."""
    batch, num_heads, head_dim = q.shape
    _, _, block_size, num_kv, _ = kv_cache.shape
    tables = block_tables.long()
    keys = kv_cache[0][tables].reshape(batch, -1, num_kv, head_dim).float()  # [B, L, Hkv, D]
    values = kv_cache[1][tables].reshape(batch, -1, num_kv, head_dim).float()
    pos = torch.arange(keys.shape[1], device=q.device)[None, :]
    ctx = context_lens.long()[:, None]
    keep = pos < ctx
    if sliding_window:
        keep &= pos >= ctx - sliding_window
    qg = q.float().view(batch, num_kv, num_heads // num_kv, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, keys) * scale
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # rows with nothing to attend to: zeros
    values = values.masked_fill(~keep[:, :, None, None], 0.0)  # unread slots may hold anything, NaN too
    o = torch.einsum("bhgl,blhd->bhgd", probs, values).reshape(batch, num_heads, head_dim).to(q.dtype)
    if out is None:
        return o
    if write_empty_rows:
        out.copy_(o)
    else:
        ours = context_lens > 0
        out[ours] = o[ours]
    return out
