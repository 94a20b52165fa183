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

from tandem.kernels.pdl import launch_options, wait_for_inputs

__all__ = ["paged_decode_attention", "paged_decode_attention_ref"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634
_MIN_ROWS = 16  # tl.dot needs M >= 16 on GPUs
# below this a split's partial costs more than it parallelises: the split count's cap, and each sequence's
# floor in the kernel (TANDEM_MIN_SPLIT_TOKENS sets it for sweeps: bench/gpu_decode_mix.py)
_MIN_SPLIT_TOKENS = int(os.environ.get("TANDEM_MIN_SPLIT_TOKENS", "256"))
_MAX_SPLITS = 64


# ---------------------------------------------------------------- shared with the prefill kernel


@triton.jit
def attend_tile(acc, l_sum, m_max, q, q_pos, kv_begin, kv_start, kv_end, table_row, head_ptr, v_plane, dims, dim_ok,
                window, scale_log2, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, SLOT_SIZE: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    """Folds keys kv_start + [0, BLOCK_N) that lie in [kv_begin, kv_end) into (acc, l_sum, m_max),
    their K/V read through the block table row. CAUSAL / HAS_WINDOW mask each query row by its
    position q_pos [M]. m_max starts at a large finite negative, so fully masked rows get p = 0
    instead of NaN."""
    pos = kv_start + tl.arange(0, BLOCK_N)
    valid = (pos >= kv_begin) & (pos < kv_end)
    block = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    offs = (block * BLOCK_SIZE + pos % BLOCK_SIZE) * SLOT_SIZE
    k = tl.load(head_ptr + offs[None, :] + dims[:, None], mask=valid[None, :] & dim_ok[:, None], other=0.0)
    s = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # [M, N], log2 units
    keep = valid[None, :]
    if CAUSAL:
        keep = keep & (pos[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        keep = keep & (pos[None, :] > q_pos[:, None] - window)
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_max, tl.max(s, 1))
    alpha = tl.exp2(m_max - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_sum = l_sum * alpha + tl.sum(p, 1)
    v = tl.load(head_ptr + v_plane + offs[:, None] + dims[None, :], mask=valid[:, None] & dim_ok[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_sum, m_new


def dot_precision(dtype: torch.dtype) -> str:
    """float32 caches get exact float32 products (the default tf32 would lose ~3 digits)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_cache(name: str, kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or not kv_cache.is_contiguous():
        raise ValueError(f"{name}: kv_cache must be a contiguous [2, num_blocks, block_size, Hkv, D], "
                         f"got {tuple(kv_cache.shape)} with strides {kv_cache.stride()}")
    if kv_cache.dtype not in DTYPES:
        raise TypeError(f"{name}: kv_cache must be one of {DTYPES}, got {kv_cache.dtype}")


def check_heads(name: str, label: str, t: torch.Tensor, kv_cache: torch.Tensor) -> None:
    """t must be [rows, Hq, D] with Hq a multiple of Hkv, kv_cache's dtype and device, D contiguous."""
    num_kv, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    if t.dim() != 3 or t.shape[2] != head_dim or t.shape[1] % num_kv or t.shape[1] == 0:
        raise ValueError(f"{name}: {label} must be [rows, Hq, {head_dim}] with Hq a multiple of Hkv={num_kv}, "
                         f"got {tuple(t.shape)}")
    if t.dtype != kv_cache.dtype or t.device != kv_cache.device:
        raise TypeError(f"{name}: {label} must be {kv_cache.dtype} on {kv_cache.device} like kv_cache, "
                        f"got {t.dtype} on {t.device}")
    if t.stride(2) != 1:
        raise ValueError(f"{name}: {label}'s head_dim must be contiguous (stride(2) == 1), got strides {t.stride()}")


def check_index(name: str, label: str, t: torch.Tensor, shape: tuple, kv_cache: torch.Tensor) -> None:
    if t.dtype != torch.int32 or t.device != kv_cache.device:
        raise TypeError(f"{name}: {label} must be int32 on {kv_cache.device}, got {t.dtype} on {t.device}")
    if tuple(t.shape) != shape or (t.dim() and t.stride(-1) != 1):
        raise ValueError(f"{name}: {label} must be {list(shape)} with a contiguous last dim, "
                         f"got {tuple(t.shape)} with strides {t.stride()}")


def check_out(name: str, out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(2) != 1:
        raise ValueError(f"{name}: out must be {tuple(q.shape)} {q.dtype} on {q.device} with stride(2) == 1, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device} with strides {out.stride()}")
    return out


# ---------------------------------------------------------------- decode


@triton.jit
def split_tiles(ctx, window, NUM_SPLITS: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_WINDOW: tl.constexpr):
    """A decode row's keys in tiles: (first key, first tile's position, tiles, tiles per split). A short
    sequence among long ones takes fewer splits (the rest stay unused): each split reads at least
    MIN_SPLIT_TILES tiles, so its partial is worth writing and the long sequences set the pace.
    The decode kernel and the merge both call this, so they agree on which splits hold partials."""
    kv_begin = ctx * 0
    if HAS_WINDOW:
        kv_begin = tl.maximum(ctx - window, 0)
    first = kv_begin // BLOCK_N * BLOCK_N  # tiles start aligned
    num_tiles = tl.cdiv(ctx - first, BLOCK_N)
    return kv_begin, first, num_tiles, tl.maximum(tl.cdiv(num_tiles, NUM_SPLITS), MIN_SPLIT_TILES)


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
                                        SLOT_SIZE, False, False, PRECISION)

    if NUM_SPLITS == 1:
        o = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]  # context 0: zeros
        tl.store(out_ptr + seq * out_stride_b + heads[:, None] * out_stride_h + dims[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:  # partials [B, Hq, S, D] and (m, l) [B, Hq, S, 2] of the used splits
        part = (seq * NUM_HEADS + heads) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=q_mask)
        tl.store(part_ml_ptr + part * 2, m_max, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_sum, mask=row_ok)


ROWS_BY_CONTEXT = 0  # merge_splits: rows with context length 0 get zeros, their partials unread
ROWS_IN_CHUNKS = 1  # merge_splits: only rows cu_seqlens[0] <= row < cu_seqlens[N] (the others are not ours)
ROWS_WITH_CONTEXT = 2  # merge_splits: only rows with context length > 0 (the others are not ours)


@triton.jit
def _merge_splits_kernel(part_acc_ptr, part_ml_ptr, out_ptr, rows_ptr, num_rows, num_seqs, out_stride_b,
                         out_stride_h, window, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                         BLOCK_R: tl.constexpr, ROWS: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr,
                         BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, PDL: tl.constexpr):
    """One program per (BLOCK_R rows, query head): the splits' partials [rows, Hq, S, D] and (m, l)
    folded into the rows' outputs. ROWS says which rows hold partials and which are written (ROWS_*);
    blocks of rows, not single rows, because most rows of a mixed graph's batch hold none. A decode
    row's partials are those of its used splits (split_tiles); a prompt chunk's, all NUM_SPLITS."""
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    head = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    in_batch = row < num_rows
    if ROWS == 1:  # ROWS_IN_CHUNKS
        has_parts = in_batch & (row >= tl.load(rows_ptr)) & (row < tl.load(rows_ptr + num_seqs))
        written = has_parts
        used = tl.where(has_parts, NUM_SPLITS, 0)
    else:  # decode rows: rows_ptr holds their context lengths
        ctx = tl.load(rows_ptr + row, mask=in_batch, other=0)
        has_parts = ctx > 0
        written = in_batch if ROWS == 0 else has_parts  # ROWS_BY_CONTEXT writes the others too, as zeros
        _, _, num_tiles, per_split = split_tiles(ctx, window, NUM_SPLITS, MIN_SPLIT_TILES, BLOCK_N, HAS_WINDOW)
        used = tl.where(has_parts, tl.cdiv(num_tiles, per_split), 0)
    splits = tl.arange(0, SPLITS_PAD)
    base = (row * NUM_HEADS + head) * NUM_SPLITS
    m_max = tl.max(tl.load(part_ml_ptr + (base[:, None] + splits[None, :]) * 2,
                           mask=splits[None, :] < used[:, None], other=-1e30), 1)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    for split in tl.static_range(NUM_SPLITS):
        live = split < used
        m = tl.load(part_ml_ptr + (base + split) * 2, mask=live, other=-1e30)
        weight = tl.exp2(m - m_max)
        total += tl.load(part_ml_ptr + (base + split) * 2 + 1, mask=live, other=0.0) * weight
        acc += tl.load(part_acc_ptr + (base + split)[:, None] * HEAD_DIM + dims[None, :],
                       mask=live[:, None] & (dims < HEAD_DIM)[None, :], other=0.0) * weight[:, None]
    o = acc / tl.where(total > 0, total, 1.0)[:, None]  # rows without partials: zeros
    tl.store(out_ptr + row[:, None] * out_stride_b + head * out_stride_h + dims[None, :],
             o.to(out_ptr.dtype.element_ty), mask=written[:, None] & (dims < HEAD_DIM)[None, :])


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def choose_num_splits(batch: int, num_kv: int, max_context_len: int, sm_count: int) -> int:
    """Enough (sequence, KV head, split) programs for ~4 per SM, no split shorter than 256 tokens; a
    power of two, since NUM_SPLITS is compiled in: a few kernel variants serve every batch size."""
    if batch * num_kv == 0:
        return 1
    wanted = max(1, 4 * sm_count // (batch * num_kv))  # rounded down: 64 x 8 heads on 132 SMs need no split
    splits = max(1, min(wanted, math.ceil(max_context_len / _MIN_SPLIT_TOKENS), _MAX_SPLITS))
    return 1 << (splits.bit_length() - 1)  # rounded down: never shorter splits than asked


def spread_contexts(longest: int, total: int, num_kv: int, sm_count: int) -> bool:
    """Whether one program per (sequence, KV head) would leave the longest sequence's programs walking
    alone: a program streams about a quarter of an SM's share of bandwidth (H200: ~7 of ~32 GB/s), so
    a context longer than the batch's K/V per ~4 program slots an SM sets the kernel's pace
    (bench/gpu_decode_mix.py). total: the batch's context lengths summed."""
    return longest * 4 * sm_count > num_kv * total


def launch_decode(q, kv_cache, block_tables, context_lens, scale, sliding_window, num_splits, out,
                  block_n: int, num_warps: int, num_stages: int, write_empty_rows: bool = True,
                  min_split_tokens: int = _MIN_SPLIT_TOKENS) -> None:
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
        merge_splits(part_acc, part_ml, out, context_lens, 0, ROWS_BY_CONTEXT if write_empty_rows else ROWS_WITH_CONTEXT,
                     split_tiles=(block_n, min_split_tiles, sliding_window), **launch_options(q.device, batch))


def merge_splits(part_acc: torch.Tensor, part_ml: torch.Tensor, out: torch.Tensor, rows: torch.Tensor,
                 num_seqs: int, mode: int, split_tiles: tuple[int, int, int | None] = (1, 1, None),
                 **options) -> None:
    """Launches the merge of split-K partials [R, Hq, S, D] into out [R, Hq, D] (decode and prefill).
    split_tiles: the decode launch's (BLOCK_N, MIN_SPLIT_TILES, sliding window), which say how many
    splits each decode row used."""
    batch, num_heads, num_splits, head_dim = part_acc.shape
    block_n, min_split_tiles, window = split_tiles
    block_r = min(16, triton.next_power_of_2(batch))
    _merge_splits_kernel[(triton.cdiv(batch, block_r), num_heads)](
        part_acc, part_ml, out, rows, batch, num_seqs, out.stride(0), out.stride(1), window or 0,
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), NUM_SPLITS=num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits), BLOCK_R=block_r, ROWS=mode, MIN_SPLIT_TILES=min_split_tiles,
        BLOCK_N=block_n, HAS_WINDOW=bool(window), num_warps=4 if head_dim >= 128 else 2,
        **(options or {"PDL": False}))


def decode_config(head_dim: int, device: torch.device, programs_per_sm: float = 0.0) -> dict:
    """Tile config: 64-token tiles with a 3-stage load pipeline on GPUs; with 8 or more programs per SM
    (large batches), 32-token tiles in 2-warp programs, which keep more loads in flight per SM (H200:
    104 vs 116 us at 256 x 384 tokens of 8B attention, and no slower at 64 rows or one). Bigger tiles
    in the interpreter, where each tile step costs the same whatever its size."""
    if device.type != "cuda":
        return dict(block_n=32, num_warps=4, num_stages=1)
    if programs_per_sm >= 8 and head_dim <= 128:
        return dict(block_n=32, num_warps=2, num_stages=2)
    return dict(block_n=64, num_warps=4, num_stages=3 if head_dim <= 128 else 2)


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                           num_splits: int | None = None, out: torch.Tensor | None = None,
                           max_context_len: int | None = None, write_empty_rows: bool = True,
                           min_split_tokens: int = _MIN_SPLIT_TOKENS) -> torch.Tensor:
    """q [B, Hq, D] (one token per sequence, its K/V already cached) attends to the first
    context_lens[b] tokens (the last `sliding_window` of them when given) -> [B, Hq, D].

    block_tables [B, max_blocks] int32, context_lens [B] int32 (0: padding row, output zeros; with
    write_empty_rows=False such rows of `out` are left as they are).
    max_context_len (a host int; default: what the block table can hold) and the SM count choose
    num_splits when it is None; a sequence splits no finer than min_split_tokens (rounded to whole
    tiles), so short ones leave splits empty. Nothing here reads a device tensor (CUDA-graph safe)."""
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
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * kv_cache.shape[2]
    if sliding_window:
        max_context_len = min(max_context_len, sliding_window)
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_cache.shape[3], max_context_len, sm_count(q.device))
    per_sm = batch * kv_cache.shape[3] * num_splits / sm_count(q.device)
    launch_decode(q, kv_cache, block_tables, context_lens, scale, sliding_window, num_splits, out,
                  **decode_config(q.shape[2], q.device, per_sm), write_empty_rows=write_empty_rows,
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
    o = torch.einsum("bhgl,blhd->bhgd", probs, values).reshape(batch, num_heads, head_dim).to(q.dtype)
    if out is None:
        return o
    if write_empty_rows:
        out.copy_(o)
    else:
        ours = context_lens > 0
        out[ours] = o[ours]
    return out
