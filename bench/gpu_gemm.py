"""The 8B shape's linear layers alone, at decode batch sizes: time per call against the roofline
(weight bytes / copy bandwidth, FLOPs / matmul rate), for W as stored ([N, K], F.linear) and
pre-transposed ([K, N], x @ W), to see how far cuBLAS is from the hardware and whether layout matters;
`--lt` runs both again through cuBLASLt (torch's preferred_blas_library), whose heuristics pick other kernels.
Splitting a prompt step's GEMMs into 4,096-row pieces gained nothing, alone or in the engine
(results/gemm-8b-chunk-20261205.txt: 0.94-1.04x per GEMM; P512 7,042 / 7,031 / 7,044 out tok/s whole / 4,096 /
8,192 rows, results/gpu-20261205-024250.json): a long run of prompt GEMMs is held at the board's 700 W cap.

    python bench/gpu_gemm.py [--ms 1,64,256] [--lt]   (prefill chunks: --ms 4096,8192,16384)
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def timed(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    start.record()
    g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3  # us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,64,256", help="row counts (batch rows or prefill chunk tokens)")
    ap.add_argument("--lt", action="store_true", help="also time both layouts through cuBLASLt")
    args = ap.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    x = torch.empty(2**28, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 2 / (timed(lambda: y.copy_(x), 10) * 1e-6)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    flops = 2 * 8192**3 / (timed(lambda: a @ a, 10) * 1e-6)
    print(f"copy {bw / 1e12:.2f} TB/s, matmul {flops / 1e12:.0f} TFLOP/s")
    for m in ms:
        total = {"linear": 0.0, "pretransposed": 0.0, "roof": 0.0, "lt": 0.0, "lt_t": 0.0}
        for name, (n, k) in SHAPES.items():
            if m >= 1024 and name == "lm_head":  # prefill computes logits for the last token only
                continue
            w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
            wt = w.t().contiguous()
            inp = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            r = 50 if m < 1024 else 5  # a graph of big outputs holds them all
            t1 = timed(lambda: F.linear(inp, w), r)
            t2 = timed(lambda: inp @ wt, r)
            if args.lt:
                default = torch.backends.cuda.preferred_blas_library()
                torch.backends.cuda.preferred_blas_library("cublaslt")
                total["lt"] += timed(lambda: F.linear(inp, w), r) * (1 if name == "lm_head" else 32)
                total["lt_t"] += timed(lambda: inp @ wt, r) * (1 if name == "lm_head" else 32)
                torch.backends.cuda.preferred_blas_library(default)
            roof = max(n * k * 2 / bw, 2 * m * n * k / flops) * 1e6
            reps = 1 if name == "lm_head" else 32
            total["linear"] += t1 * reps
            total["pretransposed"] += t2 * reps
            total["roof"] += roof * reps
            rate = f"  {2 * m * n * k / t1 / 1e6:4.0f} / {2 * m * n * k / t2 / 1e6:4.0f} TFLOP/s" if m >= 1024 else ""
            print(f"M={m:4d} {name:8s} linear {t1:7.1f} us  pretransposed {t2:7.1f} us  roofline {roof:7.1f} us "
                  f"({roof / t1:5.1%} / {roof / t2:5.1%}){rate}")
        lt = f", cuBLASLt {total['lt'] / 1e3:.2f} / {total['lt_t'] / 1e3:.2f} ms" if args.lt else ""
        print(f"M={m:4d} per step: linear {total['linear'] / 1e3:.2f} ms, pretransposed "
              f"{total['pretransposed'] / 1e3:.2f} ms, roofline {total['roof'] / 1e3:.2f} ms{lt}")
        del w, wt


if __name__ == "__main__":
    main()
