"""KV-cache write (reshape-and-cache): token i's K and V into flat slot slot_mapping[i] of
kv_cache [2, num_blocks, block_size, Hkv, D]; a negative slot is padding (CUDA-graph padding rows)
and writes nothing.

k and v are usually strided views split from one fused qkv projection: the kernel reads them through
their strides instead of copying. One program per (token, tile of the token's Hkv * D values)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.pdl import launch_options, wait_for_inputs
from tandem.kernels.reference import reshape_and_cache_ref

__all__ = ["reshape_and_cache", "reshape_and_cache_ref"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 1024


@triton.jit
def _reshape_and_cache_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                              v_plane, HEAD_DIM: tl.constexpr, TOKEN_SIZE: tl.constexpr, BLOCK: tl.constexpr,
                              PDL: tl.constexpr):
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    # padding: nothing in range (one comparison: the interpreter mistypes `tensor & scalar` masks)
    mask = idx < tl.where(slot >= 0, TOKEN_SIZE, 0)
    head, dim = idx // HEAD_DIM, idx % HEAD_DIM
    k = tl.load(k_ptr + token * k_stride_t + head * k_stride_h + dim, mask=mask)
    v = tl.load(v_ptr + token * v_stride_t + head * v_stride_h + dim, mask=mask)
    dst = cache_ptr + slot * TOKEN_SIZE + idx  # one slot is Hkv * D contiguous values
    tl.store(dst, k, mask=mask)
    tl.store(dst + v_plane, v, mask=mask)


def _check_token_rows(name: str, t: torch.Tensor, cache: torch.Tensor) -> None:
    _, _, _, num_kv, head_dim = cache.shape
    if t.dim() != 3 or t.shape[1:] != (num_kv, head_dim):
        raise ValueError(f"reshape_and_cache: {name} must be [T, {num_kv}, {head_dim}] to match kv_cache "
                         f"{tuple(cache.shape)}, got {tuple(t.shape)}")
    if t.dtype != cache.dtype or t.device != cache.device:
        raise TypeError(f"reshape_and_cache: {name} must be {cache.dtype} on {cache.device} like kv_cache, "
                        f"got {t.dtype} on {t.device}")
    if head_dim > 1 and t.stride(2) != 1:
        raise ValueError(f"reshape_and_cache: {name}'s head_dim must be contiguous (stride(2) == 1), "
                         f"got strides {t.stride()}")


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] (strided views allowed) -> kv_cache[0/1] at slot_mapping [T] (int64/int32, < 0 skipped)."""
    check_cache_write(k, v, kv_cache, slot_mapping)
    tokens = k.shape[0]
    if tokens == 0:
        return
    token_size = kv_cache.shape[3] * kv_cache.shape[4]
    block = min(_BLOCK, triton.next_power_of_2(token_size))
    _reshape_and_cache_kernel[(tokens, triton.cdiv(token_size, block))](
        k, v, kv_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1), kv_cache.stride(0),
        HEAD_DIM=kv_cache.shape[4], TOKEN_SIZE=token_size, BLOCK=block, num_warps=4,
        **launch_options(k.device, tokens))


def check_cache_write(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or not kv_cache.is_contiguous():
        raise ValueError("reshape_and_cache: kv_cache must be a contiguous [2, num_blocks, block_size, Hkv, D], "
                         f"got {tuple(kv_cache.shape)} with strides {kv_cache.stride()}")
    if kv_cache.dtype not in _DTYPES:
        raise TypeError(f"reshape_and_cache: kv_cache must be one of {_DTYPES}, got {kv_cache.dtype}")
    _check_token_rows("k", k, kv_cache)
    _check_token_rows("v", v, kv_cache)
    tokens = k.shape[0]
    if v.shape[0] != tokens or slot_mapping.shape != (tokens,) or not slot_mapping.is_contiguous():
        raise ValueError(f"reshape_and_cache: k {tuple(k.shape)}, v {tuple(v.shape)} and slot_mapping "
                         f"{tuple(slot_mapping.shape)} (contiguous) must have the same number of tokens")
    if slot_mapping.dtype not in (torch.int64, torch.int32) or slot_mapping.device != kv_cache.device:
        raise TypeError(f"reshape_and_cache: slot_mapping must be int64 or int32 on {kv_cache.device}, "
                        f"got {slot_mapping.dtype} on {slot_mapping.device}")
