"""RMSNorm, alone and fused with the residual add: one program per row, the whole row in registers.

Math follows Hugging Face's order: the sum x + residual is rounded to the activation dtype (the
model's residual stream lives in it), the norm runs in float32, is cast back to the activation dtype,
then multiplied by the weight (rounded once more, as torch's `weight * h.to(dtype)` is).

`fused_add_rms_norm` writes the sum into `residual` in place and returns a new output tensor; x is
left untouched (so a caller may still read it, and CUDA graphs see no aliasing between x and out).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.pdl import launch_options, wait_for_inputs
from tandem.kernels.reference import fused_add_rms_norm_ref, rms_norm_ref

__all__ = ["rms_norm", "fused_add_rms_norm", "rms_norm_ref", "fused_add_rms_norm_ref"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, x_stride, res_stride, out_stride, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        res_row = res_ptr + row * res_stride + cols
        total = (x.to(tl.float32) + tl.load(res_row, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(res_row, total, mask=mask)
        x = total
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / hidden + eps)
    normed = (h * rstd).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (normed * w).to(dtype), mask=mask)


def _num_warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def _check_rows(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.dim() != 2 or t.shape != x.shape:
        raise ValueError(f"{name} must be [T, H] like x {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.dtype != x.dtype or t.device != x.device:
        raise TypeError(f"{name} must be {x.dtype} on {x.device} like x, got {t.dtype} on {t.device}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} rows must be contiguous (stride(1) == 1), got strides {t.stride()}")


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype not in _DTYPES:
        raise TypeError(f"rms_norm: x must be one of {_DTYPES}, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"rms_norm: x must be [T, H], got {tuple(x.shape)}")
    _check_rows("x", x, x)
    if residual is not None:
        _check_rows("residual", residual, x)
    if weight.shape != (x.shape[1],) or weight.dtype != x.dtype or weight.stride(0) != 1:
        raise ValueError(f"rms_norm: weight must be contiguous [{x.shape[1]}] {x.dtype}, "
                         f"got {tuple(weight.shape)} {weight.dtype}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[0] == 0:
        return out
    block = triton.next_power_of_2(x.shape[1])
    res = residual if residual is not None else x  # unused when HAS_RESIDUAL is off
    # no fused multiply-adds (rope.py says why): the sum and the products round where the twin's do
    _rms_norm_kernel[(x.shape[0],)](x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), x.shape[1],
                                    eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                                    num_warps=_num_warps(block), enable_fp_fusion=False,
                                    **launch_options(x.device, x.shape[0]))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> rmsnorm(x) * weight, [T, H] in x's dtype."""
    return _launch(x, None, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, residual); `residual` is overwritten with x + residual."""
    return _launch(x, residual, weight, eps), residual
