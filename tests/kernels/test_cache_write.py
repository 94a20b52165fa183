"""KV-cache write kernel against its torch twin (Triton's interpreter on CPUs)."""
from __future__ import annotations

import pytest
import torch

from tandem.kernels.cache_write import reshape_and_cache, reshape_and_cache_ref

device = "cuda" if torch.cuda.is_available() else "cpu"
TOKENS = (1, 7, 33, 1000) if device == "cuda" else (1, 7, 33)


def _fused_kv(tokens: int, num_q: int, num_kv: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    """k and v as the model makes them: strided views split from one fused qkv projection."""
    qkv = torch.randn(tokens, (num_q + 2 * num_kv) * head_dim, generator=gen).to(device, dtype)
    q_size, kv_size = num_q * head_dim, num_kv * head_dim
    k = qkv[:, q_size:q_size + kv_size].view(tokens, num_kv, head_dim)
    v = qkv[:, q_size + kv_size:].view(tokens, num_kv, head_dim)
    return k, v


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("num_kv,head_dim,block_size", [(1, 64, 16), (3, 64, 16), (8, 128, 16), (2, 96, 1)])
@pytest.mark.parametrize("tokens", TOKENS)
def test_matches_twin_with_padding(tokens, num_kv, head_dim, block_size, dtype):
    gen = torch.Generator().manual_seed(tokens * 31 + num_kv)
    k, v = _fused_kv(tokens, 4 * num_kv, num_kv, head_dim, dtype, gen)
    num_blocks = tokens // block_size + 4
    cache = torch.randn(2, num_blocks, block_size, num_kv, head_dim, generator=gen).to(device, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    if tokens > 1:
        slots[::3] = -1  # CUDA-graph padding rows
    slots = slots.to(device)
    want = cache.clone()
    reshape_and_cache_ref(k, v, want, slots)
    reshape_and_cache(k, v, cache, slots)
    torch.testing.assert_close(cache, want, rtol=0, atol=0)  # a copy: bit-exact, untouched slots too


def test_block_table_round_trip():
    """Two sequences written through their block tables read back in order; padding writes nowhere."""
    block_size, num_kv, head_dim = 4, 2, 32
    cache = torch.zeros(2, 8, block_size, num_kv, head_dim, device=device)
    tables = {0: [5, 2], 1: [7, 0, 3]}  # sequence -> blocks
    lengths = {0: 6, 1: 9}
    slots = [tables[s][t // block_size] * block_size + t % block_size for s in (0, 1) for t in range(lengths[s])]
    slot_mapping = torch.tensor(slots + [-1, -1], device=device)  # two padding rows
    tokens = len(slot_mapping)
    k = torch.arange(1, tokens + 1, device=device, dtype=torch.float32)[:, None, None].expand(tokens, num_kv, head_dim).contiguous()
    reshape_and_cache(k, -k, cache, slot_mapping)
    row = 0
    for s in (0, 1):
        keys = cache[0, tables[s]].reshape(-1, num_kv, head_dim)[: lengths[s]]
        values = cache[1, tables[s]].reshape(-1, num_kv, head_dim)[: lengths[s]]
        torch.testing.assert_close(keys, k[row:row + lengths[s]], rtol=0, atol=0)
        torch.testing.assert_close(values, -k[row:row + lengths[s]], rtol=0, atol=0)
        row += lengths[s]
    assert not torch.isin(cache, k[-2:, 0, 0]).any() and not torch.isin(cache, -k[-2:, 0, 0]).any(), "padding rows must write nothing"
    assert (cache[:, [1, 4, 6]] == 0).all(), "blocks of no table stay untouched"


def test_int32_slots_and_expanded_inputs():
    """int32 slot mapping; k with a zero head stride (one head broadcast) is read through its strides."""
    cache = torch.zeros(2, 3, 4, 2, 8, device=device)
    k = torch.randn(5, 1, 8, device=device).expand(5, 2, 8)
    v = torch.randn(5, 2, 8, device=device)
    slots = torch.tensor([11, 0, -1, 4, 7], device=device, dtype=torch.int32)
    want = cache.clone()
    reshape_and_cache_ref(k, v, want, slots.long())
    reshape_and_cache(k, v, cache, slots)
    torch.testing.assert_close(cache, want, rtol=0, atol=0)


@pytest.mark.skipif(device != "cuda", reason="real shapes on the GPU only")
def test_bf16_real_shape():
    gen = torch.Generator().manual_seed(0)
    k, v = _fused_kv(8192, 32, 8, 128, torch.bfloat16, gen)
    cache = torch.zeros(2, 1024, 16, 8, 128, device=device, dtype=torch.bfloat16)
    slots = torch.randperm(1024 * 16, generator=gen)[:8192].to(device)
    slots[-100:] = -1
    want = cache.clone()
    reshape_and_cache_ref(k, v, want, slots)
    reshape_and_cache(k, v, cache, slots)
    torch.testing.assert_close(cache, want, rtol=0, atol=0)


def test_wrapper_rejects_bad_inputs():
    cache = torch.zeros(2, 4, 4, 2, 8, device=device)
    k = torch.randn(3, 2, 8, device=device)
    slots = torch.tensor([0, 1, 2], device=device)
    with pytest.raises(ValueError, match=r"k must be \[T, 2, 8\]"):
        reshape_and_cache(k[:, :1], k, cache, slots)
    with pytest.raises(TypeError, match="v must be torch.float32"):
        reshape_and_cache(k, k.half(), cache, slots)
    with pytest.raises(ValueError, match="head_dim must be contiguous"):
        reshape_and_cache(k, torch.randn(3, 8, 2, device=device).transpose(1, 2), cache, slots)
    with pytest.raises(ValueError, match="same number of tokens"):
        reshape_and_cache(k, k, cache, slots[:2])
    with pytest.raises(TypeError, match="slot_mapping must be int64 or int32"):
        reshape_and_cache(k, k, cache, slots.float())
    with pytest.raises(ValueError, match="kv_cache must be a contiguous"):
        reshape_and_cache(k, k, cache.transpose(1, 2), slots)
    with pytest.raises(TypeError, match="kv_cache must be one of"):
        reshape_and_cache(k.double(), k.double(), cache.double(), slots)
