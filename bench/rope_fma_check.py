"""How much the H200's contracted RoPE cost the bf16 agreement target, measured on CPUs: `gpu_check.py
--model` with the engine's RoPE rounded as the sm_90 build did before kernels/rope.py turned fused
multiply-adds off (one product of each rotated pair fused with the sum into one bf16 fma: the exact
product, one rounding, where torch rounds the product and then the sum).

    python bench/rope_fma_check.py [--out DIR]   (~7 min on 2 cores; compare with gpu_check.py --model)

On SmolLM2 (results/cpu-check-model-20261205-031401-rope-fma-emulated.json against
cpu-check-model-20261204-235750.json): ours vs transformers bf16 0.9761 (0.9879 decided) with the fma,
0.9795 (0.9917) without.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check  # noqa: E402

from tandem.engine import ops  # noqa: E402
from tandem.kernels import reference as ref  # noqa: E402


def fused_rope(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin as the fma build computed it: first = fma(x1, c1, -round(x2 * s1)),
    second = fma(x2, c2, round(x1 * s2)), each rounded once to x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].double(), x[..., half:].double()
    c1, c2, s1, s2 = c[..., :half].double(), c[..., half:].double(), s[..., :half].double(), s[..., half:].double()
    first = x1 * c1 - (x2 * s1).to(x.dtype).double()
    second = x2 * c2 + (x1 * s2).to(x.dtype).double()
    return torch.cat((first, second), -1).to(x.dtype)


def rope_and_cache(q, k, v, positions, cos, sin, kv_cache, slot_mapping):
    if q.dtype != torch.bfloat16:  # float32 is exact either way
        return exact(q, k, v, positions, cos, sin, kv_cache, slot_mapping)
    c, s = cos[positions].to(q.dtype)[:, None, :], sin[positions].to(q.dtype)[:, None, :]
    q, k = fused_rope(q, c, s), fused_rope(k, c, s)
    ref.reshape_and_cache_ref(k, v, kv_cache, slot_mapping)
    return q


exact = ops.rope_and_cache
ops.rope_and_cache = rope_and_cache  # the attention layers call it through the module

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "--model", *sys.argv[1:]]
    raise SystemExit(gpu_check.main())
