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


def greedy_advance_ref(logits: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor, input_ids: torch.Tensor,
                       positions: torch.Tensor, context_lens: torch.Tensor, slots: torch.Tensor,
                       block_tables: torch.Tensor, block_size: int, banned: torch.Tensor | None = None,
                       ban_left: torch.Tensor | None = None, step: int = 0) -> None:
    """The greedy step's tail (kernels/greedy.py says what it computes)."""
    logits = logits.float()
    lse = logits.logsumexp(dim=-1)  # before the bans: logprobs are of the raw distribution
    if banned is not None and banned.numel():
        cols = logits[:, banned]
        logits = logits.clone()
        logits[:, banned] = cols.masked_fill((ban_left > step)[:, None], float("-inf"))
    best = logits.argmax(dim=-1)
    tokens.copy_(best)
    logprobs.copy_(logits.gather(1, best[:, None])[:, 0] - lse)
    input_ids.copy_(best)
    positions += 1
    context_lens += 1
    index = positions // block_size
    width = block_tables.shape[1]
    blocks = block_tables.gather(1, index.clamp(max=width - 1)[:, None])[:, 0].long()
    slots.copy_(torch.where(index < width, blocks * block_size + positions % block_size, -1))
