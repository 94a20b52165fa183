"""Batch-1 linear layers of the 8B shape: cuBLAS (F.linear) against tandem.kernels.gemv over a sweep of
tile configs. Every call in a timed CUDA graph reads a different copy of the weight (>= 512 MB in all),
so nothing is served from L2, as in a real decode step.

    python bench/gpu_gemv.py
"""
from __future__ import annotations

import itertools
import os
import sys

import torch
import torch.nn.functional as F

from tandem.kernels.gemv import config_for, gemv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_timing import graph_us  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def main() -> None:
    configs = [c for c in itertools.product((4, 8, 16, 32), (128, 256, 512), (2, 4, 8), (2, 4))
               if 1024 <= c[0] * c[1] <= 8192]
    print(f"{len(configs)} configs")
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        copies = max(2, -(-512 * 2**20 // nbytes))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        want = F.linear(x.float(), ws[0].float())
        err = (gemv(x, ws[0]).float() - want).abs().max().item()
        cublas = graph_us(lambda i: F.linear(x, ws[i]), copies)
        timed = sorted((graph_us(lambda i: gemv(x, ws[i], None, c), copies), c) for c in configs)
        chosen = config_for(n, k)
        engine = next(us for us, c in timed if c == chosen) if chosen else cublas
        print(f"{name:8} N={n:6} K={k:5}: cuBLAS {cublas:7.2f} us ({nbytes / cublas / 1e6:5.2f} TB/s); "
              f"engine's choice {chosen or 'cuBLAS'} {engine:7.2f} us ({nbytes / engine / 1e6:5.2f} TB/s); "
              f"max err {err:.2e}; best: " +
              ", ".join(f"{us:.2f} {c}" for us, c in timed[:3]), flush=True)
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
