"""Batch-1 linear kernel against F.linear in float32 (Triton's interpreter on CPUs)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels.gemv import gemv

device = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("n,k,bias", ((64, 256, False), (100, 300, True), (7, 1000, False)))
@pytest.mark.parametrize("config", ((16, 256, 4, 4), (8, 128, 2, 3)))
def test_matches_float32_linear(n, k, bias, dtype, config):
    """Odd N and K (masked tails), a bias, two tile configs; against float32 math on the same inputs,
    within the output's rounding."""
    g = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    out = gemv(x, w, b, config)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert out.shape == (1, n) and out.dtype == dtype
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)
    assert (out.float() - want).abs().max() < 8 * want.abs().max() * 2 ** -8  # far tighter than random


def test_reads_weight_rows_through_their_stride():
    """A row slice of a wider weight (as a fused projection's part would be)."""
    wide = torch.randn(48, 512).to(device, torch.float16)
    w = wide[:, 128:384]
    x = torch.randn(1, 256).to(device, torch.float16)
    torch.testing.assert_close(gemv(x, w).float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=1e-2)


def test_wrapper_rejects_bad_inputs():
    x = torch.randn(1, 64, device=device, dtype=torch.float16)
    w = torch.randn(32, 64, device=device, dtype=torch.float16)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        gemv(x.float(), w.float())
    with pytest.raises(ValueError, match=r"x must be a contiguous \[1, K\]"):
        gemv(torch.randn(2, 64, device=device, dtype=torch.float16), w)
    with pytest.raises(ValueError, match=r"weight must be \[N, 64\]"):
        gemv(x, w.t().contiguous())
    with pytest.raises(ValueError, match="bias"):
        gemv(x, w, torch.zeros(31, device=device, dtype=torch.float16))
