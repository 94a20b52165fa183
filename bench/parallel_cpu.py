"""Tensor and pipeline parallelism on CPUs: what a group costs against one process, on the embedded SmolLM2.

On 2 cores a group cannot be faster (its ranks share the cores, and every layer adds gloo round trips over
loopback); this measures that overhead, so a change to the group's messaging shows up. Each configuration
generates the same greedy batch; the median of --repeat runs is reported, with the ranks' torch threads
pinned so that one process and a group use the same cores in all.

    python bench/parallel_cpu.py [--configs 1x1,3x1,1x2,3x2] [--threads 2] [--repeat 3] [--out bench/results]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="1x1,3x1,1x2,3x2", help="TPxPP list")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in all, split over a group's ranks")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    import torch

    from tandem import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    rows = {}
    for spec in args.configs.split(","):
        tp, pp = (int(x) for x in spec.split("x"))
        llm = LLM(None, dtype="float32", max_model_len=512, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                  enable_prefix_caching=False)
        g = torch.Generator().manual_seed(0)
        prompts = [{"prompt_token_ids": torch.randint(10, 40000, (args.prompt,), generator=g).tolist()}
                   for _ in range(args.batch)]
        params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - start)
        llm.engine.close()
        rows[spec] = {"seconds": statistics.median(times), "runs": times,
                      "out_tok_per_s": args.batch * args.tokens / statistics.median(times)}
        print(f"TP x PP {spec}: {rows[spec]['seconds']:.2f} s ({rows[spec]['out_tok_per_s']:.0f} out tok/s; "
              f"runs {', '.join(f'{t:.2f}' for t in times)})", flush=True)
    base = rows.get("1x1", {}).get("seconds")
    for spec, row in rows.items():
        if base:
            row["vs_one_process"] = row["seconds"] / base
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"parallel-cpu-{stamp}.json"), "w") as f:
        json.dump({"date": stamp, "cpus": os.cpu_count(), "threads": args.threads, "batch": args.batch,
                   "prompt": args.prompt, "tokens": args.tokens, "torch": torch.__version__, "results": rows}, f,
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
