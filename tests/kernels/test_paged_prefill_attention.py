"""Paged prefill attention kernel against its torch twin (Triton's interpreter on CPUs): prompt chunks
with and without a cached prefix, not block-aligned, GQA 1/4/8, block sizes 16/32, sliding window;
both twins against the engine's reference backend; on CUDA bf16 at real shapes and against SDPA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.engine.attention import SeqSlice, TorchAttention
from tandem.kernels.paged_decode_attention import paged_decode_attention_ref
from tandem.kernels.paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from tests.kernels.test_paged_decode_attention import (H100_SHARED_MEMORY, HEAD_DIMS, TOL, compile_for_sm90, device,
                                                      fused_q, paged_cache)

# (query_len, context_len): no prefix; prefix 17 (not block-aligned); prefix 32 (aligned); a short
# chunk late in a long context; one token; a chunk crossing several tiles
CHUNKS = [(17, 17), (33, 50), (16, 48), (5, 100), (1, 31), (40, 40)]
if device == "cuda":
    CHUNKS += [(700, 700), (300, 1333)]


def chunk_batch(chunks: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """cu_seqlens_q and context_lens (int32 on the device) and the longest chunk."""
    cu = [0]
    for query_len, _ in chunks:
        cu.append(cu[-1] + query_len)
    as_int32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return as_int32(cu), as_int32([c for _, c in chunks]), max(q for q, _ in chunks)


CASES = [  # group, block_size, dtype, sliding_window
    (1, 16, torch.float32, None),
    (4, 32, torch.float16, None),
    (8, 16, torch.float32, 24),
    (4, 16, torch.float16, 10),
]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group,block_size,dtype,window", CASES)
def test_matches_twin(group, block_size, dtype, window, head_dim):
    gen = torch.Generator().manual_seed(group * 100 + block_size + head_dim)
    num_kv = 2
    cache, tables = paged_cache([c for _, c in CHUNKS], block_size, num_kv, head_dim, dtype, gen)
    cu, ctx, max_query_len = chunk_batch(CHUNKS)
    q = fused_q(int(cu[-1]), group * num_kv, num_kv, head_dim, dtype, gen)
    out = torch.full((q.shape[0], q.shape[1] + 1, head_dim), float("nan"), dtype=dtype, device=device)[:, 1:]
    got = paged_prefill_attention(q, cache, cu, ctx, tables, head_dim ** -0.5, window, out=out,
                                  max_query_len=max_query_len)
    assert got is out
    want = paged_prefill_attention_ref(q, cache, cu, ctx, tables, head_dim ** -0.5, window)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("num_splits,packed,window,block_size", [(1, True, None, 16), (3, False, None, 16),
                                                                  (8, True, None, 16), (3, False, 10, 16),
                                                                  (8, True, 24, 32), (3, True, 10, 32)])
def test_split_keys_and_packed_tiles(num_splits, packed, window, block_size):
    """Prompt lanes' launch: chunks after other rows (decode rows, left untouched), sequences with no
    rows, keys split into slices (more slices than a short chunk has tiles) and tiles numbered across
    chunks, with and without a sliding window (a split boundary among the unmasked keys before the
    window's end: (70, 170) with window 10), 16- and 32-slot blocks; the same answer as the twin.
    max_query_len then bounds all chunks' rows together."""
    gen = torch.Generator().manual_seed(11 + num_splits)
    chunks = [(5, 100), (0, 0), (33, 50), (1, 31), (17, 17), (0, 0), (70, 170)]
    lead, tail = 3, 4  # rows before the first chunk and after the last
    cache, tables = paged_cache([max(c, 1) for _, c in chunks], block_size, 2, 64, torch.float32, gen)
    cu, ctx, _ = chunk_batch(chunks)
    cu += lead
    rows = int(cu[-1]) + tail
    q = fused_q(rows, 8, 2, 64, torch.float32, gen)
    out = torch.full((rows, 8, 64), 7.0, device=device)
    total = sum(n for n, _ in chunks)
    paged_prefill_attention(q, cache, cu, ctx, tables, 0.125, window, out=out, num_splits=num_splits,
                            packed=packed, max_query_len=total if packed else max(n for n, _ in chunks))
    want = paged_prefill_attention_ref(q[lead:lead + total], cache, cu - lead, ctx, tables, 0.125, window)
    torch.testing.assert_close(out[lead:lead + total], want, rtol=1e-4, atol=1e-5)
    assert (out[:lead] == 7).all() and (out[lead + total:] == 7).all(), "rows outside the chunks are not ours"


def test_head_dim_not_power_of_two():
    gen = torch.Generator().manual_seed(2)
    chunks = [(20, 37), (9, 9)]
    cache, tables = paged_cache([c for _, c in chunks], 16, 2, 80, torch.float32, gen)
    cu, ctx, max_query_len = chunk_batch(chunks)
    q = torch.randn(29, 8, 80, generator=gen).to(device)
    got = paged_prefill_attention(q, cache, cu, ctx, tables, 0.1, max_query_len=max_query_len)
    torch.testing.assert_close(got, paged_prefill_attention_ref(q, cache, cu, ctx, tables, 0.1), rtol=1e-4, atol=1e-5)


def test_twins_match_engine_reference_backend():
    """The twins compute what the engine's TorchAttention computes, on a step mixing prompt chunks
    (with and without a prefix) and decode rows, GQA 4:1, sliding window on and off."""
    gen = torch.Generator().manual_seed(11)
    chunks, singles = [(20, 20), (7, 39)], [1, 16, 17, 90]
    lens = [c for _, c in chunks] + singles
    cache, tables = paged_cache(lens, 16, 2, 32, torch.float32, gen)
    seqs, row = [], 0
    for i, (query_len, context_len) in enumerate(chunks + [(1, n) for n in singles]):
        blocks = tables[i, : -(-context_len // 16)].tolist()
        seqs.append(SeqSlice(row, query_len, context_len, blocks))
        row += query_len
    q = torch.randn(row, 8, 32, generator=gen).to(device)
    cu, ctx, _ = chunk_batch(chunks)
    decode_rows = cu[-1].item()
    for window in (None, 12):
        want = TorchAttention.build([cache], seqs, torch.zeros(row, dtype=torch.long), 0.2, window, None).attend(cache, q)
        prefill = paged_prefill_attention_ref(q[:decode_rows], cache, cu, ctx, tables[:2], 0.2, window)
        decode = paged_decode_attention_ref(q[decode_rows:], cache, tables[2:], ctx.new_tensor(singles), 0.2, window)
        torch.testing.assert_close(torch.cat([prefill, decode]), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(device != "cuda", reason="real shapes on the GPU only")
@pytest.mark.parametrize("head_dim,group", [(64, 4), (128, 4), (128, 8)])
@pytest.mark.parametrize("window", (None, 1000))
def test_bf16_real_shapes(head_dim, group, window):
    gen = torch.Generator().manual_seed(head_dim + group)
    chunks = [(512, 512), (2048, 2048), (1000, 3000), (1, 4000), (333, 2333), (512, 4096)]
    num_kv = 8
    cache, tables = paged_cache([c for _, c in chunks], 16, num_kv, head_dim, torch.bfloat16, gen)
    cu, ctx, max_query_len = chunk_batch(chunks)
    q = fused_q(int(cu[-1]), group * num_kv, num_kv, head_dim, torch.bfloat16, gen)
    got = paged_prefill_attention(q, cache, cu, ctx, tables, head_dim ** -0.5, window, max_query_len=max_query_len)
    want = paged_prefill_attention_ref(q.float(), cache.float(), cu, ctx, tables, head_dim ** -0.5, window)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(device != "cuda", reason="real shapes on the GPU only")
def test_matches_sdpa_on_contiguous_kv():
    """Fresh prompts (no prefix), 8B geometry: the same as SDPA's causal attention on the K/V laid
    out contiguously."""
    gen = torch.Generator().manual_seed(5)
    lens = [512, 129, 1024]
    cache, tables = paged_cache(lens, 16, 8, 128, torch.bfloat16, gen)
    cu, ctx, max_query_len = chunk_batch([(n, n) for n in lens])
    q = torch.randn(sum(lens), 32, 128, generator=gen).to(device, torch.bfloat16)
    got = paged_prefill_attention(q, cache, cu, ctx, tables, 128 ** -0.5, max_query_len=max_query_len)
    for n, length in enumerate(lens):
        blocks = tables[n, : -(-length // 16)].long()
        k, v = (cache[i][blocks].reshape(-1, 8, 128)[:length].transpose(0, 1)[None] for i in (0, 1))
        rows = slice(int(cu[n]), int(cu[n + 1]))
        want = F.scaled_dot_product_attention(q[rows].transpose(0, 1)[None], k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(got[rows], want[0].transpose(0, 1), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(device == "cuda", reason="the GPU runs the real thing")
def test_compiles_for_hopper_in_bf16():
    """8B geometry (GQA 4:1, D=128: short and long chunks) and GQA 8:1 at D=64, with the GPU tile configs;
    prompt lanes' launch (split keys, packed tiles)."""
    from tandem.kernels.paged_prefill_attention import prefill_config

    launches = []
    for head_dim, group, window, splits, packed, length in ((128, 4, False, 1, False, 512),
                                                            (128, 4, False, 1, False, 4096),
                                                            (64, 8, True, 1, False, 512), (128, 4, False, 8, True, 64)):
        cfg = prefill_config(head_dim, group, torch.bfloat16, torch.device("cuda"), length, packed)
        launches.append(("tandem.kernels.paged_prefill_attention", "_prefill_kernel",
                         dict(GROUP=group, GROUP_PAD=group, HEAD_DIM=head_dim, SLOT_SIZE=8 * head_dim, BLOCK_D=head_dim,
                              BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_SIZE=16, HAS_WINDOW=window,
                              PRECISION="tf32", NUM_SPLITS=splits, PACKED=packed, SEQS_PAD=16),
                         dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])))
    assert all(0 < shared <= H100_SHARED_MEMORY for shared in compile_for_sm90(launches))


def test_wrapper_rejects_bad_inputs():
    cache = torch.zeros(2, 4, 16, 2, 64, device=device)
    q = torch.randn(5, 4, 64, device=device)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    ctx = torch.tensor([2, 20], dtype=torch.int32, device=device)
    tables = torch.zeros(2, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="q must be \\[rows, Hq, 64\\]"):
        paged_prefill_attention(q[..., :32], cache, cu, ctx, tables, 1.0)
    with pytest.raises(TypeError, match="q must be torch.float32"):
        paged_prefill_attention(q.bfloat16(), cache, cu, ctx, tables, 1.0)
    with pytest.raises(ValueError, match="cu_seqlens_q must be \\[3\\]"):
        paged_prefill_attention(q, cache, cu[:2], ctx, tables, 1.0)
    with pytest.raises(TypeError, match="context_lens must be int32"):
        paged_prefill_attention(q, cache, cu, ctx.long(), tables, 1.0)
    with pytest.raises(ValueError, match="block_tables must be \\[2, 2\\] with a contiguous last dim"):
        paged_prefill_attention(q, cache, cu, ctx, tables.t(), 1.0)
    with pytest.raises(ValueError, match="out must be"):
        paged_prefill_attention(q, cache, cu, ctx, tables, 1.0, out=torch.empty(5, 4, 64, device=device).half())
