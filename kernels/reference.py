"""Plain-torch reference twins of the elementwise kernels: what CPUs run, and what the kernels are
tested against. No Triton here: this module is imported on machines without it.

Each twin computes exactly what Hugging Face's Llama computes, in the same order, so float32 runs
match transformers bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the sum is rounded to x's dtype before the norm, as
    the model's residual stream is."""
    total = x + residual
    return rms_norm_ref(total, weight, eps), total


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half rotation (Hugging Face's rotate_half); cos/sin: [max_positions, head_dim] float32 tables."""
    c = cos[positions].to(q.dtype)[:, None, :]
    s = sin[positions].to(q.dtype)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * c + rotated * s).to(x.dtype)

    return rotate(q), rotate(k)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def reshape_and_cache_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """Token i's K and V into flat slot slot_mapping[i] of kv_cache [2, blocks, block_size, Hkv, D];
    negative slots are padding and write nothing."""
    _, num_blocks, block_size, num_kv, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv, head_dim)
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)
