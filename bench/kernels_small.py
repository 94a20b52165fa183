"""The elementwise Triton kernels against their torch twins at Llama-3.1-8B shapes (8192 tokens, bf16):
time per call and achieved memory bandwidth (bytes each op must move / time). CUDA only.

    python bench/kernels_small.py [--tokens 8192] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import torch

HIDDEN, INTER, NUM_Q, NUM_KV, HEAD_DIM = 4096, 14336, 32, 8, 128  # Llama-3.1-8B
BLOCK_SIZE, MAX_POSITIONS = 16, 131072


def _cases(tokens: int, dev: str = "cuda") -> list[tuple[str, int, Callable, Callable]]:
    """(name, bytes moved per call, kernel call, twin call) on fresh random bf16 inputs."""
    from tandem.engine.models.rope import rope_cos_sin
    from tandem.kernels import activation, cache_write, rmsnorm, rope

    dt = torch.bfloat16
    size = torch.tensor([], dtype=dt).element_size()
    x = torch.randn(tokens, HIDDEN, device=dev, dtype=dt)
    residual = torch.randn_like(x)
    weight = torch.randn(HIDDEN, device=dev, dtype=dt)
    gate_up = torch.randn(tokens, 2 * INTER, device=dev, dtype=dt)
    qkv = torch.randn(tokens, (NUM_Q + 2 * NUM_KV) * HEAD_DIM, device=dev, dtype=dt)
    q, k, v = (t.view(tokens, -1, HEAD_DIM) for t in qkv.split([NUM_Q * HEAD_DIM, NUM_KV * HEAD_DIM,
                                                                 NUM_KV * HEAD_DIM], dim=-1))
    positions = torch.randint(0, MAX_POSITIONS, (tokens,), device=dev)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cos, sin = (t.to(dev) for t in rope_cos_sin(HEAD_DIM, MAX_POSITIONS, 500000.0, scaling))
    num_blocks = tokens // BLOCK_SIZE + 1
    cache = torch.zeros(2, num_blocks, BLOCK_SIZE, NUM_KV, HEAD_DIM, device=dev, dtype=dt)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=dev)[:tokens]
    rope_bytes = 2 * tokens * (NUM_Q + NUM_KV) * HEAD_DIM * size + 2 * tokens * HEAD_DIM * 4
    return [
        ("rms_norm", 2 * x.numel() * size,
         lambda: rmsnorm.rms_norm(x, weight, 1e-5), lambda: rmsnorm.rms_norm_ref(x, weight, 1e-5)),
        ("fused_add_rms_norm", 4 * x.numel() * size,
         lambda: rmsnorm.fused_add_rms_norm(x, residual, weight, 1e-5),
         lambda: rmsnorm.fused_add_rms_norm_ref(x, residual, weight, 1e-5)),
        ("silu_and_mul", 3 * tokens * INTER * size,
         lambda: activation.silu_and_mul(gate_up), lambda: activation.silu_and_mul_ref(gate_up)),
        ("apply_rope", rope_bytes,
         lambda: rope.apply_rope(q, k, positions, cos, sin), lambda: rope.apply_rope_ref(q, k, positions, cos, sin)),
        ("reshape_and_cache", 4 * k.numel() * size,
         lambda: cache_write.reshape_and_cache(k, v, cache, slots),
         lambda: cache_write.reshape_and_cache_ref(k, v, cache, slots)),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernels_small: CUDA is not available; skipped")
        return 0
    from triton.testing import do_bench

    rows = []
    print(f"{torch.cuda.get_device_name()}, {args.tokens} tokens, bfloat16")
    print(f"{'kernel':<20}{'triton ms':>11}{'GB/s':>9}{'torch ms':>11}{'GB/s':>9}{'speed-up':>10}")
    for name, nbytes, kernel, twin in _cases(args.tokens):
        ms_kernel, ms_twin = do_bench(kernel), do_bench(twin)
        row = {"kernel": name, "bytes": nbytes, "triton_ms": ms_kernel, "torch_ms": ms_twin,
               "triton_gbps": nbytes / ms_kernel / 1e6, "torch_gbps": nbytes / ms_twin / 1e6}
        rows.append(row)
        print(f"{name:<20}{ms_kernel:>11.4f}{row['triton_gbps']:>9.0f}{ms_twin:>11.4f}{row['torch_gbps']:>9.0f}"
              f"{ms_twin / ms_kernel:>9.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "tokens": args.tokens, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
