"""RoPE kernel against its torch twin (Triton's interpreter on CPUs), on default and llama3 tables."""
from __future__ import annotations

import itertools

import pytest
import torch

from tandem.engine.models.rope import rope_cos_sin
from tandem.kernels.reference import reshape_and_cache_ref
from tandem.kernels.rope import apply_rope, apply_rope_ref, rope_and_cache

device = "cuda" if torch.cuda.is_available() else "cpu"
# (rtol, atol): a few ulps of the dtype; the interpreter rounds float32 -> bfloat16 toward zero
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
TOKENS = (1, 7, 33, 1000) if device == "cuda" else (1, 7, 33)
MAX_POSITIONS = 131072
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.fixture(scope="module")
def tables():
    """name -> (cos, sin) for head_dim 64 and 128: default theta and Llama 3.1's scaled tables."""
    out = {}
    for head_dim in (64, 128):
        out["default", head_dim] = rope_cos_sin(head_dim, MAX_POSITIONS, 10000.0, None)
        out["llama3", head_dim] = rope_cos_sin(head_dim, MAX_POSITIONS, 500000.0, LLAMA3)
    return {key: (c.to(device), s.to(device)) for key, (c, s) in out.items()}


def _fused_qk(tokens, num_q, num_kv, head_dim, dtype, gen):
    """q, k, v as the model makes them: strided views of one fused qkv projection."""
    qkv = torch.randn(tokens, (num_q + 2 * num_kv) * head_dim, generator=gen).to(device, dtype)
    q = qkv[:, : num_q * head_dim].view(tokens, num_q, head_dim)
    k = qkv[:, num_q * head_dim:(num_q + num_kv) * head_dim].view(tokens, num_kv, head_dim)
    v = qkv[:, (num_q + num_kv) * head_dim:].view(tokens, num_kv, head_dim)
    return qkv, q, k, v


def _cases():
    """Every combination on GPUs; on CPUs (the interpreter is slow) half precision at 7 tokens only."""
    for tokens, shape, table, dtype in itertools.product(
            TOKENS, [(1, 2, 64), (4, 2, 128), (8, 3, 64)], ("default", "llama3"), TOL):
        if device == "cuda" or dtype == torch.float32 or tokens == 7:
            yield (tokens, *shape, table, dtype)


@pytest.mark.parametrize("tokens,group,num_kv,head_dim,table,dtype", list(_cases()),
                         ids=lambda v: str(v).removeprefix("torch."))
def test_matches_twin_in_place_on_fused_views(tokens, group, num_kv, head_dim, table, dtype, tables):
    gen = torch.Generator().manual_seed(tokens * 7 + group)
    cos, sin = tables[table, head_dim]
    qkv, q, k, v = _fused_qk(tokens, group * num_kv, num_kv, head_dim, dtype, gen)
    positions = torch.randint(0, MAX_POSITIONS, (tokens,), generator=gen)
    positions[0] = MAX_POSITIONS - 1  # the table's last row
    positions = positions.to(device)
    v_before = v.clone()
    want_q, want_k = apply_rope_ref(q.clone(), k.clone(), positions, cos, sin)
    out_q, out_k = apply_rope(q, k, positions, cos, sin)
    assert out_q is q and out_k is k
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(q, want_q, rtol=rtol, atol=atol)
    torch.testing.assert_close(k, want_k, rtol=rtol, atol=atol)
    torch.testing.assert_close(v, v_before, rtol=0, atol=0)  # the fused tensor's v part is untouched


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("group,num_kv,head_dim", ((1, 2, 64), (4, 2, 128), (8, 1, 96), (6, 2, 64), (4, 10, 64)))
def test_rope_and_cache_matches_the_two_twins(group, num_kv, head_dim, dtype):
    """The fused rotate-and-write equals apply_rope then reshape_and_cache: q rotated in place, the
    rotated k and the untouched v in their slots (block-boundary slots; a padding slot writes nothing),
    and the fused qkv tensor's k and v parts left as they were."""
    tokens, block_size, num_blocks = 7, 16, 6
    cos, sin = rope_cos_sin(head_dim, 4096, 500000.0, LLAMA3)
    cos, sin = cos.to(device), sin.to(device)
    gen = torch.Generator().manual_seed(head_dim + group)
    qkv, q, k, v = _fused_qk(tokens, group * num_kv, num_kv, head_dim, dtype, gen)
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(device)
    slots = torch.tensor([15, 16, -1, 0, 95, 40, 17], device=device)
    cache = torch.randn(2, num_blocks, block_size, num_kv, head_dim, generator=gen).to(device, dtype)
    want_cache = cache.clone()
    want_q, want_k = apply_rope_ref(q.clone(), k.clone(), positions, cos, sin)
    reshape_and_cache_ref(want_k, v.clone(), want_cache, slots)
    kv_before = qkv[:, group * num_kv * head_dim:].clone()
    out = rope_and_cache(q, k, v, positions, cos, sin, cache, slots)
    assert out is q
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(q, want_q, rtol=rtol, atol=atol)
    torch.testing.assert_close(cache, want_cache, rtol=rtol, atol=atol)
    torch.testing.assert_close(qkv[:, group * num_kv * head_dim:], kv_before, rtol=0, atol=0)
    flat = cache.view(2, -1, num_kv, head_dim)
    torch.testing.assert_close(flat[1, 95], v[4], rtol=0, atol=0)  # v is copied, not rotated


# the interpreter rounds float32 -> bfloat16 toward zero, so bf16's exact check needs the GPU's compiler
EXACT_DTYPES = (torch.float16, torch.bfloat16) if device == "cuda" else (torch.float16,)


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_half_precision_equals_the_twin(tables, dtype):
    """Tables, products and sums rounded as torch rounds them in half precision: the twin's (Hugging
    Face's) output exactly, from both kernels (rope_and_cache's k lands in the cache)."""
    cos, sin = tables["llama3", 128]
    gen = torch.Generator().manual_seed(5)
    _, q, k, v = _fused_qk(64, 8, 2, 128, dtype, gen)
    positions = torch.randint(0, 4096, (64,), generator=gen).to(device)
    want_q, want_k = apply_rope_ref(q.clone(), k.clone(), positions, cos, sin)
    cache = torch.zeros(2, 8, 16, 2, 128, dtype=dtype, device=device)
    slots = torch.arange(64, device=device)
    got_q = rope_and_cache(q.clone(), k, v, positions, cos, sin, cache, slots)
    assert torch.equal(got_q, want_q) and torch.equal(cache[0].view(-1, 2, 128)[:64], want_k)
    apply_rope(q, k, positions, cos, sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_non_power_of_two_head_dim_and_int32_positions():
    head_dim = 96  # half = 48: the tail of the dim tile is masked
    cos, sin = rope_cos_sin(head_dim, 4096, 10000.0, None)
    cos, sin = cos.to(device), sin.to(device)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(5, 4, head_dim, generator=gen).to(device)
    k = torch.randn(5, 1, head_dim, generator=gen).to(device)
    positions = torch.tensor([0, 1, 17, 2048, 4095], device=device, dtype=torch.int32)
    want_q, want_k = apply_rope_ref(q.clone(), k.clone(), positions.long(), cos, sin)
    apply_rope(q, k, positions, cos, sin)
    torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)


def test_half_precision_tables(tables):
    """The engine's `model.to(bfloat16)` also casts the rope buffers: bf16 tables are widened, not refused."""
    cos, sin = (t[:4096].to(torch.bfloat16) for t in tables["llama3", 128])
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(7, 8, 128, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(7, 2, 128, generator=gen).to(device, torch.bfloat16)
    positions = torch.randint(0, 4096, (7,), generator=gen).to(device)
    want_q, want_k = apply_rope_ref(q.float(), k.float(), positions, cos.float(), sin.float())
    apply_rope(q, k, positions, cos, sin)
    torch.testing.assert_close(q.float(), want_q, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(k.float(), want_k, rtol=2e-2, atol=2e-2)


def test_relative_position_property(tables):
    """The point of RoPE: <rope(q, m), rope(k, n)> depends on m - n only; position 0 is the identity."""
    cos, sin = tables["llama3", 64]
    gen = torch.Generator().manual_seed(2)
    q0 = torch.randn(1, 1, 64, generator=gen).to(device)
    k0 = torch.randn(1, 1, 64, generator=gen).to(device)
    scores = []
    for m, n in ((100, 40), (70060, 70000)):
        q, k = q0.clone(), k0.clone()
        apply_rope(q, k, torch.tensor([m], device=device), cos, sin)
        scores.append((q * k).sum())
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-3, atol=1e-3)
    q, k = q0.clone(), k0.clone()
    apply_rope(q, k, torch.tensor([0], device=device), cos, sin)
    torch.testing.assert_close(q, q0, rtol=0, atol=0)


@pytest.mark.skipif(device != "cuda", reason="real shapes in bfloat16 on the GPU only")
def test_bf16_real_shape_against_float32(tables):
    """Llama 3.1 8B: 32 q heads, 8 kv heads, head_dim 128, 8192 tokens at long positions."""
    gen = torch.Generator().manual_seed(3)
    cos, sin = tables["llama3", 128]
    _, q, k, _ = _fused_qk(8192, 32, 8, 128, torch.bfloat16, gen)
    positions = torch.randint(0, MAX_POSITIONS, (8192,), generator=gen).to(device)
    want_q, want_k = apply_rope_ref(q.float(), k.float(), positions, cos, sin)
    apply_rope(q, k, positions, cos, sin)
    # Three bf16 roundings where Hugging Face rounds (the tables, each product, the sum), each up to half
    # an ulp (2^-8 relative): 3 * 2^-7 covers them; measured worst 0.019 absolute on 33.5M values.
    tol = 3 * 2.0**-7
    torch.testing.assert_close(q.float(), want_q, rtol=tol, atol=tol)
    torch.testing.assert_close(k.float(), want_k, rtol=tol, atol=tol)


def test_wrapper_rejects_bad_inputs(tables):
    cos, sin = tables["default", 64]
    q = torch.randn(3, 4, 64, device=device)
    k = torch.randn(3, 2, 64, device=device)
    pos = torch.arange(3, device=device)
    with pytest.raises(TypeError, match="q and k must share"):
        apply_rope(q, k.half(), pos, cos, sin)
    with pytest.raises(ValueError, match=r"q must be \[T, Hq, D\]"):
        apply_rope(q, k[:2], pos, cos, sin)
    with pytest.raises(ValueError, match="head_dim must be contiguous"):
        apply_rope(torch.randn(3, 64, 4, device=device).transpose(1, 2), k, pos, cos, sin)
    with pytest.raises(ValueError, match="positions must be"):
        apply_rope(q, k, pos[:2], cos, sin)
    with pytest.raises(TypeError, match="positions must be int64 or int32"):
        apply_rope(q, k, pos.float(), cos, sin)
    with pytest.raises(ValueError, match=r"cos must be a contiguous \[max_positions, 64\]"):
        apply_rope(q, k, pos, cos[:, :32], sin)
    with pytest.raises(TypeError, match="cos and sin must share"):
        apply_rope(q, k, pos, cos, sin.half())
    with pytest.raises(TypeError, match="cos and sin must share"):
        apply_rope(q, k, pos, cos.double(), sin.double())
    with pytest.raises(ValueError, match="same number of tokens"):
        rope_and_cache(q, k, k, pos, cos, sin, torch.zeros(2, 4, 16, 2, 64, device=device),
                       torch.zeros(2, dtype=torch.long, device=device))


@pytest.mark.skipif(device == "cuda", reason="offline sm_90 compiles stand in for a GPU; on one, the kernels run for real")
def test_gpu_compile_rounds_each_product():
    """Compiled for an H100/H200 with the wrappers' launch options, both kernels round each product and
    each sum on its own (bf16 mul.rn / add.rn / sub.rn), as torch does. With fused multiply-adds on, the
    compiler made each product and its sum one bf16 fma (rounding once): the H200's outputs left the twin's."""
    from tandem.kernels.rope import LAUNCH_OPTIONS
    from tests.kernels.test_paged_decode_attention import compile_for_sm90

    consts = dict(HALF=64, BLOCK_D=64, BLOCK_H=8, PDL=False)
    ptxs = compile_for_sm90([("tandem.kernels.rope", "_rope_kernel", consts, LAUNCH_OPTIONS),
                             ("tandem.kernels.rope", "_rope_cache_kernel", dict(consts, HEAD_DIM=128, BLOCK_HD=1024),
                              LAUNCH_OPTIONS)], ptx=True)
    for ptx in ptxs:
        assert "fma" not in ptx
        assert ptx.count("mul.rn.bf16") >= 4 and ptx.count("sub.rn.bf16") >= 1 and ptx.count("add.rn.bf16") >= 1
    fused = compile_for_sm90([("tandem.kernels.rope", "_rope_kernel", consts,
                               dict(LAUNCH_OPTIONS, enable_fp_fusion=True))], ptx=True)[0]
    assert "fma.rn.bf16" in fused  # what the option prevents (so this test would see it come back)
