"""The model's elementwise operations, each on the device's own path: Triton kernels on CUDA
(tandem.kernels), C++ kernels on CPUs (tandem.kernels.cpu, where they could be built), and their
plain-torch reference twins otherwise. The twins compute exactly what Hugging Face computes; the
C++ kernels round where they do (bit-equal in bf16; in float32 RMSNorm's sum order and SiLU's exp
differ by about an ulp)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from tandem.kernels import cpu
from tandem.kernels import reference as ref

# TANDEM_GEMV=0: batch-1 projections always through cuBLAS (to measure the kernel against it)
_USE_GEMV = os.environ.get("TANDEM_GEMV", "1") != "0"

_kernels = None


def _k():
    """tandem.kernels' Triton wrappers, imported on first CUDA use (Triton is not needed on CPUs)."""
    global _kernels
    if _kernels is None:
        from tandem.kernels import activation, gemv, greedy, pdl, rmsnorm, rope
        _kernels = {"gemv": gemv.gemv, "gemv_config": gemv.config_for, "pdl": pdl.enabled,
                    "rms_norm": rmsnorm.rms_norm,
                    "fused_add_rms_norm": rmsnorm.fused_add_rms_norm,
                    "greedy_advance": greedy.greedy_advance, "rope_and_cache": rope.rope_and_cache,
                    "silu_and_mul": activation.silu_and_mul}
    return _kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual); with no residual, x itself is the residual."""
    if not x.is_cuda:
        if x.dim() == 2 and x.stride(-1) == 1 and cpu.available():
            return cpu.rms_norm(x, weight, eps, residual)
        if residual is None:
            return ref.rms_norm_ref(x, weight, eps), x
        return ref.fused_add_rms_norm_ref(x, residual, weight, eps)
    shape = x.shape  # the kernels take rows: [..., H] -> [rows, H] (q/k norms are per head)
    if residual is None:
        return _k()["rms_norm"](x.reshape(-1, shape[-1]), weight, eps).view(shape), x
    out, total = _k()["fused_add_rms_norm"](x.reshape(-1, shape[-1]), residual.reshape(-1, shape[-1]), weight, eps)
    return out.view(shape), total.view(shape)


def linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias). With `packed` (pack_weight's copy of the weight, which then may be
    gone) oneDNN runs it from the blocked layout; one half-precision token on CUDA goes through the
    batch-1 kernel where it beats cuBLAS for the weight's shape."""
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if x.is_cuda and x.shape[0] == 1 and x.dtype != torch.float32 and _USE_GEMV and x.is_contiguous():
        config = _k()["gemv_config"](*weight.shape, _k()["pdl"](x.device))
        if config is not None:
            return _k()["gemv"](x, weight, bias, config)
    return F.linear(x, weight, bias)


# The row count oneDNN tunes a packed layout for; measured on SmolLM2's shapes, it serves 1 to 2,048
# rows (at 2,048 within 10% of F.linear either way).
PACK_ROWS_HINT = 64


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a CPU bf16/fp16 weight [out, in], or None where it does not apply.

    F.linear hands oneDNN the plain [out, in] weight, which it reorders into its blocked layout on every
    call; packing once makes decode's few-row GEMMs about twice as fast (SmolLM2, 64 rows: 0.47-0.61 of
    F.linear's time; 1 row: ~0.45) with bit-equal results. Float32 keeps F.linear: oneDNN's sums
    differ from MKL's, which Hugging Face's reference runs share."""
    if (weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16)
            or not torch.backends.mkldnn.is_available()):
        return None
    try:  # oneDNN runs half precision only where the CPU has the instructions for it
        supported = (torch.ops.mkldnn._is_mkldnn_bf16_supported() if weight.dtype == torch.bfloat16
                     else torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a torch build without these ops
        return None
    if not supported:
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotates q and k, writes k and v into the cache at slot_mapping; returns the rotated q."""
    if q.is_cuda:
        return _k()["rope_and_cache"](q, k, v, positions, cos, sin, kv_cache, slot_mapping)
    if cpu.available():
        return cpu.rope_and_cache(q, k, v, positions, cos, sin, kv_cache, slot_mapping)
    q, k = ref.apply_rope_ref(q, k, positions, cos, sin)
    ref.reshape_and_cache_ref(k, v, kv_cache, slot_mapping)
    return q


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        return _k()["silu_and_mul"](x)
    return cpu.silu_and_mul(x) if x.dim() == 2 and x.stride(-1) == 1 and cpu.available() else ref.silu_and_mul_ref(x)


def greedy_advance(logits: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor, input_ids: torch.Tensor,
                   positions: torch.Tensor, context_lens: torch.Tensor, slots: torch.Tensor,
                   block_tables: torch.Tensor, block_size: int, banned: torch.Tensor | None = None,
                   ban_left: torch.Tensor | None = None, step: int = 0) -> None:
    """A greedy decode step's tokens and logprobs, and the rows' next inputs (kernels/greedy.py)."""
    fn = _k()["greedy_advance"] if logits.is_cuda else ref.greedy_advance_ref
    fn(logits, tokens, logprobs, input_ids, positions, context_lens, slots, block_tables, block_size, banned,
       ban_left, step)
