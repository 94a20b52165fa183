"""Paged prefill attention: N prompt chunks of different lengths in one launch, each chunk's queries
at the END of its context (after a cached prefix: earlier chunks or a prefix-cache hit), causal,
GQA, optional sliding window; K/V (the chunk's own included) read from the paged cache through the
block table.

One program per (query tile, sequence, KV head). A tile's M rows are BLOCK_Q query tokens x the
group's query heads (padded to a power of two), so each K/V tile feeds every head sharing it. Keys
before the tile's first query need no causal mask; only the tiles on the diagonal are masked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.paged_decode_attention import (LOG2E, attend_tile, check_cache, check_heads, check_index,
                                                   check_out, dot_precision)

__all__ = ["paged_prefill_attention", "paged_prefill_attention_ref"]


@triton.jit(do_not_specialize=["table_stride"])  # varies every step: one compiled variant for all
def _prefill_kernel(q_ptr, cache_ptr, cu_ptr, lens_ptr, tables_ptr, out_ptr, scale_log2, q_stride_t, q_stride_h,
                    out_stride_t, out_stride_h, table_stride, v_plane, window, GROUP: tl.constexpr,
                    GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, SLOT_SIZE: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD
    tile_start = tl.program_id(0) * BLOCK_Q
    seq = tl.program_id(1).to(tl.int64)
    kv_head = tl.program_id(2)
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

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_max = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    table_row = tables_ptr + seq * table_stride
    head_ptr = cache_ptr + kv_head * HEAD_DIM
    for kv_start in range(lo, diag, BLOCK_N):
        acc, l_sum, m_max = attend_tile(acc, l_sum, m_max, q, q_pos, 0, kv_start, hi, table_row, head_ptr, v_plane,
                                        dims, dim_ok, window, scale_log2, BLOCK_N, BLOCK_SIZE, SLOT_SIZE, False,
                                        HAS_WINDOW, PRECISION)
    for kv_start in range(diag, hi, BLOCK_N):
        acc, l_sum, m_max = attend_tile(acc, l_sum, m_max, q, q_pos, 0, kv_start, hi, table_row, head_ptr, v_plane,
                                        dims, dim_ok, window, scale_log2, BLOCK_N, BLOCK_SIZE, SLOT_SIZE, True,
                                        HAS_WINDOW, PRECISION)

    o = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(out_ptr + (q_begin + token)[:, None].to(tl.int64) * out_stride_t + heads[:, None] * out_stride_h
             + dims[None, :], o.to(out_ptr.dtype.element_ty), mask=io_mask)


def prefill_config(head_dim: int, group: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile config: 128 rows x 64 keys on GPUs (8 warps for head_dim > 64), half that for float32
    (its tiles take twice the shared memory). In the interpreter a program costs about the same
    whatever its size: 16 query tokens a tile, whatever the group."""
    if device.type != "cuda":
        return dict(block_m=16 * triton.next_power_of_2(group), block_n=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return dict(block_m=128, block_n=64, num_warps=8 if head_dim > 64 else 4, num_stages=2 if head_dim > 64 else 3)


def launch_prefill(q, kv_cache, cu_seqlens_q, context_lens, block_tables, scale, sliding_window, out,
                   max_query_len: int, block_m: int, block_n: int, num_warps: int, num_stages: int) -> None:
    """The kernel with an explicit tile config (bench/kernels.py sweeps it); inputs already checked."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, _, block_size, num_kv, _ = kv_cache.shape
    group = num_heads // num_kv
    group_pad = triton.next_power_of_2(group)
    block_m = max(block_m, group_pad)
    grid = (triton.cdiv(max_query_len, block_m // group_pad), context_lens.shape[0], num_kv)
    _prefill_kernel[grid](
        q, kv_cache, cu_seqlens_q, context_lens, block_tables, out, scale * LOG2E, q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0), kv_cache.stride(0), sliding_window or 0,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, SLOT_SIZE=num_kv * head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        HAS_WINDOW=bool(sliding_window), PRECISION=dot_precision(q.dtype), num_warps=num_warps,
        num_stages=num_stages)


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                            sliding_window: int | None = None, out: torch.Tensor | None = None,
                            max_query_len: int | None = None) -> torch.Tensor:
    """q [T, Hq, D]: sequence n's queries are rows cu_seqlens_q[n]:cu_seqlens_q[n+1] at positions
    context_lens[n] - query_len ... context_lens[n] - 1 (their K/V already cached) -> [T, Hq, D].

    cu_seqlens_q [N+1], context_lens [N], block_tables [N, max_blocks], all int32. max_query_len
    (a host int, default T) sizes the grid; nothing here reads a device tensor."""
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
    if num_seqs == 0 or max_query_len == 0:
        return out
    launch_prefill(q, kv_cache, cu_seqlens_q, context_lens, block_tables, scale, sliding_window, out,
                   max_query_len, **prefill_config(q.shape[2], q.shape[1] // kv_cache.shape[3], q.dtype, q.device))
    return out


def paged_prefill_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                                sliding_window: int | None = None, out: torch.Tensor | None = None,
                                max_query_len: int | None = None) -> torch.Tensor:
    """Plain-torch twin, one sequence at a time: gather its blocks, causal (+ window) mask, softmax
    in float32. max_query_len only sizes the kernel's grid."""
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
