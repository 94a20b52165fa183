"""Where one graphed greedy decode step's device time goes, kernel by kernel, at a few (batch, context)
points of the 8B shape: the step as the engine runs it (graph replay, then logits, logsumexp, argmax
and the next step's inputs), timed with CUDA events and profiled with torch.profiler. Each row's
blocks are distinct, so attention reads as much memory as a live batch would.

    python bench/gpu_step.py [--shape 8b] [--points 1x576,64x384,256x384]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_models import config_folder  # noqa: E402
from gpu_timing import graph_us  # noqa: E402


def greedy_step(llm, batch: int, context: int, block_size: int, scatter: bool = False):
    """A closure running one lookahead step of `batch` rows at `context` tokens, as the engine does;
    `scatter`: the blocks drawn at random from the whole pool (a long-running engine's free list)
    instead of one contiguous run per row."""
    from tandem.engine import ops

    graphs = llm.engine.runner.graphs
    d = graphs.dev
    device = d["context_lens"].device  # CUDA; CPUs run the same closure for smoke tests (bench/gpu_overlap.py)
    blocks = -(-(context + 1) // block_size)
    if scatter:
        pool = llm.engine.runner.kv_caches[0].shape[1]
        table = (torch.randperm(pool - 1, device=device)[:batch * blocks] + 1).to(torch.int32).view(batch, blocks)
    else:
        table = torch.arange(batch * blocks, dtype=torch.int32, device=device).view(batch, blocks) + 1
    d["block_tables"][:batch, :blocks] = table
    d["context_lens"][:batch] = context
    d["positions"][:batch] = context - 1
    d["input_ids"][:batch] = 0
    key = next(k for k in ((batch, "plain"), (batch, "spread")) if k in graphs.graphs)  # equal contexts: plain
    tokens = torch.empty(batch, dtype=torch.long, device=device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=device)
    rows = [d[k][:batch] for k in ("input_ids", "positions", "context_lens", "slots", "block_tables")]

    def run(steps: int = 1):  # DecodeGraphs.run_greedy_steps' loop, on inputs already in place
        d["context_lens"][:batch] = context  # the loop advances them: keep the point fixed
        d["positions"][:batch] = context - 1
        for _ in range(steps):
            logits = llm.engine.runner._raw_logits(graphs._replay(key)[:batch])
            ops.greedy_advance(logits, tokens, logprobs, *rows, block_size)
        return tokens
    return run


def attention_sweep(llm, batch: int, context: int) -> None:
    """paged decode attention alone at this point: the engine's graph config, then a sweep."""
    from tandem.kernels.paged_decode_attention import choose_num_splits, decode_config, launch_decode, sm_count

    graphs = llm.engine.runner.graphs
    cache = llm.engine.runner.kv_caches[0]
    s = llm.engine.model.shape
    q = torch.randn(batch, s.num_heads, s.head_dim, dtype=cache.dtype, device="cuda")
    out = torch.empty_like(q)
    tables, lens = graphs.dev["block_tables"][:batch], graphs.dev["context_lens"][:batch]
    kv_bytes = batch * context * 2 * s.num_kv_heads * s.head_dim * cache.element_size()
    engine_splits = choose_num_splits(batch, s.num_kv_heads, graphs.max_model_len, sm_count(q.device))
    results = []
    for splits in (1, 2, 4, 8, 16):
        for block_n, warps, stages in ((64, 4, 3), (64, 2, 3), (32, 4, 3), (32, 2, 2), (16, 2, 2)):
            us = graph_us(lambda _: launch_decode(q, cache, tables, lens, s.head_dim ** -0.5, None, splits, out,
                                                  block_n, warps, stages), 1, rounds=20)
            results.append((us, splits, block_n, warps, stages))
    results.sort()
    cfg = decode_config(s.head_dim, q.device, batch * s.num_kv_heads * engine_splits / sm_count(q.device),
                        engine_splits)
    engine = [r for r in results if r[1:] == (engine_splits, cfg["block_n"], cfg["num_warps"], cfg["num_stages"])][0]
    print(f"  attention alone, {kv_bytes / 1e6:.1f} MB of KV: engine (splits {engine_splits}) {engine[0]:.2f} us "
          f"({kv_bytes / engine[0] / 1e3:.0f} GB/s); best: " +
          "; ".join(f"{us:.2f} us splits {sp} block_n {bn} warps {w} stages {st}" for us, sp, bn, w, st in results[:4]))


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--points", default="1x576,64x384,256x384,64x4000")
    ap.add_argument("--rows", type=int, default=22)
    ap.add_argument("--no-sweep", action="store_true", help="skip the attention tile sweep")
    ap.add_argument("--scatter", action="store_true", help="blocks at random places in the pool")
    args = ap.parse_args()
    from tandem import LLM

    llm = LLM(config_folder(args.shape), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=16384, gpu_memory_utilization=0.9,
              enable_prefix_caching=False)
    block_size = llm.engine.runner.block_size
    for point in args.points.split(","):
        batch, context = map(int, point.split("x"))
        run = greedy_step(llm, batch, context, block_size, args.scatter)
        run(3)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(20)
        end.record()
        torch.cuda.synchronize()
        step_ms = start.elapsed_time(end) / 20
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(10)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        kernel_ms = sum(e.self_device_time_total for e in events) / 1000 / 10
        print(f"\n{args.shape} {batch}x{context}: step {step_ms:.3f} ms (events); kernels sum {kernel_ms:.3f} ms")
        if not args.no_sweep:
            attention_sweep(llm, batch, context)
        print(f"{'kernel':<70} {'us/step':>9} {'calls/step':>10} {'us/call':>8}")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.rows]:
            print(f"{e.key[:70]:<70} {e.self_device_time_total / 10:>9.1f} {e.count / 10:>10.1f} "
                  f"{e.self_device_time_total / max(e.count, 1):>8.2f}")


if __name__ == "__main__":
    main()
