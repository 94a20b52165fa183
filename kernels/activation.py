"""SiLU-and-multiply for the fused gate/up projection: x [T, 2I] (gate first, up second) -> [T, I].

Rounded where the torch twin (and Hugging Face's `act(gate) * up`) rounds: silu(gate), computed as
torch computes it, x / (1 + exp(-x)), then the product; so half-precision outputs equal the twin's."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.pdl import launch_options, wait_for_inputs
from tandem.kernels.reference import silu_and_mul_ref

__all__ = ["silu_and_mul", "silu_and_mul_ref"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    out = act * up
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:] -> [T, I] in x's dtype; x's rows may be strided."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"silu_and_mul: x must be one of {_DTYPES}, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"silu_and_mul: x must be [T, 2 * I], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"silu_and_mul: x rows must be contiguous (stride(1) == 1), got strides {x.stride()}")
    tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(tokens, inter, dtype=x.dtype, device=x.device)
    if tokens == 0 or inter == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(tokens, triton.cdiv(inter, block))](x, out, x.stride(0), out.stride(0), inter,
                                                              BLOCK=block, num_warps=4,
                                                              enable_fp_fusion=False,  # rope.py says why
                                                              **launch_options(x.device, tokens))
    return out
