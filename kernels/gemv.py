"""One token through a linear layer: y [1, N] = x [1, K] @ W [N, K]^T (+ bias), for batch-1 decode,
where the step is a stream of weight reads. `config_for` says where it beats cuBLAS (bench/gpu_gemv.py,
H200, 8B shapes, every call reading a cold weight): o_proj 11.3 vs 12.5 us, gate_up 58.1 vs 60.8 us,
lm_head 241 vs 270 us; alone, cuBLAS stays ahead on qkv (15.1 vs 16.6) and down (31.2 vs 34.2), but
in a decode step under programmatic dependent launch (kernels/pdl.py) the GEMV wins those too: its
weight stream starts before the kernel ahead of it has finished (bench/gpu_step.py, 8B 1x576: step
4.373 ms without PDL, 4.319 with, 4.280 with GEMV on every projection).

One program per BLOCK_N output features, over the whole of K: each reads its rows of W once, in
BLOCK_K-wide row segments, and keeps a [BLOCK_N, BLOCK_K] float32 partial product, summed once at
the end. Half precision only (float32 models keep cuBLAS, whose results transformers shares)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.pdl import launch_options, wait_for_inputs

__all__ = ["gemv", "GemvConfig", "config_for"]

GemvConfig = tuple[int, int, int, int]  # block_n, block_k, num_warps, num_stages
SQUARE: GemvConfig = (4, 512, 4, 4)  # N, K <= 4096: few rows per program, long row segments
WIDE: GemvConfig = (16, 128, 8, 4)  # N >= 16384: many programs already
MID: GemvConfig = (8, 128, 8, 2)  # qkv-like: 4096 < N < 16384
TALL: GemvConfig = (4, 512, 8, 2)  # down-like: K > 8192


def config_for(n: int, k: int, pdl: bool = False) -> GemvConfig | None:
    """The measured winner's tiles for a weight of [n, k], or None where cuBLAS is faster (with
    `pdl`, launches that may overlap the kernel before them: the GEMV wins every shape)."""
    if n <= 4096 and k <= 4096:
        return SQUARE
    if n >= 16384 and k <= 8192:
        return WIDE
    if pdl:
        return TALL if k > 8192 else MID
    return None


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, K, w_stride, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_row = w_ptr + rows.to(tl.int64)[:, None] * w_stride
    # The first segment is requested before waiting for x: under PDL the weight stream starts while
    # the kernel before this one drains. (Requesting more of them, as one [PRE, BLOCK_N, BLOCK_K]
    # load, made the 8B step 1.7-4x slower.)
    w = tl.load(w_row + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
    wait_for_inputs(PDL)
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    acc = w * x[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + cols
        k_ok = k < K
        x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_row + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += w * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig = WIDE) -> torch.Tensor:
    """x [1, K] (contiguous), weight [N, K] (rows contiguous), bias [N] or None -> [1, N] in x's dtype."""
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        raise TypeError(f"gemv: x and weight must share float16 or bfloat16, got {x.dtype} and {weight.dtype}")
    if x.dim() != 2 or x.shape[0] != 1 or not x.is_contiguous():
        raise ValueError(f"gemv: x must be a contiguous [1, K], got {tuple(x.shape)} with strides {x.stride()}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.stride(1) != 1:
        raise ValueError(f"gemv: weight must be [N, {x.shape[1]}] with contiguous rows, got {tuple(weight.shape)} "
                         f"with strides {weight.stride()}")
    if bias is not None and (bias.shape != (weight.shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"gemv: bias must be a contiguous [{weight.shape[0]}], got {tuple(bias.shape)}")
    n, k = weight.shape
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps, num_stages = config
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, bias if bias is not None else x, out, n, k,
                                             weight.stride(0), HAS_BIAS=bias is not None, BLOCK_N=block_n,
                                             BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
                                             **launch_options(x.device, 1))
    return out
