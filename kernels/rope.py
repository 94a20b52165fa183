"""Rotary position embedding in place on q and k: Hugging Face's half rotation (neox style),
x * cos + rotate_half(x) * sin, with cos/sin rows [max_positions, head_dim] looked up by each token's
position. Tables are float32, or half precision as `model.to(dtype)` leaves the engine's buffers (read
and widened). The arithmetic rounds where the torch twin (and Hugging Face, and vLLM's kernel) round in
half precision: the table values, each product, the sum; so bf16 outputs equal the twin's. That
holds on a GPU only with fused multiply-adds off (`enable_fp_fusion=False`): with them on, the compiler
turns each product and the sum after it into one bf16 `fma`, which rounds once where torch rounds twice.

q and k may be strided views of one fused qkv tensor: they are read and written through their strides.
One program per token rotates all of its q heads, then all of its k heads. Positions are not checked
against the table's length (that would read the device on the host): callers keep them in range.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.cache_write import check_cache_write
from tandem.kernels.pdl import launch_options, wait_for_inputs
from tandem.kernels.reference import apply_rope_ref

__all__ = ["apply_rope", "apply_rope_ref", "rope_and_cache"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEADS_PER_TILE = 16  # bounds registers for models with many heads; the rest loop
_HEADS_PER_PROGRAM = 8  # rope_and_cache: 8B's 32 + 8 heads are 5 programs per token
LAUNCH_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}  # no fused multiply-adds: see the docstring


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, src_stride_h, dst_stride_h, num_heads, c1, c2, s1, s2, dims, dim_mask,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate heads [0, num_heads) of one token from src into dst (the same place, or a cache slot);
    c1/s1 are the first half's cos/sin, c2/s2 the second's. Each product and the sum are rounded to
    the dtype as torch's `x * cos + rotate_half(x) * sin` rounds them (exact in float32)."""
    dtype = dst_ptr.dtype.element_ty
    for h0 in range(0, num_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads[:, None] < num_heads) & dim_mask[None, :]
        src = src_ptr + heads[:, None] * src_stride_h + dims[None, :]
        dst = dst_ptr + heads[:, None] * dst_stride_h + dims[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        first = _rounded(x1 * c1[None, :], dtype) - _rounded(x2 * s1[None, :], dtype)
        second = _rounded(x2 * c2[None, :], dtype) + _rounded(x1 * s2[None, :], dtype)
        tl.store(dst, first.to(dtype), mask=mask)
        tl.store(dst + HALF, second.to(dtype), mask=mask)


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    return x.to(dtype).to(tl.float32)


@triton.jit
def _cos_sin(pos_ptr, cos_ptr, sin_ptr, token, table_stride, dims, dim_mask, dtype: tl.constexpr,
             HALF: tl.constexpr):
    """The token's table rows, rounded to the activation dtype as the twin's `cos.to(q.dtype)` does."""
    row = tl.load(pos_ptr + token).to(tl.int64) * table_stride
    # Both halves of the tables are read (not assumed equal), exactly as the twin does.
    c1 = _rounded(tl.load(cos_ptr + row + dims, mask=dim_mask, other=0.0).to(tl.float32), dtype)
    c2 = _rounded(tl.load(cos_ptr + row + HALF + dims, mask=dim_mask, other=0.0).to(tl.float32), dtype)
    s1 = _rounded(tl.load(sin_ptr + row + dims, mask=dim_mask, other=0.0).to(tl.float32), dtype)
    s2 = _rounded(tl.load(sin_ptr + row + HALF + dims, mask=dim_mask, other=0.0).to(tl.float32), dtype)
    return c1, c2, s1, s2


@triton.jit
def _rope_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, q_stride_t, q_stride_h, k_stride_t, k_stride_h,
                 num_q, num_kv, table_stride, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                 PDL: tl.constexpr):
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HALF
    c1, c2, s1, s2 = _cos_sin(pos_ptr, cos_ptr, sin_ptr, token, table_stride, dims, dim_mask,
                              q_ptr.dtype.element_ty, HALF)
    q = q_ptr + token * q_stride_t
    k = k_ptr + token * k_stride_t
    _rotate_heads(q, q, q_stride_h, q_stride_h, num_q, c1, c2, s1, s2, dims, dim_mask, HALF, BLOCK_H)
    _rotate_heads(k, k, k_stride_h, k_stride_h, num_kv, c1, c2, s1, s2, dims, dim_mask, HALF, BLOCK_H)


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr, q_stride_t, q_stride_h,
                       k_stride_t, k_stride_h, v_stride_t, v_stride_h, num_q, num_kv, table_stride, v_plane,
                       HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_HD: tl.constexpr, PDL: tl.constexpr):
    """One program per (token, group of BLOCK_H heads): q groups first, rotated in place; then k groups,
    rotated straight into the token's cache slot, their v heads copied beside them (a negative slot is
    padding: neither is written). Head groups in parallel keep a one-token step short."""
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    q_groups = tl.cdiv(num_q, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HALF
    c1, c2, s1, s2 = _cos_sin(pos_ptr, cos_ptr, sin_ptr, token, table_stride, dims, dim_mask,
                              q_ptr.dtype.element_ty, HALF)
    if group < q_groups:
        first = group * BLOCK_H
        q = q_ptr + token * q_stride_t + first * q_stride_h
        _rotate_heads(q, q, q_stride_h, q_stride_h, tl.minimum(num_q - first, BLOCK_H), c1, c2, s1, s2, dims,
                      dim_mask, HALF, BLOCK_H)
    else:
        first = (group - q_groups) * BLOCK_H
        slot = tl.load(slot_ptr + token).to(tl.int64)
        heads = tl.where(slot >= 0, tl.minimum(num_kv - first, BLOCK_H), 0)  # padding: no head in range
        dst = cache_ptr + slot * (num_kv * HEAD_DIM) + first * HEAD_DIM
        _rotate_heads(k_ptr + token * k_stride_t + first * k_stride_h, dst, k_stride_h, HEAD_DIM, heads, c1, c2, s1,
                      s2, dims, dim_mask, HALF, BLOCK_H)
        idx = tl.arange(0, BLOCK_HD)
        mask = idx < heads * HEAD_DIM
        v = tl.load(v_ptr + token * v_stride_t + (first + idx // HEAD_DIM) * v_stride_h + idx % HEAD_DIM, mask=mask)
        tl.store(dst + v_plane + idx, v, mask=mask)


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        raise TypeError(f"apply_rope: q and k must share one of {_DTYPES}, got {q.dtype} and {k.dtype}")
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or q.shape[2] % 2:
        raise ValueError(f"apply_rope: q must be [T, Hq, D] and k [T, Hkv, D] with an even D, "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError(f"apply_rope: head_dim must be contiguous (stride(2) == 1), got q strides {q.stride()}, "
                         f"k strides {k.stride()}")
    if positions.shape != (q.shape[0],) or not positions.is_contiguous():
        raise ValueError(f"apply_rope: positions must be a contiguous [{q.shape[0]}], got {tuple(positions.shape)}")
    if positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"apply_rope: positions must be int64 or int32, got {positions.dtype}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[1] != q.shape[2] or not table.is_contiguous():
            raise ValueError(f"apply_rope: {name} must be a contiguous [max_positions, {q.shape[2]}], "
                             f"got {tuple(table.shape)}")
    if cos.dtype not in _DTYPES or sin.dtype != cos.dtype:
        raise TypeError(f"apply_rope: cos and sin must share one of {_DTYPES}, got {cos.dtype} and {sin.dtype}")
    if sin.shape != cos.shape:
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    devices = {t.device for t in (q, k, positions, cos, sin)}
    if len(devices) != 1:
        raise ValueError(f"apply_rope: all tensors must be on one device, got {sorted(map(str, devices))}")


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place by positions [T]; returns (q, k)."""
    _check(q, k, positions, cos, sin)
    if q.shape[0] == 0:
        return q, k
    half = q.shape[2] // 2
    block_h = min(_MAX_HEADS_PER_TILE, triton.next_power_of_2(max(q.shape[1], k.shape[1])))
    _rope_kernel[(q.shape[0],)](q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                q.shape[1], k.shape[1], cos.stride(0), HALF=half,
                                BLOCK_D=triton.next_power_of_2(half), BLOCK_H=block_h, **LAUNCH_OPTIONS,
                                **launch_options(q.device, q.shape[0]))
    return q, k


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """apply_rope then reshape_and_cache in one launch: q [T, Hq, D] is rotated in place (and returned);
    rotated k and v go to kv_cache at slot_mapping (k itself is left as it was)."""
    _check(q, k, positions, cos, sin)
    check_cache_write(k, v, kv_cache, slot_mapping)
    if q.shape[0] == 0:
        return q
    half = q.shape[2] // 2
    block_h = min(_HEADS_PER_PROGRAM, triton.next_power_of_2(max(q.shape[1], k.shape[1])))
    groups = triton.cdiv(q.shape[1], block_h) + triton.cdiv(k.shape[1], block_h)
    _rope_cache_kernel[(q.shape[0], groups)](
        q, k, v, positions, cos, sin, kv_cache, slot_mapping, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), q.shape[1], k.shape[1], cos.stride(0), kv_cache.stride(0), HEAD_DIM=q.shape[2],
        HALF=half, BLOCK_D=triton.next_power_of_2(half), BLOCK_H=block_h,
        BLOCK_HD=triton.next_power_of_2(block_h * q.shape[2]), **LAUNCH_OPTIONS,
        **launch_options(q.device, q.shape[0]))
    return q
