"""Programmatic dependent launch: off where it cannot run, only for one-row launches, and on Hopper a
graphed chain of dependent PDL kernels computes what the same chain computes launched one after
another without it."""
from __future__ import annotations

import pytest
import torch

from tandem.kernels.pdl import enabled, launch_options

# CI's CPUs run the first test only; the GPU session runs all (bench/gpu_run.sh kernels)
needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                  reason="PDL needs a Hopper-class GPU")


def test_off_on_cpus_and_when_asked(monkeypatch):
    assert launch_options(torch.device("cpu"), 1) == {"PDL": False}
    monkeypatch.setenv("TANDEM_PDL", "0")
    assert not enabled(torch.device("cuda", 0))


@needs_hopper
def test_only_one_row_launches_use_it():
    device = torch.device("cuda", 0)
    assert launch_options(device, 1) == {"PDL": True, "launch_pdl": True}
    assert launch_options(device, 64) == {"PDL": False}


def _chain(x, residual, weights, norm_w, steps):
    """A decode layer's shape of dependencies: each kernel reads what the one before it wrote, and the
    fused norm rewrites the residual that the next round's norm reads."""
    from tandem.kernels.activation import silu_and_mul
    from tandem.kernels.gemv import gemv, config_for
    from tandem.kernels.rmsnorm import fused_add_rms_norm
    up, down = weights
    for _ in range(steps):
        h, residual = fused_add_rms_norm(x, residual, norm_w, 1e-5)
        h = gemv(h, up, None, config_for(*up.shape, pdl=True))
        x = gemv(silu_and_mul(h), down, None, config_for(*down.shape, pdl=True))
    return x, residual


@needs_hopper
def test_graphed_chain_matches_launches_without_pdl(monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden, inter = 4096, 14336
    up = torch.randn(2 * inter, hidden, device="cuda", generator=g, dtype=torch.bfloat16) / hidden ** 0.5
    down = torch.randn(hidden, inter, device="cuda", generator=g, dtype=torch.bfloat16) / inter ** 0.5
    norm_w = torch.rand(hidden, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5
    x0 = torch.randn(1, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
    r0 = torch.randn(1, hidden, device="cuda", generator=g, dtype=torch.bfloat16)

    monkeypatch.setenv("TANDEM_PDL", "0")
    want_x, want_r = _chain(x0.clone(), r0.clone(), (up, down), norm_w, 8)
    torch.cuda.synchronize()

    monkeypatch.setenv("TANDEM_PDL", "1")
    assert enabled(x0.device)
    x, r = x0.clone(), r0.clone()
    _chain(x.clone(), r.clone(), (up, down), norm_w, 1)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_x, out_r = _chain(x, r, (up, down), norm_w, 8)
    for _ in range(3):
        r.copy_(r0)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_x, want_x) and torch.equal(out_r, want_r)
