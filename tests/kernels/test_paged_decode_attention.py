"""Paged decode attention kernel against its torch twin (Triton's interpreter on CPUs): mixed lengths
around block boundaries, GQA 1/4/8, block sizes 16/32, split-K on and off, sliding window, padding
rows; on CUDA also bf16 at real shapes and a CUDA-graph replay."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tandem.kernels.paged_decode_attention import (choose_num_splits, paged_decode_attention,
                                                   paged_decode_attention_ref, spread_contexts)

device = "cuda" if torch.cuda.is_available() else "cpu"
# (rtol, atol): the kernel rounds the probabilities to the dtype before P @ V
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
LENS = [1, 15, 16, 17, 31, 32, 33, 0, 150] + ([1000, 2049] if device == "cuda" else [])
HEAD_DIMS = (64, 128) if device == "cuda" else (64,)


def paged_cache(lens: list[int], block_size: int, num_kv: int, head_dim: int, dtype: torch.dtype,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random cache and block tables: every sequence's blocks drawn in shuffled order from one pool
    (a few spare blocks of garbage among them). What no sequence may read is NaN, so a kernel that
    reads it without masking it out fails: the slots past each sequence's length in its last block, and
    the block that pads the tables."""
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 3
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    cache = torch.randn(2, num_blocks, block_size, num_kv, head_dim, generator=gen)
    padding = pool.pop()
    cache[:, padding] = float("nan")
    tables = torch.full((len(lens), max(needed) + 1), padding, dtype=torch.int32)
    for row, (count, length) in enumerate(zip(needed, lens)):
        tables[row, :count] = torch.tensor(pool[:count], dtype=torch.int32)
        if count:
            cache[:, pool[count - 1], length - (count - 1) * block_size:] = float("nan")
        pool = pool[count:]
    return cache.to(device, dtype), tables.to(device)


def fused_q(rows: int, num_heads: int, num_kv: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    """q as the model makes it: a strided view of one fused qkv projection."""
    qkv = torch.randn(rows, (num_heads + 2 * num_kv) * head_dim, generator=gen).to(device, dtype)
    return qkv[:, : num_heads * head_dim].view(rows, num_heads, head_dim)


CASES = [  # group, block_size, dtype, num_splits, sliding_window
    (1, 16, torch.float32, 1, None),
    (4, 32, torch.float16, 3, None),
    (8, 16, torch.float16, None, None),
    (4, 16, torch.float32, 4, 40),
    (8, 32, torch.float32, 1, 20),
]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group,block_size,dtype,num_splits,window", CASES)
def test_matches_twin(group, block_size, dtype, num_splits, window, head_dim):
    gen = torch.Generator().manual_seed(group * 100 + block_size + head_dim)
    num_kv = 2
    cache, tables = paged_cache(LENS, block_size, num_kv, head_dim, dtype, gen)
    lens = torch.tensor(LENS, dtype=torch.int32, device=device)
    q = fused_q(len(LENS), group * num_kv, num_kv, head_dim, dtype, gen)
    out = torch.full((len(LENS), group * num_kv + 1, head_dim), float("nan"), dtype=dtype, device=device)[:, 1:]
    got = paged_decode_attention(q, cache, tables, lens, head_dim ** -0.5, window, num_splits=num_splits, out=out,
                                 max_context_len=max(LENS), min_split_tokens=1)  # every split reads (CPU: short)
    assert got is out
    want = paged_decode_attention_ref(q, cache, tables, lens, head_dim ** -0.5, window)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert (got[LENS.index(0)] == 0).all(), "a padding row (context 0) gives zeros"


def test_splits_agree_and_lengths_do_not_leak():
    """Split counts from 1 to past the number of tiles give one answer (head_dim 80: not a power of
    two), with splits as fine as one tile or no finer than 256 tokens (the short rows leave splits empty,
    the long one fills three of 8); a row's output ignores what lies in its blocks past its length."""
    gen = torch.Generator().manual_seed(7)
    lens = [40, 3, 97, 600]
    cache, tables = paged_cache(lens, 16, 1, 80, torch.float32, gen)
    q = torch.randn(len(lens), 4, 80, generator=gen).to(device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    want = paged_decode_attention_ref(q, cache, tables, ctx, 0.125)
    for splits, floor in ((1, 256), (2, 1), (8, 1), (2, 256), (8, 256)):
        got = paged_decode_attention(q, cache, tables, ctx, 0.125, num_splits=splits, min_split_tokens=floor)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    windowed = paged_decode_attention_ref(q, cache, tables, ctx, 0.125, 300)  # the long row: two splits of 8
    torch.testing.assert_close(paged_decode_attention(q, cache, tables, ctx, 0.125, 300, num_splits=8), windowed,
                               rtol=1e-4, atol=1e-5)
    spoiled = cache.clone()  # huge values past each length, in the sequence's own last block
    for row, n in enumerate(lens):
        spoiled[:, tables[row, n // 16], n % 16:] = 1e4
    torch.testing.assert_close(paged_decode_attention(q, spoiled, tables, ctx, 0.125, num_splits=2), want,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_splits", (1, 2))
def test_empty_rows_left_alone(num_splits):
    """write_empty_rows=False (a mixed step's decode launch): rows with context 0 keep what `out` held
    (another stream writes them), the others are the twin's."""
    gen = torch.Generator().manual_seed(11)
    lens = [0, 37, 0, 0, 16, 1]
    cache, tables = paged_cache(lens, 16, 2, 64, torch.float32, gen)
    q = torch.randn(len(lens), 8, 64, generator=gen).to(device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    out = torch.full_like(q, 7.0)
    paged_decode_attention(q, cache, tables, ctx, 0.125, num_splits=num_splits, out=out, write_empty_rows=False)
    want = paged_decode_attention_ref(q, cache, tables, ctx, 0.125, out=torch.full_like(q, 7.0),
                                      write_empty_rows=False)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert (out[ctx == 0] == 7.0).all() and not (out[ctx > 0] == 7.0).any()


def test_choose_num_splits():
    assert choose_num_splits(1, 8, 32768, 132) == 64  # one long sequence: fill the GPU, capped
    assert choose_num_splits(4, 8, 4096, 132) == 16
    assert choose_num_splits(64, 8, 4096, 132) == 1  # ~4 programs per SM already
    assert choose_num_splits(32, 8, 4096, 132) == 2
    assert choose_num_splits(256, 8, 4096, 132) == 1  # enough programs already
    assert choose_num_splits(1, 8, 64, 132) == 1  # too short to split
    assert choose_num_splits(0, 8, 100, 132) == 1
    assert choose_num_splits(1, 8, 576, 132) == 8  # one tile a split: one row cannot fill the SMs otherwise
    assert choose_num_splits(1, 8, 576, 132, min_split_tokens=256) == 2


def test_spread_contexts():
    """Spread: the longest context outlasts the batch's share of the program slots and is at least twice
    the mean. Equal contexts never are, however few the programs: they finish together."""
    assert not spread_contexts(384, 64 * 384, 64, 8, 132)  # W1-64's steps
    assert not spread_contexts(576, 16 * 576, 16, 8, 132)
    assert spread_contexts(2450, 128 * 643, 128, 8, 132)  # W2's decode rows
    assert not spread_contexts(2450, 256 * 1200, 256, 8, 132)  # long, but the batch's bytes set the pace
    assert not spread_contexts(1000, 64 * 600, 64, 8, 132)  # a tail under twice the mean


@pytest.mark.skipif(device != "cuda", reason="real shapes on the GPU only")
@pytest.mark.parametrize("head_dim,group", [(64, 4), (128, 4), (128, 8)])
@pytest.mark.parametrize("num_splits", (1, None))
def test_bf16_real_shapes(head_dim, group, num_splits):
    gen = torch.Generator().manual_seed(head_dim + group)
    lens = torch.randint(1, 4097, (48,), generator=gen).tolist() + [0, 4096]
    num_kv = 8
    cache, tables = paged_cache(lens, 16, num_kv, head_dim, torch.bfloat16, gen)
    q = fused_q(len(lens), group * num_kv, num_kv, head_dim, torch.bfloat16, gen)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    got = paged_decode_attention(q, cache, tables, ctx, head_dim ** -0.5, num_splits=num_splits,
                                 max_context_len=4096)
    want = paged_decode_attention_ref(q.float(), cache.float(), tables, ctx, head_dim ** -0.5)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(device != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_replay():
    """Captured once with padding rows, replayed with new lengths, tables and queries."""
    gen = torch.Generator().manual_seed(3)
    lens = [300, 17, 1, 2000]
    cache, tables = paged_cache(lens + [0], 16, 8, 128, torch.bfloat16, gen)
    q = torch.zeros(8, 32, 128, dtype=torch.bfloat16, device=device)
    ctx = torch.zeros(8, dtype=torch.int32, device=device)
    table = torch.zeros(8, tables.shape[1], dtype=torch.int32, device=device)
    out = torch.empty_like(q)

    def step():
        paged_decode_attention(q, cache, table, ctx, 0.088, out=out, max_context_len=2048)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for order in ([0, 1, 2, 3], [3, 2]):
        n = len(order)
        q.normal_()
        ctx.zero_()
        ctx[:n] = torch.tensor([lens[i] for i in order], dtype=torch.int32)
        table.zero_()
        table[:n] = tables[order]
        graph.replay()
        want = paged_decode_attention_ref(q.float(), cache.float(), table, ctx, 0.088)
        torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
        assert (out[n:] == 0).all() and torch.isfinite(out).all()


# Compiles kernels for an H100 (sm_90) the way a launch would (pointers and strides 16-aligned),
# in a process without the interpreter: bf16 and real-compiler-only failures show up on CPUs too.
_COMPILE = textwrap.dedent("""
    import json, sys
    from tandem.kernels.sm90 import compile_sm90
    compiled = [compile_sm90(*launch) for launch in json.loads(sys.argv[1])]
    print(json.dumps([c.asm["ptx"] if sys.argv[2] == "ptx" else c.metadata.shared for c in compiled]))
""")
H100_SHARED_MEMORY = 227 * 1024


def compile_for_sm90(launches: list[tuple[str, str, dict, dict]], ptx: bool = False) -> list:
    """(module, kernel, constexprs, launch options) -> shared memory bytes of each compiled kernel (or,
    with `ptx`, its PTX)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(launches), "ptx" if ptx else "shared"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(device == "cuda", reason="the GPU runs the real thing")
def test_compiles_for_hopper_in_bf16():
    """The target shape (Hq=32, Hkv=8, D=128, block size 16) with the GPU tile config."""
    from tandem.kernels.paged_decode_attention import decode_config

    small, mid, large = (decode_config(128, torch.device("cuda"), per_sm) for per_sm in (2, 4, 16))
    split = decode_config(128, torch.device("cuda"), 16, num_splits=8)
    assert len({str(c) for c in (small, mid, large, split)}) == 4  # each batch shape gets its own tiles
    module = "tandem.kernels.paged_decode_attention"
    common = dict(NUM_HEADS=32, HEAD_DIM=128, BLOCK_D=128)
    launches = [(module, "_decode_kernel", dict(common, GROUP=4, SLOT_SIZE=1024, ROWS=16, BLOCK_N=cfg["block_n"],
                                                BLOCK_SIZE=16, NUM_SPLITS=splits, HAS_WINDOW=window,
                                                MIN_SPLIT_TILES=256 // cfg["block_n"] if splits > 1 else 1,
                                                PRECISION="tf32", SKIP_EMPTY=splits > 1),
                 dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
                for cfg, splits, window in ((small, 1, False), (small, 4, True), (mid, 1, False), (large, 1, False),
                                            (split, 8, False))]
    launches += [("tandem.kernels.attention_common", "_merge_splits_kernel",
                  dict(common, NUM_SPLITS=4, SPLITS_PAD=4, BLOCK_R=block_r, ROWS=rows, MIN_SPLIT_TILES=4, BLOCK_N=64,
                       HAS_WINDOW=window), dict(num_warps=4))
                 for rows, block_r, window in ((0, 1, False), (1, 16, False), (2, 16, True))]
    assert all(0 < shared <= H100_SHARED_MEMORY for shared in compile_for_sm90(launches)[:5])


def test_wrapper_rejects_bad_inputs():
    cache = torch.zeros(2, 4, 16, 2, 64, device=device)
    q = torch.randn(3, 4, 64, device=device)
    tables = torch.zeros(3, 2, dtype=torch.int32, device=device)
    ctx = torch.ones(3, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="q must be \\[rows, Hq, 64\\] with Hq a multiple of Hkv=2"):
        paged_decode_attention(q[:, :3], cache, tables, ctx, 1.0)
    with pytest.raises(TypeError, match="q must be torch.float32"):
        paged_decode_attention(q.half(), cache, tables, ctx, 1.0)
    with pytest.raises(ValueError, match="head_dim must be contiguous"):
        paged_decode_attention(torch.randn(3, 64, 4, device=device).transpose(1, 2), cache, tables, ctx, 1.0)
    with pytest.raises(TypeError, match="block_tables must be int32"):
        paged_decode_attention(q, cache, tables.long(), ctx, 1.0)
    with pytest.raises(ValueError, match="context_lens must be \\[3\\]"):
        paged_decode_attention(q, cache, tables, ctx[:2], 1.0)
    with pytest.raises(ValueError, match="block_tables must be \\[3, 2\\]"):
        paged_decode_attention(q, cache, tables[:2], ctx, 1.0)
    with pytest.raises(ValueError, match="kv_cache must be a contiguous"):
        paged_decode_attention(q, cache.transpose(1, 2), tables, ctx, 1.0)
    with pytest.raises(TypeError, match="kv_cache must be one of"):
        paged_decode_attention(q.double(), cache.double(), tables, ctx, 1.0)
    with pytest.raises(ValueError, match="out must be"):
        paged_decode_attention(q, cache, tables, ctx, 1.0, out=torch.empty(3, 4, 32, device=device))
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        paged_decode_attention(q, cache, tables, ctx, 1.0, num_splits=0)


@pytest.mark.skipif(device == "cuda", reason="offline sm_90 compiles stand in for a GPU; on one, the kernels run for real")
def test_kernel_regs_reports_every_config():
    """bench/kernel_regs.py: each GPU tile config of the engine compiled for sm_90 with its registers, spills
    and shared memory read back from ptxas (the tool kernel work leans on before GPU time)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(root, "bench", "kernel_regs.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines()[1:] if line.strip()]
    assert len(rows) == 9
    for line in rows:  # label (words), warps, registers, spilled bytes, shared KiB, then the constexprs
        warps, regs, spilled, shared = line[28:].split()[:4]
        assert 0 < int(regs) <= 255 and int(spilled) >= 0 and 0 <= float(shared) <= 227, line
