"""The model's elementwise operations, each on the device's own path: Triton kernels on CUDA
(tandem.kernels), their plain-torch reference twins elsewhere. The twins compute exactly what
Hugging Face computes, so CPU float32 runs match it bit for bit."""
from __future__ import annotations

import torch

from tandem.kernels import reference as ref

_kernels = None


def _k():
    """tandem.kernels' Triton wrappers, imported on first CUDA use (Triton is not needed on CPUs)."""
    global _kernels
    if _kernels is None:
        from tandem.kernels import activation, cache_write, rmsnorm, rope
        _kernels = {"rms_norm": rmsnorm.rms_norm, "fused_add_rms_norm": rmsnorm.fused_add_rms_norm,
                    "apply_rope": rope.apply_rope, "silu_and_mul": activation.silu_and_mul,
                    "reshape_and_cache": cache_write.reshape_and_cache}
    return _kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual); with no residual, x itself is the residual."""
    if not x.is_cuda:
        if residual is None:
            return ref.rms_norm_ref(x, weight, eps), x
        return ref.fused_add_rms_norm_ref(x, residual, weight, eps)
    shape = x.shape  # the kernels take rows: [..., H] -> [rows, H] (q/k norms are per head)
    if residual is None:
        return _k()["rms_norm"](x.reshape(-1, shape[-1]), weight, eps).view(shape), x
    out, total = _k()["fused_add_rms_norm"](x.reshape(-1, shape[-1]), residual.reshape(-1, shape[-1]), weight, eps)
    return out.view(shape), total.view(shape)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if q.is_cuda:
        _k()["apply_rope"](q, k, positions, cos, sin)
        return q, k
    return ref.apply_rope_ref(q, k, positions, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return (_k()["silu_and_mul"] if x.is_cuda else ref.silu_and_mul_ref)(x)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    (_k()["reshape_and_cache"] if k.is_cuda else ref.reshape_and_cache_ref)(k, v, kv_cache, slot_mapping)
