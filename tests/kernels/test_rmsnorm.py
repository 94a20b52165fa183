"""RMSNorm kernels against their torch twins (Triton's interpreter on CPUs)."""
from __future__ import annotations

import pytest
import torch

from tandem.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref

device = "cuda" if torch.cuda.is_available() else "cpu"
# (rtol, atol): a few ulps of the dtype; the interpreter rounds float32 -> bfloat16 toward zero
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
TOKENS = (1, 7, 33, 1000) if device == "cuda" else (1, 7, 33)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _inputs(t: int, h: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(device, dtype)
    residual = torch.randn(t, h, generator=g).to(device, dtype)
    weight = (1 + 0.5 * torch.randn(h, generator=g)).to(device, dtype)
    return x, residual, weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", (576, 960))
@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm_matches_twin(tokens, hidden, dtype):
    x, _, weight = _inputs(tokens, hidden, dtype)
    out = rms_norm(x, weight, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, rms_norm_ref(x, weight, 1e-5), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", (576, 960))
@pytest.mark.parametrize("tokens", TOKENS)
def test_fused_add_rms_norm_matches_twin(tokens, hidden, dtype):
    x, residual, weight = _inputs(tokens, hidden, dtype, seed=tokens)
    x_before = x.clone()
    want_out, want_total = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    out, total = fused_add_rms_norm(x, residual, weight, 1e-6)
    assert total is residual, "the sum is written into residual in place"
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)
    rtol, atol = TOL[dtype]
    # The add is a single rounding of an exact float32 sum: bit-equal to torch except the
    # interpreter's truncating bfloat16 cast (one ulp).
    exact = dtype != torch.bfloat16 or device == "cuda"
    torch.testing.assert_close(total, want_total, rtol=0 if exact else rtol, atol=0 if exact else atol)
    torch.testing.assert_close(out, want_out, rtol=rtol, atol=atol)


def test_strided_rows_read_and_written_in_place():
    """x and residual as column slices of wider tensors (row stride > H)."""
    wide_x = torch.randn(7, 2 * 576, device=device)
    wide_res = torch.randn(7, 3 * 576, device=device)
    x, residual = wide_x[:, 576:], wide_res[:, :576]
    weight = torch.rand(576, device=device) + 0.5
    want_out, want_total = fused_add_rms_norm_ref(x, residual.clone(), weight, 1e-5)
    untouched = wide_res[:, 576:].clone()
    out, total = fused_add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wide_res[:, :576], want_total, rtol=0, atol=0)
    torch.testing.assert_close(wide_res[:, 576:], untouched, rtol=0, atol=0)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5), rtol=1e-5, atol=1e-5)


def test_scale_invariance_and_eps():
    """Behaviour, not only twin equality: rmsnorm(c * x) == rmsnorm(x); eps dominates tiny rows."""
    x = torch.randn(3, 960, device=device)
    weight = torch.ones(960, device=device)
    torch.testing.assert_close(rms_norm(100 * x, weight, 1e-6), rms_norm(x, weight, 1e-6), rtol=1e-4, atol=1e-4)
    tiny = torch.full((1, 960), 1e-6, device=device)
    assert rms_norm(tiny, weight, 1.0).abs().max() < 2e-6


@pytest.mark.skipif(device != "cuda", reason="real shapes in bfloat16 on the GPU only")
@pytest.mark.parametrize("hidden", (4096, 8192))
def test_bf16_real_shapes_against_float32(hidden):
    x, residual, weight = _inputs(8192, hidden, torch.bfloat16)
    want = rms_norm_ref((x + residual).float(), weight.float(), 1e-5)
    out, _ = fused_add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


def test_wrapper_rejects_bad_inputs():
    x = torch.randn(4, 64, device=device)
    weight = torch.ones(64, device=device)
    with pytest.raises(TypeError, match="must be one of"):
        rms_norm(x.to(torch.int32), weight, 1e-5)
    with pytest.raises(ValueError, match=r"x must be \[T, H\]"):
        rms_norm(x.view(2, 2, 64), weight, 1e-5)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        rms_norm(x, torch.ones(65, device=device), 1e-5)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        rms_norm(x, weight.half(), 1e-5)
    with pytest.raises(ValueError, match="rows must be contiguous"):
        rms_norm(x.t(), torch.ones(4, device=device), 1e-5)
    with pytest.raises(TypeError, match="residual must be torch.float32"):
        fused_add_rms_norm(x, x.half(), weight, 1e-5)
    with pytest.raises(ValueError, match="residual must be"):
        fused_add_rms_norm(x, x[:3], weight, 1e-5)
