"""Programmatic dependent launch (PDL, Hopper and later) for one-token decode steps.

A kernel launched with PDL may be scheduled while the kernel before it in the stream is still
draining. It must not read anything an earlier kernel writes, nor write anything, before
`wait_for_inputs` (griddepcontrol.wait: the previous grid has finished and its writes are visible);
reading weights, which no kernel writes, may start before it. Right after waiting it lets its own
successor be scheduled (griddepcontrol.launch_dependents), so each launch hides behind its
predecessor's tail. The chain stays ordered: a kernel completes only after its own wait, so waiting
on the previous grid also covers every grid before it. Kernels without PDL (cuBLAS, torch) order as
usual. CUDA graph capture keeps the programmatic edges.

Only launches of one row use it: a batch-1 step is a chain of ~350 latency-bound kernels, and PDL
took the 8B step from 4.37 to 4.28 ms and the 1B step from 1.34 to 1.15-1.29 ms (bench/gpu_step.py,
bench/gpu.py on an H200), while at 64 rows it made the 1B step 5% slower (1.44 vs 1.38 ms) and the
8B step no faster. `TANDEM_PDL=0` turns it off; it is off on GPUs before compute capability 9 and
in the interpreter.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["enabled", "launch_options", "wait_for_inputs"]


@functools.lru_cache(maxsize=None)
def _device_supports(index: int) -> bool:
    """Hopper or later, and a Triton with the griddepcontrol intrinsics (3.3 and later)."""
    has_intrinsics = hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")
    return has_intrinsics and torch.cuda.get_device_capability(index)[0] >= 9


def enabled(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("TANDEM_PDL", "1") == "0":
        return False
    return _device_supports(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(device: torch.device, rows: int) -> dict:
    """Keyword arguments for a launch, over `rows` tokens or sequences, of a kernel taking a
    `PDL: tl.constexpr` parameter."""
    return {"PDL": True, "launch_pdl": True} if rows == 1 and enabled(device) else {"PDL": False}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Call before the first read of another kernel's output (and before any write)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
