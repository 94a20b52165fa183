#!/usr/bin/env python3
"""Where Tandem's CPU time goes on bench/offline.py's workload, by wall clock per operation.

torch.profiler doubled the GEMMs' times on a 2-core VM (and hides nothing the engine calls), so this
wraps the engine's own entry points (ops.*, the attention kernel, the sampler) with timers instead.
Prefill and decode calls are told apart by row count. One warm-up on other prompts first.

    .venv/bin/python bench/cpu_breakdown.py [--dtype bfloat16] [--threads 2]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # appended: the repo's operator/ package must not shadow the stdlib's
sys.path.append(str(REPO / "bench"))


def timed(totals: dict, counts: collections.Counter, owner: object, name: str, by_rows: bool = False) -> None:
    """Replace owner.name with a wrapper adding its wall time to totals[label]."""
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        label = name + ((" prefill" if args[0].shape[0] > 64 else " decode") if by_rows else "")
        totals[label] += time.perf_counter() - start
        counts[label] += 1
        return out
    setattr(owner, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch
    from transformers import AutoTokenizer

    from offline import build_prompts, hf_model_dir
    from tandem import LLM, SamplingParams
    from tandem.engine import attention, model_runner, ops
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(hf_model_dir())
    prompts = build_prompts(tok, args.num_prompts, 0, 16, 512)  # offline.py's defaults
    warmup = build_prompts(tok, 4, 1, 16, 512)
    llm = LLM(model=None, dtype=args.dtype)
    totals: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    # the head's GEMM (compute_logits) counts in linear's rows too
    for name in ("linear", "rms_norm", "rope_and_cache", "silu_and_mul"):
        timed(totals, counts, ops, name, by_rows=True)
    timed(totals, counts, attention.TorchAttention, "attend")
    timed(totals, counts, attention.TorchAttention, "_prefill")  # chunks SDPA takes (NATIVE_MAX_CONTEXT)
    timed(totals, counts, attention.cpu_kernels, "paged_decode_attention")
    timed(totals, counts, model_runner, "sample")
    timed(totals, counts, llm.engine.model, "compute_logits")
    timed(totals, counts, llm.engine.model, "forward")
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, min_tokens=args.max_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in warmup], greedy.clone(max_tokens=8, min_tokens=8), use_tqdm=False)
    totals.clear()
    counts.clear()
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    wall = time.perf_counter() - start
    print(f"\nwall {wall:.2f} s for {args.num_prompts} x {args.max_tokens} tokens ({args.dtype}, "
          f"{args.threads} threads)")
    for label, secs in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {label:28s} {secs:7.2f} s {counts[label]:7d} calls")


if __name__ == "__main__":
    main()
