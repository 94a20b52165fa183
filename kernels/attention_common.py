"""What the paged attention kernels share (paged_decode_attention.py, paged_prefill_attention.py): the
fold of one K/V tile into a running softmax, the wrappers' input checks, and split-K: how a decode
row's keys are sliced (`split_tiles`) and the merge of the splits' partials into the output."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.pdl import wait_for_inputs

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634


@triton.jit
def attend_tile(acc, l_sum, m_max, q, q_pos, kv_begin, kv_start, kv_end, table_row, head_ptr, v_plane, dims, dim_ok,
                window, scale_log2, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, SLOT_SIZE: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, BOUNDED: tl.constexpr):
    """Folds keys kv_start + [0, BLOCK_N) that lie in [kv_begin, kv_end) into (acc, l_sum, m_max),
    their K/V read through the block table row. CAUSAL / HAS_WINDOW mask each query row by its
    position q_pos [M]. BOUNDED=False: the caller knows every key of the tile lies in [kv_begin, kv_end)
    (prefill's tiles before the diagonal), so neither the loads nor the scores are masked by it.
    m_max starts at a large finite negative, so fully masked rows get p = 0 instead of NaN."""
    pos = kv_start + tl.arange(0, BLOCK_N)
    if BOUNDED:
        valid = (pos >= kv_begin) & (pos < kv_end)
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    else:
        valid = pos >= 0  # all true: no bound to mask by
        block = tl.load(table_row + pos // BLOCK_SIZE).to(tl.int64)
    offs = (block * BLOCK_SIZE + pos % BLOCK_SIZE) * SLOT_SIZE
    if BOUNDED:
        k = tl.load(head_ptr + offs[None, :] + dims[:, None], mask=valid[None, :] & dim_ok[:, None], other=0.0)
    else:
        k = tl.load(head_ptr + offs[None, :] + dims[:, None], mask=dim_ok[:, None], other=0.0)
    s = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # [M, N], log2 units
    if BOUNDED or CAUSAL or HAS_WINDOW:
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
    if BOUNDED:
        v = tl.load(head_ptr + v_plane + offs[:, None] + dims[None, :], mask=valid[:, None] & dim_ok[None, :],
                    other=0.0)
    else:
        v = tl.load(head_ptr + v_plane + offs[:, None] + dims[None, :], mask=dim_ok[None, :], other=0.0)
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


def merge_splits(part_acc: torch.Tensor, part_ml: torch.Tensor, out: torch.Tensor, rows: torch.Tensor,
                 num_seqs: int, mode: int, decode_splits: tuple[int, int, int | None] = (1, 1, None),
                 **options) -> None:
    """Launches the merge of split-K partials [R, Hq, S, D] into out [R, Hq, D] (decode and prefill).
    decode_splits: the decode launch's (BLOCK_N, MIN_SPLIT_TILES, sliding window), which say how many
    splits each decode row used (split_tiles)."""
    batch, num_heads, num_splits, head_dim = part_acc.shape
    block_n, min_split_tiles, window = decode_splits
    block_r = min(16, triton.next_power_of_2(batch))
    _merge_splits_kernel[(triton.cdiv(batch, block_r), num_heads)](
        part_acc, part_ml, out, rows, batch, num_seqs, out.stride(0), out.stride(1), window or 0,
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), NUM_SPLITS=num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits), BLOCK_R=block_r, ROWS=mode, MIN_SPLIT_TILES=min_split_tiles,
        BLOCK_N=block_n, HAS_WINDOW=bool(window), num_warps=4 if head_dim >= 128 else 2,
        **(options or {"PDL": False}))
