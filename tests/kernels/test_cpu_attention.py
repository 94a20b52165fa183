"""The C++ paged decode attention for CPUs (tandem.kernels.cpu) against the torch twin the Triton
kernel shares: mixed lengths around block boundaries (empty rows included), GQA 1/3/4/8, block sizes
16/32, head_dim 16/64/128, sliding window, float32/bf16/fp16, one row (tasks per KV head) and many
(tasks per row); and the engine's CPU attention taking that path for decode rows and prompt chunks."""
from __future__ import annotations

import pytest
import torch

from tandem.engine import attention
from tandem.engine.attention import SeqSlice, TorchAttention
from tandem.kernels import cpu
from tandem.kernels.paged_decode_attention import paged_decode_attention_ref
from tests.kernels.test_paged_decode_attention import paged_cache

TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}
LENS = [1, 15, 16, 17, 31, 32, 33, 0, 150, 47, 1, 64]


pytestmark = pytest.mark.usefixtures("cpu_kernels_built")


@pytest.mark.parametrize("group,num_kv,block_size,head_dim,dtype,window", [
    (1, 2, 16, 64, torch.float32, None),
    (3, 3, 16, 64, torch.bfloat16, None),
    (4, 2, 32, 128, torch.float16, None),
    (8, 1, 16, 16, torch.float32, 20),
    (4, 2, 32, 64, torch.bfloat16, 40),
])
@pytest.mark.parametrize("rows", [1, len(LENS)])
def test_matches_twin(group, num_kv, block_size, head_dim, dtype, window, rows):
    gen = torch.Generator().manual_seed(group * 1000 + block_size + head_dim + rows)
    lens = LENS[-rows:]
    cache, tables = paged_cache(lens, block_size, num_kv, head_dim, dtype, gen)
    cache, tables = cache.cpu(), tables.cpu()
    q = torch.randn(rows, group * num_kv, head_dim, generator=gen).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.long)
    expected = paged_decode_attention_ref(q, cache, tables, ctx, 0.3, window)
    out = torch.full_like(q, float("nan"))
    cpu.paged_decode_attention(out, q, cache, tables, ctx, 0.3, window)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=rtol, atol=atol)
    assert out[[i for i, n in enumerate(lens) if n == 0]].eq(0).all()  # empty rows: zeros, not NaN


def test_scores_hundreds_apart_flush_denormals_inside_the_kernel_only():
    """Scores spread over hundreds give weights whose products with V are denormal; the kernel flushes
    them to zero (they cost a microcode assist each) and still matches the twin, and the caller's
    thread gets its floating-point mode back: denormals survive torch arithmetic after the call."""
    gen = torch.Generator().manual_seed(7)
    lens = [150, 47, 64]
    cache, tables = paged_cache(lens, 16, 2, 64, torch.float32, gen)
    q = torch.randn(3, 4, 64, generator=gen) * 40  # scores ~ N(0, 320^2) at scale 1
    ctx = torch.tensor(lens, dtype=torch.long)
    out = torch.empty_like(q)
    cpu.paged_decode_attention(out, q, cache.cpu(), tables.cpu(), ctx, 1.0, None)
    expected = paged_decode_attention_ref(q, cache.cpu(), tables.cpu(), ctx, 1.0, None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    tiny = torch.tensor([1e-39])  # denormal in float32
    assert (tiny * 3.0).item() > 0 and (tiny + tiny).item() > 0


def test_rejects_what_it_cannot_read():
    q = torch.randn(2, 4, 64)
    cache = torch.randn(2, 4, 16, 2, 64)
    ctx = torch.tensor([3, 5])
    with pytest.raises(RuntimeError, match="int32"):
        cpu.paged_decode_attention(torch.empty_like(q), q, cache, torch.zeros(2, 1, dtype=torch.long), ctx, 1.0, None)
    with pytest.raises(RuntimeError, match="outside the pool"):
        cpu.paged_decode_attention(torch.empty_like(q), q, cache, torch.tensor([[0], [4]], dtype=torch.int32), ctx,
                                   1.0, None)
    with pytest.raises(RuntimeError, match="more than its table"):
        cpu.paged_decode_attention(torch.empty_like(q), q, cache, torch.zeros(2, 1, dtype=torch.int32),
                                   torch.tensor([3, 17]), 1.0, None)
    with pytest.raises(RuntimeError, match="dtype"):
        cpu.paged_decode_attention(torch.empty_like(q), q, cache.half(), torch.zeros(2, 1, dtype=torch.int32), ctx,
                                   1.0, None)


@pytest.mark.parametrize("window", [None, 12])
def test_engine_attention_takes_the_native_path(monkeypatch, window):
    """TorchAttention on CPUs hands decode rows and short prompt chunks (with or without a cached prefix)
    to the kernel in one call, one row per query token; a chunk over NATIVE_MAX_CONTEXT goes to SDPA. It
    agrees with its own gather-and-SDPA path."""
    monkeypatch.setattr(attention, "NATIVE_MAX_CONTEXT", 32)
    gen = torch.Generator().manual_seed(7)
    steps = [(20, 20), (7, 39), (12, 30), (1, 5), (1, 40), (1, 17), (1, 33)]  # (query_len, context_len)
    cache, tables = paged_cache([c for _, c in steps], 16, 2, 64, torch.float32, gen)
    cache = cache.cpu()
    seqs, row = [], 0
    for i, (query_len, context_len) in enumerate(steps):
        seqs.append(SeqSlice(row, query_len, context_len, tables[i, : -(-context_len // 16)].tolist()))
        row += query_len
    q = torch.randn(row, 8, 64, generator=gen)
    native = TorchAttention.build([cache], seqs, torch.zeros(row, dtype=torch.long), 0.125, window, None)
    assert native.native and len(native.decodes) == 1 and native.decodes[0].rows == slice(0, row)
    assert [p.context_len for p in native.prefills] == [39]
    assert native.decodes[0].context_lens[:22].tolist() == list(range(1, 21)) + [0, 0]  # chunk 2: SDPA's
    monkeypatch.setitem(cpu._state, "ok", False)  # as where no compiler is found
    torch_path = TorchAttention.build([cache], seqs, torch.zeros(row, dtype=torch.long), 0.125, window, None)
    assert not torch_path.native
    torch.testing.assert_close(native.attend(cache, q.clone()), torch_path.attend(cache, q.clone()),
                               rtol=1e-5, atol=1e-6)
