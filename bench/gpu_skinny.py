"""Decode-batch GEMMs of the 8B shape (M = 64 and 256 rows): cuBLAS against a Triton tile sweep, each
call reading a cold weight (>= 512 MB of copies in the timed CUDA graph). A probe: the kernel moves
into tandem.kernels only if it wins.

    python bench/gpu_skinny.py
"""
from __future__ import annotations

import itertools
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_timing import graph_us  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x = x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]
    w = w_ptr + cols[:, None].to(tl.int64) * K + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        a = tl.load(x, mask=rows[:, None] < M, other=0.0)
        b = tl.load(w)
        acc = tl.dot(a, tl.trans(b), acc)
        x += BLOCK_K
        w += BLOCK_K
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] < M)


def skinny(x, w, cfg):
    m, k = x.shape
    n = w.shape[0]
    bm, bn, bk, warps, stages = cfg
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _skinny_kernel[(n // bn, triton.cdiv(m, bm))](x, w, out, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                 num_warps=warps, num_stages=stages)
    return out


def main() -> None:
    for m in (64, 256):
        configs = [(bm, bn, bk, w, s) for bm, bn, bk, w, s in itertools.product(
            (min(m, 64), min(m, 128)), (64, 128), (64, 128), (4, 8), (4, 5)) if bm * bk + bn * bk <= 24576]
        configs = sorted(set(configs))
        for name, (n, k) in SHAPES.items():
            nbytes = n * k * 2
            copies = max(2, -(-512 * 2**20 // nbytes))
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cublas = graph_us(lambda i: F.linear(x, ws[i]), copies)
            timed = []
            for c in configs:
                try:
                    err = (skinny(x, ws[0], c).float() - F.linear(x.float(), ws[0].float())).abs().max().item()
                    timed.append((graph_us(lambda i: skinny(x, ws[i], c), copies), c, err))
                except Exception as e:  # out of shared memory and the like
                    print(f"  {c}: {type(e).__name__}")
            timed.sort()
            print(f"M={m:3} {name:8} cuBLAS {cublas:7.2f} us ({nbytes / cublas / 1e6:4.2f} TB/s); best: " +
                  ", ".join(f"{us:.2f} us ({nbytes / us / 1e6:4.2f} TB/s) {c} err {e:.1e}" for us, c, e in timed[:3]),
                  flush=True)
            del ws
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
