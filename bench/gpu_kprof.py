"""Where a workload's device time goes, kernel by kernel (torch.profiler, CUDA activity), for one
shape: run eagerly so every kernel shows by name.

    python bench/gpu_kprof.py --shape 8b --requests 256 --prompt 128 --new 32
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_models import config_folder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    from tandem import LLM, SamplingParams

    llm = LLM(config_folder(args.shape), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=16384, gpu_memory_utilization=0.9,
              enable_prefix_caching=False, enforce_eager=True)
    rng = np.random.default_rng(0)
    vocab = llm.engine.model.shape.vocab
    prompts = [rng.integers(0, vocab, args.prompt).tolist() for _ in range(args.requests)]
    params = SamplingParams(temperature=0, max_tokens=args.new, min_tokens=args.new, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
    print(f"{args.shape}: {args.requests} x ({args.prompt} prompt + {args.new} new), eager")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=90))


if __name__ == "__main__":
    main()
