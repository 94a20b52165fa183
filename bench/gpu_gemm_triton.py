"""Can a Triton GEMM beat cuBLAS on the 8B shape's linear layers at decode's ridge (64..320 rows)?

cuBLAS reaches ~70-80% of max(weight read, FLOPs) there (results/gemm-8b-sweep-20261203.txt), and W1,
W2 and P512's decode steps spend ~60% of their time in those GEMMs. This times, per weight shape, a
few tile configurations of two Triton kernels (pointer loads with the row tiles of one weight tile
launched together; tensor-descriptor loads on a persistent grid) against F.linear, every call on a
cold weight (copies rotated past the L2), then a whole step (32 layers of distinct weights) with each
shape's best pick.

    python bench/gpu_gemm_triton.py [--ms 128,192,256]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# block_m, block_n, block_k, num_warps, num_stages
CONFIGS = [(64, 128, 128, 4, 4), (64, 128, 64, 4, 5), (64, 256, 64, 4, 4), (64, 256, 64, 8, 4),
           (64, 64, 128, 4, 6), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3),
           (128, 64, 128, 4, 4), (64, 128, 128, 4, 3), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3)]


@triton.jit
def _mm_ptr(a_ptr, w_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    pid_m = pid % num_m  # the row tiles of one weight tile run side by side: the weight is read once
    pid_n = pid // num_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = a_ptr + rm[:, None] * K + rk[None, :]
    w = w_ptr + rn[None, :].to(tl.int64) * K + rk[:, None]
    acc = tl.zeros((BM, BN), tl.float32)
    for _ in range(0, K, BK):
        acc = tl.dot(tl.load(a, mask=rm[:, None] < M, other=0.0), tl.load(w), acc)
        a += BK
        w += BK
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=rm[:, None] < M)


@triton.jit
def _mm_tma(a_desc, w_desc, c_desc, M, N, K, STEP, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    num_m = tl.cdiv(M, BM)
    tiles = num_m * tl.cdiv(N, BN)
    for tile in range(tl.program_id(0), tiles, STEP):
        pid_m = tile % num_m
        pid_n = tile // num_m
        acc = tl.zeros((BM, BN), tl.float32)
        for k in range(0, K, BK):
            acc = tl.dot(a_desc.load([pid_m * BM, k]), w_desc.load([pid_n * BN, k]).T, acc)
        c_desc.store([pid_m * BM, pid_n * BN], acc.to(tl.bfloat16))


def launcher(kind: str, cfg, a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, sms: int):
    """A no-argument callable running one kernel with `cfg` on these tensors."""
    bm, bn, bk, warps, stages = cfg
    m, k = a.shape
    n = w.shape[0]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if kind == "ptr":
        return lambda: _mm_ptr[(tiles,)](a, w, c, m, n, k, bm, bn, bk, num_warps=warps, num_stages=stages)
    from triton.tools.tensor_descriptor import TensorDescriptor
    da, dw, dc = (TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
                  TensorDescriptor.from_tensor(c, [bm, bn]))
    grid = min(tiles, sms) if kind == "tma-persistent" else tiles
    return lambda: _mm_tma[(grid,)](da, dw, dc, m, n, k, grid, bm, bn, bk, num_warps=warps, num_stages=stages)


def graph_time(fns, reps: int) -> float:
    """us per pass over `fns`, replayed from one CUDA graph."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        best = min(best, s.elapsed_time(e) * 1e3 / reps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="128,192,256")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.empty(2**28, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 2 / (graph_time([lambda: y.copy_(x)], 5) * 1e-6)
    sq = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    flops = 2 * 8192**3 / (graph_time([lambda: sq @ sq], 5) * 1e-6)
    del x, y, sq
    print(f"copy {bw / 1e12:.2f} TB/s, matmul {flops / 1e12:.0f} TFLOP/s, {sms} SMs, triton {triton.__version__}")
    report = {"copy_TBps": bw / 1e12, "matmul_TFLOPs": flops / 1e12, "torch": torch.__version__,
              "triton": triton.__version__, "device": torch.cuda.get_device_name(), "shapes": {}, "steps": {}}
    picks: dict[tuple[int, str], tuple[str, tuple] | None] = {}
    for m in [int(v) for v in args.ms.split(",")]:
        for name, (n, k) in SHAPES.items():
            copies = max(2, int(3 * 60e6 // (n * k * 2)) + 1)  # enough copies to pass the L2 between reuses
            ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
            a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            c = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            want = F.linear(a, ws[0]).float()
            roof = max(n * k * 2 / bw, 2 * m * n * k / flops) * 1e6
            base = graph_time([lambda w=w: F.linear(a, w) for w in ws], 20) / copies
            row = {"cublas_us": base, "roofline_us": roof, "triton": {}}
            best = None
            for kind in ("ptr", "tma", "tma-persistent"):
                for cfg in CONFIGS:
                    try:
                        fns = [launcher(kind, cfg, a, w, c, sms) for w in ws]
                        fns[0]()
                        err = (c.float() - want).abs().max().item()
                        if err > 0.05 * want.abs().max().item():
                            row["triton"][f"{kind} {cfg}"] = f"wrong: max err {err:.3g}"
                            continue
                        t = graph_time(fns, 20) / copies
                    except Exception as e:  # a config the compiler or the shared memory refuses
                        row["triton"][f"{kind} {cfg}"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
                        continue
                    row["triton"][f"{kind} {cfg}"] = t
                    if best is None or t < best[0]:
                        best = (t, kind, cfg)
            row["best"] = best and {"us": best[0], "kind": best[1], "cfg": best[2]}
            picks[(m, name)] = best and (best[1], best[2])
            report["shapes"][f"M={m} {name}"] = row
            won = f"best {best[1]} {best[2]} {best[0]:7.1f} us ({base / best[0]:.3f}x)" if best else "no triton ran"
            print(f"M={m:4d} {name:8s} cuBLAS {base:7.1f} us (roofline {roof:6.1f})  {won}", flush=True)
            del ws, a, c
        # A step: 32 layers of distinct weights; each shape through cuBLAS, or through its pick where it won.
        layers = [{nm: torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for nm, (n, k) in SHAPES.items()}
                  for _ in range(32)]
        ins = {nm: torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for nm, (n, k) in SHAPES.items()}
        outs = {nm: torch.empty(m, n, dtype=torch.bfloat16, device="cuda") for nm, (n, k) in SHAPES.items()}
        cub = [lambda nm=nm, w=w: F.linear(ins[nm], w) for lay in layers for nm, w in lay.items()]
        mixed = []
        for lay in layers:
            for nm, w in lay.items():
                p = picks[(m, nm)]
                won = p and report["shapes"][f"M={m} {nm}"]["best"]["us"] < report["shapes"][f"M={m} {nm}"]["cublas_us"]
                mixed.append(launcher(p[0], p[1], ins[nm], w, outs[nm], sms) if won
                             else (lambda nm=nm, w=w: F.linear(ins[nm], w)))
        t_cub, t_mix = graph_time(cub, 3), graph_time(mixed, 3)
        report["steps"][m] = {"cublas_ms": t_cub / 1e3, "with_triton_picks_ms": t_mix / 1e3}
        print(f"M={m:4d} step of 32 layers: cuBLAS {t_cub / 1e3:.3f} ms, with Triton where it won {t_mix / 1e3:.3f} ms "
              f"({t_cub / t_mix:.3f}x)", flush=True)
        del layers, ins, outs, cub, mixed
        torch.cuda.empty_cache()
    path = os.path.join(args.out, f"gemm-triton-8b-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print("wrote", path)


if __name__ == "__main__":
    main()
