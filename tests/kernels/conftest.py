"""Fixtures of the kernel tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def cpu_kernels_built():
    """The C++ CPU kernels, built (CI must build them); a GPU image without a compiler skips."""
    from tandem.kernels import cpu
    if not cpu.available() and torch.cuda.is_available():
        pytest.skip("CPU kernels not built on this GPU image; CPUs (CI) must build them")
    assert cpu.available(), "the C++ CPU kernels did not build (is a C++ compiler installed?)"
