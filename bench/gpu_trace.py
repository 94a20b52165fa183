"""Where a workload's wall time goes, engine step by engine step (8B shape, bench/gpu.py's workloads):
each step() call's wall time with what it ran (ordinary step, or a lookahead: its steps, decode rows and
prompt-lane tokens), summed by kind and by batch size.

    python bench/gpu_trace.py --workload W2 --policy lof
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import warm_up_gpu, workload  # noqa: E402
from gpu_models import config_folder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--workload", default="W2")
    ap.add_argument("--policies", default="fcfs,lof")
    ap.add_argument("--budget", type=int, default=16384, help="max_num_batched_tokens")
    ap.add_argument("--kprof", type=int, default=0, help="profile the kernels of this many step() calls "
                    "from --kprof-at on (CUPTI sees the kernels inside CUDA graphs)")
    ap.add_argument("--idle", action="store_true", help="with --kprof: also trace the host (Python calls) and "
                    "print the device's idle gaps with what the host ran in them")
    ap.add_argument("--kprof-at", type=int, default=4, help="the first step() call --kprof profiles")
    ap.add_argument("--list", type=int, default=0, help="print the first and last N step() calls one by one")
    ap.add_argument("--warm-seconds", type=float, default=20, help="GPU load before the first policy runs")
    args = ap.parse_args()
    from tandem import LLM, SamplingParams
    from tandem.engine.cuda_graphs import GreedyTokens

    reqs = workload(args.workload, np.random.default_rng(0))
    warm_up_gpu(args.warm_seconds)  # else the first policy runs on a cold GPU
    for policy in args.policies.split(","):
        llm = LLM(config_folder(args.shape), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                  max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=args.budget, gpu_memory_utilization=0.9,
                  enable_prefix_caching=False, scheduling_policy=policy)
        eng = llm.engine
        rng = np.random.default_rng(1)
        vocab = eng.model.shape.vocab
        prompts = [rng.integers(0, vocab, p).tolist() for p, _ in reqs]
        params = [SamplingParams(temperature=0, max_tokens=o, min_tokens=o, ignore_eos=True) for _, o in reqs]
        short = [SamplingParams(temperature=0, max_tokens=min(o, 16), min_tokens=min(o, 16), ignore_eos=True)
                 for _, o in reqs]
        llm.generate(prompts, short, use_tqdm=False)
        trace = []
        step = eng.step
        waited = [0.0]  # seconds the host spent waiting for lookaheads' tokens
        result = GreedyTokens.result

        def timed_result(self):
            t = time.perf_counter()
            try:
                return result(self)
            finally:
                waited[0] += time.perf_counter() - t
        GreedyTokens.result = timed_result

        prof = None
        scheduled = [(0, 0)]  # the last schedule()'s (rows, tokens): what an ordinary step computed
        schedule = eng.scheduler.schedule

        def counted():
            out = schedule()
            scheduled[0] = (len(out.scheduled), out.num_tokens)
            return out
        eng.scheduler.schedule = counted
        per_call = []  # per step() call: rows and tokens of its last schedule()
        host = []  # per step() call: its wall time less the wait for tokens (the device idles in part of it)

        def traced():
            nonlocal prof
            if args.kprof and len(trace) == args.kprof_at:
                acts = [torch.profiler.ProfilerActivity.CUDA] + [torch.profiler.ProfilerActivity.CPU] * args.idle
                prof = torch.profiler.profile(activities=acts, with_stack=args.idle)
                prof.__enter__()
            if prof is not None and len(trace) == args.kprof_at + args.kprof:
                torch.cuda.synchronize()
                prof.__exit__(None, None, None)
                window = trace[args.kprof_at:]
                print(f"profiled {len(window)} step() calls: {sum(max(w[0], 1) for w in window)} steps, "
                      f"{sum(w[1] for w in window)} prompt-lane tokens, running {window[0][2]}-{window[-1][2]}, "
                      f"{sum(w[3] for w in window):.3f} s")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
                if args.idle:
                    print_idle_gaps(prof)
                prof = None
            s = eng.stats()
            running = len(eng.scheduler.running)
            t = time.perf_counter()
            w = waited[0]
            scheduled[0] = (0, 0)
            out = step()
            wall = time.perf_counter() - t
            per_call.append(scheduled[0])
            host.append(wall - (waited[0] - w))
            e = eng.stats()
            trace.append((e.num_lookahead_steps - s.num_lookahead_steps,
                          e.num_lookahead_prompt_tokens - s.num_lookahead_prompt_tokens, running, wall))
            return out
        eng.step = traced
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        total = time.perf_counter() - t
        eng.step = step
        eng.scheduler.schedule = schedule
        GreedyTokens.result = result
        by = collections.defaultdict(lambda: [0, 0, 0.0])  # (kind, running bucket) -> calls, steps, seconds
        for steps, lanes, running, wall in trace:
            kind = "ordinary" if steps == 0 else ("lookahead+lanes" if lanes else "lookahead")
            key = (kind, running // 64 * 64)
            by[key][0] += 1
            by[key][1] += max(steps, 1)
            by[key][2] += wall
        rows = collections.defaultdict(lambda: [0, 0.0])  # rows a step (decode + lane tokens) -> steps, seconds
        for steps, lanes, running, wall in trace:
            if steps:
                r = running + lanes // steps
                rows[r // 32 * 32][0] += steps
                rows[r // 32 * 32][1] += wall
        print(f"{policy} {args.workload} (budget {args.budget}): {sum(o for _, o in reqs) / total:,.0f} out tok/s, "
              f"{total:.2f} s, "
              f"{len(trace)} step() calls, {sum(w for *_, w in trace):.2f} s in them", flush=True)
        for (kind, bucket), (calls, steps, secs) in sorted(by.items()):
            print(f"  {kind:16} running {bucket:3}-{bucket + 63:3}: {calls:5} calls {steps:5} steps {secs:6.2f} s "
                  f"({1000 * secs / steps:6.2f} ms/step)", flush=True)
        lane_host = [h for h, (_, lanes, _, _) in zip(host, trace) if lanes]
        print(f"  host time outside waits: {sum(host):.2f} s in all, {sum(lane_host):.2f} s in {len(lane_host)} "
              f"prompt-lane lookaheads ({1000 * sum(lane_host) / max(len(lane_host), 1):.2f} ms each)")
        for r, (steps, secs) in sorted(rows.items()):
            print(f"  lookahead steps of {r:3}-{r + 31:3} rows: {steps:5} steps {secs:6.2f} s ({1000 * secs / steps:6.2f} ms/step)")
        shown = range(len(trace)) if len(trace) <= 2 * args.list else [*range(args.list),
                                                                        *range(len(trace) - args.list, len(trace))]
        for i in shown if args.list else ():
            steps, lanes, running, wall = trace[i]
            rows, tokens = per_call[i]
            print(f"  call {i:4}: running {running:3} lookahead steps {steps} lane tokens {lanes:5} | last schedule "
                  f"{rows:3} rows {tokens:5} tokens | {1000 * wall:7.2f} ms")
        lanes = [(steps, lanes) for steps, lanes, _, _ in trace if lanes]
        if lanes:
            print(f"  prompt-lane tokens per lookahead step: {np.mean([l / s for s, l in lanes]):.0f} mean", flush=True)
        del llm, eng, step, traced
        gc.collect()
        torch.cuda.empty_cache()


def print_idle_gaps(prof, top: int = 10) -> None:
    """The device's idle gaps between kernels and copies (the union of their intervals), largest first,
    each with the host's Python calls that overlap it most (enclosing calls included)."""
    import json
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    device = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                    if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not device:
        print("device: no kernels or copies in the profiled calls")
        return
    py = [e for e in events if e.get("cat") == "python_function"]
    gaps, end = [], device[0][1]
    for a, b in device[1:]:
        if a > end:
            gaps.append((end, a))
        end = max(end, b)
    busy = end - device[0][0] - sum(b - a for a, b in gaps)
    print(f"device: {busy / 1000:.1f} ms busy, {sum(b - a for a, b in gaps) / 1000:.1f} ms idle in {len(gaps)} gaps "
          f"between its first and last kernel")
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        over = collections.Counter()
        for e in py:
            o = min(b, e["ts"] + e["dur"]) - max(a, e["ts"])
            if o > 0:
                over[e["name"]] += o
        names = ", ".join(f"{n} {o / 1000:.2f}" for n, o in over.most_common(8))
        print(f"  gap at +{(a - device[0][0]) / 1000:8.2f} ms: {(b - a) / 1000:6.2f} ms | {names}")


if __name__ == "__main__":
    main()
