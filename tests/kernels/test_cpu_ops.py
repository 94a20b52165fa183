"""The C++ elementwise kernels for CPUs (tandem.kernels.cpu) against their torch twins: RoPE fused with
the cache write is bit-equal in every dtype (padding slots write nothing); RMSNorm (with and without
the residual add) and SiLU-and-multiply are bit-equal in bf16, and within an ulp in float32, where
only the norm's sum order and SiLU's exp differ; rows may be strided views of a fused projection."""
from __future__ import annotations

import pytest
import torch

from tandem.kernels import cpu
from tandem.kernels.reference import (apply_rope_ref, fused_add_rms_norm_ref, reshape_and_cache_ref, rms_norm_ref,
                                      silu_and_mul_ref)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


pytestmark = pytest.mark.usefixtures("cpu_kernels_built")


def exact_or_close(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    elif got.dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:  # float16: the float32 sum order can move a value across a rounding boundary, rarely
        assert (got != want).float().mean() < 1e-3
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tables_dtype", ["float32", "same"])
def test_rope_and_cache_bit_equal(dtype, tables_dtype):
    gen = torch.Generator().manual_seed(1)
    tokens, num_q, num_kv, dim = 37, 9, 3, 64
    qkv = torch.randn(tokens, (num_q + 2 * num_kv) * dim, generator=gen).to(dtype)
    q, k, v = qkv.split([num_q * dim, num_kv * dim, num_kv * dim], dim=-1)  # strided views, as the model has
    q, k, v = q.view(tokens, num_q, dim), k.view(tokens, num_kv, dim), v.view(tokens, num_kv, dim)
    positions = torch.randint(0, 1000, (tokens,), generator=gen)
    cos, sin = torch.randn(1024, dim, generator=gen), torch.randn(1024, dim, generator=gen)
    if tables_dtype == "same":
        cos, sin = cos.to(dtype), sin.to(dtype)
    slots = torch.randperm(8 * 16, generator=gen)[:tokens]
    slots[[3, 20]] = -1
    cache = torch.full((2, 8, 16, num_kv, dim), 7.0, dtype=dtype)
    want_cache = cache.clone()
    got_q = cpu.rope_and_cache(q, k, v, positions, cos, sin, cache, slots)
    want_q, want_k = apply_rope_ref(q, k, positions, cos, sin)
    reshape_and_cache_ref(want_k, v, want_cache, slots)
    assert torch.equal(got_q, want_q)
    assert torch.equal(cache, want_cache)  # padding slots left their 7.0s alone


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(33, 3 * 576, generator=gen).to(dtype)
    x = wide[:, 576:1152]  # rows 3 * 576 apart
    weight = torch.randn(576, generator=gen).to(dtype)
    if with_residual:
        residual = torch.randn(33, 576, generator=gen).to(dtype)
        got, got_total = cpu.rms_norm(x, weight, 1e-5, residual)
        want, want_total = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
        assert torch.equal(got_total, want_total)
    else:
        got, total = cpu.rms_norm(x, weight, 1e-5)
        want = rms_norm_ref(x, weight, 1e-5)
        assert total is x
    exact_or_close(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(29, 2 * 1536, generator=gen) * 6).to(dtype)  # reaches exp's clamped ends too
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0]).to(dtype)
    exact_or_close(cpu.silu_and_mul(x), silu_and_mul_ref(x))


def test_rejects_what_it_cannot_read():
    q = torch.randn(2, 4, 64)
    k = v = torch.randn(2, 2, 64)
    cache = torch.zeros(2, 1, 16, 2, 64)
    tables = torch.randn(8, 64)
    with pytest.raises(RuntimeError, match="past the cache"):
        cpu.rope_and_cache(q, k, v, torch.tensor([0, 1]), tables, tables, cache, torch.tensor([0, 16]))
    with pytest.raises(RuntimeError, match="outside the tables"):
        cpu.rope_and_cache(q, k, v, torch.tensor([0, 8]), tables, tables, cache, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        cpu.silu_and_mul(torch.zeros(2, 8, dtype=torch.float64))
