"""Paged decode attention at the engine's own batches (8B geometry, bf16, CUDA graphs), by split count.

The kernel benchmark (attention_speed.py) times one shape: 64 rows of 4,096 tokens. The engine's steps look
otherwise: W1's 256 rows of ~384 tokens, and W2's mixed steps, ~30-130 decode rows of lognormal
lengths followed by ~140 prompt-lane rows the decode kernel skips (context 0). This times each such
batch by split count and per-sequence split floor (min_split_tokens: 1 splits every sequence in
NUM_SPLITS parts however short) and reports the copy-bandwidth share of the K/V bytes read.

    python bench/gpu_decode_mix.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import workload  # noqa: E402
from attention_speed import copy_bandwidth, median_ms  # noqa: E402

HQ, HKV, D, BLOCK = 32, 8, 128, 16


LARGE = ((1, 0), (4, 1), (8, 1), (8, 128), (8, 256), (8, 512), (16, 128), (16, 256), (16, 512), (32, 256))
# few rows: too few (sequence, KV head) programs to fill the SMs, so the floor, not the batch, bounds the splits
SMALL = ((1, 0), (2, 64), (2, 256), (4, 64), (4, 256), (8, 64), (8, 128), (16, 64), (16, 128), (16, 256), (32, 64))


def case(name: str, contexts: np.ndarray, lanes: int, copy_gbs: float, configs=LARGE) -> dict:
    from tandem.kernels.paged_decode_attention import paged_decode_attention

    n = len(contexts)
    rows = n + lanes  # the mixed graph's grid covers the lanes too; they have context 0
    lens = np.concatenate([contexts, np.zeros(lanes, np.int64)])
    width = int(-(-lens.max() // BLOCK))
    blocks = int(sum(-(-c // BLOCK) for c in contexts))
    perm = torch.randperm(blocks + 1).int()
    table = torch.zeros(rows, width, dtype=torch.int32)
    at = 0
    for i, c in enumerate(contexts):
        k = int(-(-c // BLOCK))
        table[i, :k] = perm[at:at + k]
        at += k
    cache = torch.randn(2, blocks + 1, BLOCK, HKV, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(rows, HQ, D, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros_like(q)
    table, lens_t = table.cuda(), torch.tensor(lens, dtype=torch.int32, device="cuda")
    moved = int(contexts.sum()) * HKV * D * 2 * 2
    res = {"case": name, "decode_rows": n, "lane_rows": lanes, "mean_context": round(float(contexts.mean())),
           "max_context": int(contexts.max()), "kv_bytes": moved}
    for splits, floor in configs:  # (num_splits, min_split_tokens)
        ms = median_ms(lambda: paged_decode_attention(q, cache, table, lens_t, D ** -0.5, num_splits=splits, out=out,
                                                      max_context_len=4096, write_empty_rows=lanes == 0,
                                                      min_split_tokens=floor), graph=True)
        res[f"splits_{splits}_floor_{floor}"] = {"us": round(ms * 1e3, 1),
                                                 "pct_of_copy": round(100 * moved / ms / 1e6 / copy_gbs, 1)}
    print(json.dumps(res), flush=True)
    return res


TILES = ((32, 2, 2), (32, 2, 3), (32, 4, 2), (32, 4, 3), (64, 2, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3),
         (128, 4, 2), (128, 8, 2), (128, 8, 3))


def tiles(name: str, contexts: np.ndarray, copy_gbs: float, lanes: int = 0, splits: int = 1, floor: int = 64) -> dict:
    """A batch by tile config (block_n, warps, stages) at a fixed split count and floor, against decode_config's."""
    from tandem.kernels.paged_decode_attention import decode_config, launch_decode, sm_count

    rows = len(contexts) + lanes
    lens = np.concatenate([contexts, np.zeros(lanes, np.int64)])
    width = int(-(-lens.max() // BLOCK))
    blocks = rows * width
    table = torch.randperm(blocks).int().view(rows, width).cuda()
    cache = torch.randn(2, blocks, BLOCK, HKV, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(rows, HQ, D, device="cuda", dtype=torch.bfloat16)
    out, lens_t = torch.zeros_like(q), torch.tensor(lens, dtype=torch.int32, device="cuda")
    moved = int(contexts.sum()) * HKV * D * 2 * 2
    res = {"case": name, "splits": splits, "floor": floor,
           "default": decode_config(D, q.device, rows * HKV * splits / sm_count(q.device), splits)}
    for block_n, warps, stages in TILES:
        ms = median_ms(lambda: launch_decode(q, cache, table, lens_t, D ** -0.5, None, splits, out, block_n, warps,
                                             stages, write_empty_rows=lanes == 0, min_split_tokens=floor), graph=True)
        res[f"{block_n}_{warps}w_{stages}s"] = {"us": round(ms * 1e3, 1),
                                                "pct_of_copy": round(100 * moved / ms / 1e6 / copy_gbs, 1)}
    print(json.dumps(res), flush=True)
    return res


def save(path: str, copy_gbs: float, results: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"copy_gbs": copy_gbs, "torch": torch.__version__, "cases": results}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    ap.add_argument("--small", action="store_true", help="the small batches instead: single, W1-64, a few rows")
    ap.add_argument("--tiles", action="store_true", help="tile configs of one split at equal contexts instead")
    ap.add_argument("--mixed-tiles", action="store_true", help="tile configs of W2's mixed steps (8 splits, floor 256)")
    args = ap.parse_args()
    copy_gbs = copy_bandwidth()
    print(f"copy {copy_gbs:.0f} GB/s", flush=True)
    rng = np.random.default_rng(0)
    if args.tiles:
        save(os.path.join(args.out, "decode-tiles.json"), copy_gbs,
             [tiles(f"{n} x {c}", np.full(n, c), copy_gbs) for n, c in ((64, 192), (64, 384), (64, 640), (128, 384),
                                                               (256, 384), (256, 576))])
        return
    if args.small:
        save(os.path.join(args.out, "decode-small.json"), copy_gbs,
             [case(f"{n} x {c}", np.full(n, c), 0, copy_gbs, SMALL)
              for n, c in ((1, 576), (2, 576), (4, 576), (8, 576), (16, 576), (32, 384), (64, 192), (64, 384),
                           (64, 640))])
        return
    w2 = workload("W2", rng)
    # a W2 request mid-flight: its prompt and part of its output in the cache
    w2_ctx = np.array([p + int(rng.integers(0, o)) for p, o in w2])
    if args.mixed_tiles:
        save(os.path.join(args.out, "decode-mixed-tiles.json"), copy_gbs,
             [tiles(f"W2 mixed {n} rows", rng.choice(w2_ctx, n), copy_gbs, 140, 8, 256) for n in (64, 96, 128)])
        return
    results = [case("W1 256 rows", np.full(256, 384), 0, copy_gbs),
               case("P512 256 rows", np.full(256, 576), 0, copy_gbs)]
    for n in (24, 40, 64, 96, 128):
        results.append(case(f"W2 mixed {n} rows", rng.choice(w2_ctx, n), 140, copy_gbs))
    save(os.path.join(args.out, f"decode-mix-{torch.cuda.get_device_name().replace(' ', '-')}.json"), copy_gbs,
         results)


if __name__ == "__main__":
    main()
