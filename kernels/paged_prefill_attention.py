"""Paged prefill attention: N prompt chunks of different lengths in one launch, each chunk's queries
at the END of its context (after a cached prefix: earlier chunks or a prefix-cache hit), causal,
GQA, optional sliding window; K/V (the chunk's own included) read from the paged cache through the
block table.

One program per (query tile, sequence, KV head). A tile's M rows are BLOCK_Q query tokens x the
group's query heads (padded to a power of two), so each K/V tile feeds every head sharing it. Keys
before the tile's first query need no causal mask and, whole tiles inside the context, no bounds masks
either: only the tiles on the diagonal are masked (unmasked since the tile sweep below: 255 -> 251 and
192 registers for the two chunk configs, 234 -> 186 for prompt lanes, `bench/kernel_regs.py`; not yet
timed on a GPU).

Short chunks over long prefixes (a lookahead's prompt lanes: a few dozen tokens each after up to
thousands) leave most SMs idle while each program walks its prefix. For them `num_splits` cuts each
tile's keys into slices whose partials are merged afterwards (split-K, as in decode), and `packed`
numbers the query tiles of all chunks together, so the grid needs no tile column per sequence for
the longest chunk: program i finds its chunk from the tile counts of cu_seqlens_q.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.attention_common import (LOG2E, ROWS_IN_CHUNKS, attend_tile, check_cache, check_heads,
                                             check_index, check_out, dot_precision, merge_splits)

__all__ = ["paged_prefill_attention", "paged_prefill_attention_ref"]


# table_stride and num_seqs vary every step: one compiled variant for all (compiled at start-up, model_runner.py)
@triton.jit(do_not_specialize=["table_stride", "num_seqs"])
def _prefill_kernel(q_ptr, cache_ptr, cu_ptr, lens_ptr, tables_ptr, out_ptr, part_acc_ptr, part_ml_ptr, scale_log2,
                    q_stride_t, q_stride_h, out_stride_t, out_stride_h, table_stride, v_plane, window, num_seqs,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, SLOT_SIZE: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                    NUM_SPLITS: tl.constexpr, PACKED: tl.constexpr, SEQS_PAD: tl.constexpr):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD
    split = tl.program_id(0) % NUM_SPLITS
    kv_head = tl.program_id(2)
    if PACKED:  # program i // NUM_SPLITS is the i-th query tile counting every chunk's tiles in order
        tile = tl.program_id(0) // NUM_SPLITS
        n = tl.arange(0, SEQS_PAD)
        begins = tl.load(cu_ptr + n, mask=n < num_seqs, other=0)
        ends = tl.load(cu_ptr + n + 1, mask=n < num_seqs, other=0)
        tiles_before = tl.cumsum((ends - begins + BLOCK_Q - 1) // BLOCK_Q, 0)  # inclusive: through chunk n
        if tile >= tl.max(tiles_before, 0):
            return
        seq = tl.sum((tiles_before <= tile).to(tl.int32), 0).to(tl.int64)
        first_tile = tl.sum(tl.where(n == seq, tiles_before - (ends - begins + BLOCK_Q - 1) // BLOCK_Q, 0), 0)
        tile_start = (tile - first_tile) * BLOCK_Q
    else:
        tile_start = tl.program_id(0) // NUM_SPLITS * BLOCK_Q
        seq = tl.program_id(1).to(tl.int64)
    q_begin = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_begin
    if tile_start >= q_len:  # past the chunk's end (grids are sized for the longest): nothing to store
        return
    ctx = tl.load(lens_ptr + seq)
    prefix = ctx - q_len

    rows = tl.arange(0, BLOCK_M)
    token = tile_start + rows // GROUP_PAD
    member = rows % GROUP_PAD
    dims = tl.arange(0, BLOCK_D)
    row_ok = (token < q_len) & (member < GROUP)
    dim_ok = dims < HEAD_DIM
    io_mask = row_ok[:, None] & dim_ok[None, :]
    heads = kv_head * GROUP + member
    q = tl.load(q_ptr + (q_begin + token)[:, None].to(tl.int64) * q_stride_t + heads[:, None] * q_stride_h
                + dims[None, :], mask=io_mask, other=0.0)
    q_pos = prefix + token

    # keys [lo, diag) precede every query of the tile; [diag, hi) need the causal mask
    hi = prefix + tl.minimum(tile_start + BLOCK_Q, q_len)
    diag = tl.minimum((prefix + tile_start) // BLOCK_N * BLOCK_N, hi)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(prefix + tile_start - window + 1, 0) // BLOCK_N * BLOCK_N
        diag = tl.maximum(diag, lo)

    # this split's slice of the key tiles [lo, hi), in whole BLOCK_N tiles (lo and diag are aligned)
    per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), NUM_SPLITS) * BLOCK_N
    lo = lo + split * per_split
    hi = tl.minimum(hi, lo + per_split)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_max = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    table_row = tables_ptr + seq * table_stride
    head_ptr = cache_ptr + kv_head * HEAD_DIM
    # tiles before the diagonal are whole and inside [0, hi): lo, diag and each split's end are BLOCK_N-aligned
    # and diag < hi, so they need no bounds masks
    for kv_start in range(lo, tl.minimum(diag, hi), BLOCK_N):
        acc, l_sum, m_max = attend_tile(acc, l_sum, m_max, q, q_pos, 0, kv_start, hi, table_row, head_ptr, v_plane,
                                        dims, dim_ok, window, scale_log2, BLOCK_N, BLOCK_SIZE, SLOT_SIZE, False,
                                        HAS_WINDOW, PRECISION, False)
    for kv_start in range(tl.maximum(diag, lo), hi, BLOCK_N):
        acc, l_sum, m_max = attend_tile(acc, l_sum, m_max, q, q_pos, 0, kv_start, hi, table_row, head_ptr, v_plane,
                                        dims, dim_ok, window, scale_log2, BLOCK_N, BLOCK_SIZE, SLOT_SIZE, True,
                                        HAS_WINDOW, PRECISION, True)

    row = (q_begin + token).to(tl.int64)
    if NUM_SPLITS == 1:
        o = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
        tl.store(out_ptr + row[:, None] * out_stride_t + heads[:, None] * out_stride_h + dims[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:  # partials [T, Hq, S, D] and (m, l) [T, Hq, S, 2], as decode's; an empty slice writes l = 0
        part = (row * (GROUP * tl.num_programs(2)) + heads) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=io_mask)
        tl.store(part_ml_ptr + part * 2, m_max, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_sum, mask=row_ok)


def prefill_config(head_dim: int, group: int, dtype: torch.dtype, device: torch.device, max_query_len: int = 0,
                   packed: bool = False) -> dict:
    """Tile config. On GPUs at head_dim 128, a step's chunks take one warpgroup: 128 rows x 32 keys in
    4 stages for chunks up to 1,024 tokens, 64 x 64 in 2 stages past that (an H200's sweep,
    `bench/attention_speed.py --prefill 32x512,4x2048,1x8192`: 223 / 296 / 352 TFLOP/s against 176 / 271 /
    321 with 128 x 64 in 8 warps). Prompt lanes (`packed`: a few short chunks over long prefixes, beside
    decode attention) keep 128 x 64 in 8 warps: with the one-warpgroup tiles 8B W2 under lof lost 1.7%
    (6,427 vs 6,535 out tok/s, one H200). float32 takes half the rows (its tiles take twice the shared
    memory). In the interpreter a program costs about the same whatever its size: 16 query tokens a
    tile, whatever the group."""
    if device.type != "cuda":
        return dict(block_m=16 * triton.next_power_of_2(group), block_n=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return dict(block_m=128, block_n=64, num_warps=4, num_stages=3)
    if packed or head_dim != 128:  # other head sizes: not swept (a 256-wide accumulator would not fit 4 warps)
        return dict(block_m=128, block_n=64, num_warps=8, num_stages=2)
    if max_query_len <= 1024:
        return dict(block_m=128, block_n=32, num_warps=4, num_stages=4)
    return dict(block_m=64, block_n=64, num_warps=4, num_stages=2)


def launch_prefill(q, kv_cache, cu_seqlens_q, context_lens, block_tables, scale, sliding_window, out,
                   max_query_len: int, block_m: int, block_n: int, num_warps: int, num_stages: int,
                   num_splits: int = 1, packed: bool = False) -> None:
    """The kernel with an explicit tile config (bench/kernels.py sweeps it); inputs already checked."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, _, block_size, num_kv, _ = kv_cache.shape
    num_seqs = context_lens.shape[0]
    group = num_heads // num_kv
    group_pad = triton.next_power_of_2(group)
    block_m = max(block_m, group_pad)
    block_q = block_m // group_pad
    # packed: max_query_len bounds all chunks' rows together; each chunk adds at most one partial tile
    tiles = triton.cdiv(max_query_len, block_q) + (num_seqs - 1 if packed else 0)
    grid = (tiles * num_splits, 1 if packed else num_seqs, num_kv)
    if num_splits > 1:
        part_acc = torch.empty(q.shape[0], num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(q.shape[0], num_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    _prefill_kernel[grid](
        q, kv_cache, cu_seqlens_q, context_lens, block_tables, out, part_acc, part_ml, scale * LOG2E, q.stride(0),
        q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), kv_cache.stride(0), sliding_window or 0,
        num_seqs, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, SLOT_SIZE=num_kv * head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        HAS_WINDOW=bool(sliding_window), PRECISION=dot_precision(q.dtype), NUM_SPLITS=num_splits, PACKED=packed,
        SEQS_PAD=max(16, triton.next_power_of_2(num_seqs)) if packed else 16,  # unpacked: unused, one variant
        num_warps=num_warps, num_stages=num_stages)
    if num_splits > 1:
        merge_splits(part_acc, part_ml, out, cu_seqlens_q, num_seqs, ROWS_IN_CHUNKS)


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                            sliding_window: int | None = None, out: torch.Tensor | None = None,
                            max_query_len: int | None = None, num_splits: int = 1,
                            packed: bool = False) -> torch.Tensor:
    """q [T, Hq, D]: sequence n's queries are rows cu_seqlens_q[n]:cu_seqlens_q[n+1] at positions
    context_lens[n] - query_len ... context_lens[n] - 1 (their K/V already cached) -> [T, Hq, D].
    Rows outside [cu_seqlens_q[0], cu_seqlens_q[N]) are left as they are.

    cu_seqlens_q [N+1], context_lens [N], block_tables [N, max_blocks], all int32. max_query_len
    (a host int, default T) sizes the grid: the longest chunk, or with `packed` all chunks' rows
    together. num_splits > 1 splits each query tile's keys (merged after). Nothing here reads a
    device tensor."""
    name = "paged_prefill_attention"
    check_cache(name, kv_cache)
    check_heads(name, "q", q, kv_cache)
    num_seqs = context_lens.shape[0] if context_lens.dim() == 1 else -1
    check_index(name, "context_lens", context_lens, (num_seqs,), kv_cache)
    check_index(name, "cu_seqlens_q", cu_seqlens_q, (num_seqs + 1,), kv_cache)
    check_index(name, "block_tables", block_tables,
                (num_seqs, block_tables.shape[-1] if block_tables.dim() else 0), kv_cache)
    out = check_out(name, out, q)
    if max_query_len is None:
        max_query_len = q.shape[0]
    if num_splits < 1:
        raise ValueError(f"{name}: num_splits must be >= 1, got {num_splits}")
    if num_seqs == 0 or max_query_len == 0:
        return out
    launch_prefill(q, kv_cache, cu_seqlens_q, context_lens, block_tables, scale, sliding_window, out,
                   max_query_len, num_splits=num_splits, packed=packed,
                   **prefill_config(q.shape[2], q.shape[1] // kv_cache.shape[3], q.dtype, q.device, max_query_len,
                                    packed))
    return out


def paged_prefill_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                                sliding_window: int | None = None, out: torch.Tensor | None = None,
                                max_query_len: int | None = None, num_splits: int = 1,
                                packed: bool = False) -> torch.Tensor:
    """Plain-torch twin, one sequence at a time: gather its blocks, causal (+ window) mask, softmax
    in float32. max_query_len, num_splits and packed only steer the kernel's launch."""
    _, _, block_size, num_kv, head_dim = kv_cache.shape
    num_heads = q.shape[1]
    group = num_heads // num_kv
    o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    cu = cu_seqlens_q.tolist()
    for n, ctx in enumerate(context_lens.tolist()):
        start, end = cu[n], cu[n + 1]
        blocks = block_tables[n, : -(-ctx // block_size)].long()
        keys = kv_cache[0][blocks].reshape(-1, num_kv, head_dim)[:ctx].float()  # [L, Hkv, D]
        values = kv_cache[1][blocks].reshape(-1, num_kv, head_dim)[:ctx].float()
        q_pos = torch.arange(ctx - (end - start), ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        keep = k_pos <= q_pos
        if sliding_window:
            keep &= k_pos > q_pos - sliding_window
        qg = q[start:end].float().view(end - start, num_kv, group, head_dim)
        scores = torch.einsum("thgd,lhd->thgl", qg, keys) * scale
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
        o[start:end] = torch.einsum("thgl,lhd->thgd", probs, values).reshape(end - start, num_heads, head_dim)
    o = o.to(q.dtype)
    if out is None:
        return o
    out.copy_(o)
    return out
