"""Attention kernel speed on the GPU (CUDA only).

Decode at the target shape (batch 64, 4,096-token contexts, Hq=32, Hkv=8, D=128, bf16, block size
16): time, GB/s moved (K+V read, q read, out written) and % of the copy bandwidth measured here
(a large device-to-device copy), against the torch twin; a sweep of split counts and tile configs;
split-K at small batches. Prefill at 8B geometry (16 x 512-token prompts, or the `--prefill` shapes):
the kernel against its twin, against torch's scaled_dot_product_attention on contiguous K/V, and a
sweep of tile configs.

    python bench/attention_speed.py [--quick] [--prefill 32x512,4x2048,1x8192] [--prefill-only] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys

import torch


def median_ms(fn, graph: bool = False) -> float:
    """Median time in ms; L2 flushed between runs. graph=True replays fn in a CUDA graph (no launch
    overhead), as the engine runs decode."""
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        # Triton's graph bench runs fn on a stream of its own that waits on nothing: inputs just made on the
        # default stream (torch.full of context lengths) may not exist yet (an illegal address, seen once)
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, return_mode="median")
    return do_bench(fn, return_mode="median")


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy, counting the read and the write."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def paged_inputs(batch: int, context: int, num_heads: int, num_kv: int, head_dim: int, block_size: int,
                 queries: int, gen: torch.Generator):
    """q [batch * queries, Hq, D], a cache holding exactly the batch's blocks, and shuffled block tables."""
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    tables = torch.randperm(num_blocks, generator=gen).view(batch, blocks_per_seq).int().cuda()
    cache = torch.randn(2, num_blocks, block_size, num_kv, head_dim, generator=gen).to("cuda", torch.bfloat16)
    q = torch.randn(batch * queries, num_heads, head_dim, generator=gen).to("cuda", torch.bfloat16)
    return q, cache, tables


def bench_decode(copy_gbs: float, quick: bool) -> dict:
    from tandem.kernels.paged_decode_attention import (choose_num_splits, decode_config, launch_decode,
                                                       paged_decode_attention, paged_decode_attention_ref)

    batch, context, num_heads, num_kv, head_dim, block_size = 64, 4096, 32, 8, 128, 16
    gen = torch.Generator().manual_seed(0)
    q, cache, tables = paged_inputs(batch, context, num_heads, num_kv, head_dim, block_size, 1, gen)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    scale = head_dim ** -0.5
    moved = 2 * batch * context * num_kv * head_dim * 2 + 2 * q.numel() * 2 + tables.numel() * 4

    def report(ms: float) -> dict:
        return {"ms": round(ms, 4), "GB/s": round(moved / ms / 1e6, 1), "pct_of_copy": round(100 * moved / ms / 1e6 / copy_gbs, 1)}

    run = lambda: paged_decode_attention(q, cache, tables, lens, scale, out=out, max_context_len=context)  # noqa: E731
    want = paged_decode_attention_ref(q.float(), cache.float(), tables, lens, scale)
    run()
    err = (out.float() - want).abs().max().item()
    auto = choose_num_splits(batch, num_kv, context, torch.cuda.get_device_properties(0).multi_processor_count)
    res = {"shape": dict(batch=batch, context=context, num_heads=num_heads, num_kv=num_kv, head_dim=head_dim,
                         block_size=block_size, dtype="bfloat16"),
           "bytes_moved": moved, "max_abs_err_vs_fp32": err, "auto_num_splits": auto,
           "default_config": decode_config(head_dim, q.device),
           "kernel": report(median_ms(run)), "kernel_cuda_graph": report(median_ms(run, graph=True)),
           "twin": report(median_ms(lambda: paged_decode_attention_ref(q, cache, tables, lens, scale)))}
    print(f"decode B={batch} ctx={context}: kernel {res['kernel']} | in a CUDA graph {res['kernel_cuda_graph']} | "
          f"twin {res['twin']} | auto splits {auto} | max err {err:.3g}", flush=True)

    sweep = []
    grid = [(s, 64, 4, 3) for s in (1, 2, 4)] if quick else itertools.product((1, 2, 4), (32, 64, 128), (4, 8), (2, 3, 4))
    for splits, block_n, warps, stages in grid:
        cfg = dict(block_n=block_n, num_warps=warps, num_stages=stages)
        try:
            ms = median_ms(lambda: launch_decode(q, cache, tables, lens, scale, None, splits, out, **cfg))
        except Exception as e:  # a config the GPU cannot hold (shared memory): skip it
            print(f"  splits={splits} {cfg}: {type(e).__name__}", flush=True)
            continue
        sweep.append({"num_splits": splits, **cfg, **report(ms)})
    sweep.sort(key=lambda r: r["ms"])
    res["sweep_best"] = sweep[:8]
    for r in sweep[:8]:
        print(f"  {r}", flush=True)

    small = []
    for b, ctx in ((1, 32768), (4, 16384), (16, 8192)):
        q2, cache2, tables2 = paged_inputs(b, ctx, num_heads, num_kv, head_dim, block_size, 1, gen)
        lens2 = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        moved2 = 2 * b * ctx * num_kv * head_dim * 2
        row = {"batch": b, "context": ctx}
        for splits in (1, None):
            ms = median_ms(lambda: paged_decode_attention(q2, cache2, tables2, lens2, scale, num_splits=splits,
                                                          max_context_len=ctx), graph=True)
            row["auto" if splits is None else "no_split"] = {"ms": round(ms, 4), "GB/s": round(moved2 / ms / 1e6, 1)}
        small.append(row)
        print(f"decode split-K B={b} ctx={ctx}: {row}", flush=True)
    res["split_k_small_batches"] = small
    return res


def bench_prefill(quick: bool, num_seqs: int = 16, length: int = 512) -> dict:
    import torch.nn.functional as F

    from tandem.kernels.paged_prefill_attention import (launch_prefill, paged_prefill_attention,
                                                        paged_prefill_attention_ref, prefill_config)

    num_heads, num_kv, head_dim, block_size = 32, 8, 128, 16
    gen = torch.Generator().manual_seed(1)
    q, cache, tables = paged_inputs(num_seqs, length, num_heads, num_kv, head_dim, block_size, length, gen)
    cu = torch.arange(0, (num_seqs + 1) * length, length, dtype=torch.int32, device="cuda")
    lens = torch.full((num_seqs,), length, dtype=torch.int32, device="cuda")
    scale = head_dim ** -0.5
    flops = 4 * num_seqs * num_heads * head_dim * length * (length + 1) / 2  # causal QK^T and PV

    def report(ms: float) -> dict:
        return {"ms": round(ms, 4), "TFLOP/s": round(flops / ms / 1e9, 1)}

    run = lambda: paged_prefill_attention(q, cache, cu, lens, tables, scale, max_query_len=length)  # noqa: E731
    if length <= 2048:  # the float32 twin's scores of a long prompt would take gigabytes
        want = paged_prefill_attention_ref(q.float(), cache.float(), cu, lens, tables, scale)
        err = (run().float() - want).abs().max().item()
    else:
        err = float("nan")
    # SDPA on contiguous K/V, expanded to every query head outside the timing (its flash path)
    kv = [cache[i][tables.long()].reshape(num_seqs, -1, num_kv, head_dim)[:, :length].transpose(1, 2)
          .repeat_interleave(num_heads // num_kv, 1).contiguous() for i in (0, 1)]
    qs = q.view(num_seqs, length, num_heads, head_dim).transpose(1, 2).contiguous()
    res = {"shape": dict(num_seqs=num_seqs, prompt_len=length, num_heads=num_heads, num_kv=num_kv, head_dim=head_dim,
                         block_size=block_size, dtype="bfloat16"),
           "max_abs_err_vs_fp32": err,
           "default_config": prefill_config(head_dim, num_heads // num_kv, q.dtype, q.device, length),
           "kernel": report(median_ms(run)),
           "twin": report(median_ms(lambda: paged_prefill_attention_ref(q, cache, cu, lens, tables, scale)))
           if length <= 2048 else None,
           "sdpa_contiguous": report(median_ms(lambda: F.scaled_dot_product_attention(qs, *kv, is_causal=True,
                                                                                        scale=scale)))}
    print(f"prefill {num_seqs}x{length}: kernel {res['kernel']} | twin {res['twin']} | SDPA {res['sdpa_contiguous']} "
          f"| max err {err:.3g}", flush=True)
    if not quick:
        sweep = []
        out = torch.empty_like(q)
        for block_m, block_n, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
            cfg = dict(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
            try:
                ms = median_ms(lambda: launch_prefill(q, cache, cu, lens, tables, scale, None, out, length, **cfg))
            except Exception as e:  # out of shared memory
                print(f"  {cfg}: {type(e).__name__}", flush=True)
                continue
            sweep.append({**cfg, **report(ms)})
        sweep.sort(key=lambda r: r["ms"])
        res["sweep_best"] = sweep[:6]
        for r in sweep[:6]:
            print(f"  {r}", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    ap.add_argument("--quick", action="store_true", help="skip the tile-config sweeps")
    ap.add_argument("--prefill", default="16x512", help="prefill shapes, sequences x prompt length, comma list")
    ap.add_argument("--prefill-only", action="store_true", help="skip decode")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/attention_speed.py: CUDA only, skipped")
        return 0
    copy_gbs = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbs:.0f} GB/s", flush=True)
    report = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "torch": torch.__version__, "copy_GB/s": round(copy_gbs, 1),
              "decode": None if args.prefill_only else bench_decode(copy_gbs, args.quick),
              "prefill": [bench_prefill(args.quick, *map(int, shape.split("x"))) for shape in args.prefill.split(",")]}
    if report["decode"]:
        target = report["decode"]["kernel_cuda_graph"]["pct_of_copy"]
        print(f"decode target (>= 70% of copy bandwidth): {target}%", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"kernels-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
