"""SiLU-and-multiply kernel against its torch twin (Triton's interpreter on CPUs)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels.activation import silu_and_mul, silu_and_mul_ref

device = "cuda" if torch.cuda.is_available() else "cpu"
# (rtol, atol): a few ulps of the dtype; the interpreter rounds float32 -> bfloat16 toward zero
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
TOKENS = (1, 7, 33, 1000) if device == "cuda" else (1, 7, 33)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("inter", (576, 960, 1536))
@pytest.mark.parametrize("tokens", TOKENS)
def test_matches_twin(tokens, inter, dtype):
    x = (3 * torch.randn(tokens, 2 * inter, generator=torch.Generator().manual_seed(tokens))).to(device, dtype)
    out = silu_and_mul(x)
    assert out.shape == (tokens, inter) and out.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, silu_and_mul_ref(x), rtol=rtol, atol=atol)


def test_gate_first_up_second():
    """Swapping the halves changes the result: the kernel really reads gate from the first half."""
    gate = torch.tensor([[-2.0, 0.0, 1.0, 4.0]], device=device)
    up = torch.tensor([[1.0, 5.0, 2.0, -1.0]], device=device)
    out = silu_and_mul(torch.cat([gate, up], dim=1))
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=1e-6, atol=1e-6)
    assert out[0, 1] == 0  # silu(0) = 0 whatever up is


def test_strided_rows():
    """A column slice of a wider tensor (row stride > 2I)."""
    wide = torch.randn(7, 3 * 576, device=device)
    x = wide[:, 576:]
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(device != "cuda", reason="real shapes in bfloat16 on the GPU only")
def test_bf16_real_shape_against_float32():
    x = torch.randn(8192, 2 * 14336, device=device, dtype=torch.bfloat16)
    torch.testing.assert_close(silu_and_mul(x).float(), silu_and_mul_ref(x.float()), rtol=1e-2, atol=1e-2)


def test_half_precision_rounds_as_the_twin():
    """silu(gate) is rounded before the product, as torch (and Hugging Face) round it: half-precision
    outputs equal the twin's; only the exp implementation may move one in a thousand by an ulp. bf16 on
    GPUs; float16 under the interpreter, which rounds float32 -> bfloat16 toward zero."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    rows = 4096 if device == "cuda" else 64
    x = (3 * torch.randn(rows, 2 * 1024, generator=torch.Generator().manual_seed(0))).to(device, dtype)
    out, want = silu_and_mul(x), silu_and_mul_ref(x)
    assert (out == want).float().mean() > 0.999
    torch.testing.assert_close(out, want, rtol=8e-3, atol=1e-5)


def test_wrapper_rejects_bad_inputs():
    x = torch.randn(4, 64, device=device)
    with pytest.raises(TypeError, match="must be one of"):
        silu_and_mul(x.double())
    with pytest.raises(ValueError, match=r"\[T, 2 \* I\]"):
        silu_and_mul(x[:, :63])
    with pytest.raises(ValueError, match=r"\[T, 2 \* I\]"):
        silu_and_mul(x.view(4, 2, 32))
    with pytest.raises(ValueError, match="rows must be contiguous"):
        silu_and_mul(torch.randn(64, 4, device=device).t())
