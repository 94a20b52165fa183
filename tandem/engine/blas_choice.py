"""cuBLAS or cuBLASLt for each linear layer's weight shape at each CUDA-graph batch size, timed at capture.

torch sends a half-precision F.linear to one of the two libraries (`preferred_blas_library`), and their
heuristics pick different kernels at decode's 100-300 rows: on an H200 the 8B shape's linear layers
take 5.73 ms a step at 208 rows through cuBLAS and 5.56 ms through cuBLASLt, 7.38 and 7.22 ms at 288 rows,
and tie at 128 and 192 (bench/gpu_gemm.py --lt, results/gemm-8b-lt-20261203.txt); by layer the gaps differ. So before the graphs are captured, `tune`
times both for every (weight shape, bucket) over the model's own weights of that shape (one layer after
another, as a forward pass streams them: a single weight would sit in L2) and keeps cuBLASLt where it is
faster by more than `MARGIN`; `linear` then runs those under it, and the graphs record that choice.
TANDEM_BLAS_TUNE=0 turns it off (to measure it).
"""
from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MARGIN = 0.02
_lt: set[tuple[int, int, int]] = set()  # (out features, in features, rows) that run through cuBLASLt


def enabled() -> bool:
    return os.environ.get("TANDEM_BLAS_TUNE", "1") != "0"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not _lt or (weight.shape[0], weight.shape[1], x.shape[0]) not in _lt:
        return F.linear(x, weight, bias)
    default = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        return F.linear(x, weight, bias)
    finally:
        torch.backends.cuda.preferred_blas_library(default)


def _time(weights: list[torch.Tensor], x: torch.Tensor, library: str) -> float:
    default = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(library)
    try:
        for w in weights[:2]:  # heuristics and workspace set up outside the timing
            F.linear(x, w)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(2):
            for w in weights:
                F.linear(x, w)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    finally:
        torch.backends.cuda.preferred_blas_library(default)


@torch.inference_mode()
def tune(model: torch.nn.Module, rows: list[int]) -> None:
    """Chooses the library of every (weight shape, rows) pair of the model's CUDA half-precision linear layers."""
    _lt.clear()
    if not enabled():
        return
    began = time.perf_counter()
    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for module in model.modules():
        w = getattr(module, "weight", None)
        if (isinstance(module, torch.nn.Linear) and w is not None and w.is_cuda
                and w.dtype in (torch.bfloat16, torch.float16)):
            by_shape.setdefault(tuple(w.shape), []).append(w)
    for (n, k), weights in by_shape.items():
        x = torch.randn(max(rows), k, dtype=weights[0].dtype, device=weights[0].device)
        for m in rows:
            if m > 1 and _time(weights, x[:m], "cublaslt") < (1 - MARGIN) * _time(weights, x[:m], "cublas"):
                _lt.add((n, k, m))
    log.info("cuBLASLt for %d of %d (weight shape, batch size) pairs (timed in %.1f s): %s", len(_lt),
             len(by_shape) * len(rows), time.perf_counter() - began, sorted(_lt))
