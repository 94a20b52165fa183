"""GPU throughput of LLM.generate against transformers' generate and the roofline, on random-weight
bf16 models of Llama-3.2-1B and Llama-3.1-8B shapes (the GPU issue's workloads).

    python bench/gpu.py [--shapes 1b,8b] [--workloads W1,W1-64,P512,single,W2] [--no-hf] [--repeat N]
                        [--policy fcfs|lof] [--budget N] [--out DIR]

Every request is random token ids, greedy, ignore_eos with min_tokens = max_tokens, all submitted at
once after one warm-up pass (and the GPU itself under load for --warm-seconds first). The roofline: copy bandwidth and bf16 matmul rate are measured first;
ceiling time = prefill FLOPs / matmul rate + decode bytes (weights + the batch's KV, every step) /
copy bandwidth.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_models import config_folder, kv_bytes_per_token, llama_config, num_params  # noqa: E402

# vLLM 0.25.0 on an H200 (the table), output tokens/s
VLLM_H200 = {("W1", "1b"): 41168, ("W1", "8b"): 18817, ("W1-64", "1b"): 22382, ("W1-64", "8b"): 9616,
             ("P512", "1b"): 27736, ("P512", "8b"): 6962, ("single", "1b"): 533, ("single", "8b"): 201,
             ("W2", "8b"): 5852}
H200_COPY_TBPS = 4.25


def workload(name: str, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(prompt length, output length) per request."""
    if name == "W1":
        return [(128, 512)] * 256
    if name == "W1-64":
        return [(128, 512)] * 64
    if name == "P512":
        return [(512, 128)] * 256
    if name == "single":
        return [(512, 128)]
    if name == "W2":
        def lognormal(mean: float, lo: int, hi: int) -> np.ndarray:
            mu = np.log(mean) - 0.8 ** 2 / 2  # so that the mean is `mean`
            return np.clip(rng.lognormal(mu, 0.8, 256), lo, hi).astype(int)
        return list(zip(lognormal(600, 16, 2048).tolist(), lognormal(250, 8, 1024).tolist()))
    raise ValueError(f"unknown workload {name!r}")


def timed(fn, sync=True) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def warm_up_gpu(seconds: float) -> None:
    """bf16 matmuls for `seconds` before anything is timed. Without it the first engine on a freshly
    started machine ran W1's decode steps 4% slower than the second whichever policy it had
    (bench/gpu_trace.py --workload W1 --policies lof,fcfs, then fcfs,lof: 11.40 / 10.95 ms, then 11.76 /
    11.28); after it two fcfs engines in a row ran 10.28 / 10.29 ms (results/trace-8b-P512-20261204.txt)."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
    del a
    torch.cuda.empty_cache()


def ceilings() -> dict:
    """Copy bandwidth (bytes read + written) and bf16 matmul rate, medians of repeated runs."""
    src = torch.randn(2**30 // 2, dtype=torch.bfloat16, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    times = [timed(lambda: dst.copy_(src)) for _ in range(20)]
    copy = 2 * src.numel() * 2 / float(np.median(times[5:]))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    times = [timed(lambda: a @ b) for _ in range(20)]
    flops = 2 * 8192 ** 3 / float(np.median(times[5:]))
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": copy, "bf16_flops_per_s": flops}


def roofline_seconds(cfg: dict, requests: list[tuple[int, int]], ceil: dict) -> float:
    """Prefill at the matmul rate, then every decode step reads the weights and the running batch's KV."""
    params = num_params(cfg)
    prompt_tokens = sum(p for p, _ in requests)
    prefill = 2 * params * prompt_tokens / ceil["bf16_flops_per_s"]
    kv = kv_bytes_per_token(cfg)
    decode_bytes = 0
    for step in range(1, max(o for _, o in requests)):
        live = [(p + step) for p, o in requests if o > step]
        decode_bytes += 2 * params + kv * sum(live)
    return prefill + decode_bytes / ceil["copy_bytes_per_s"]


def profiled(fn, path: str):
    """fn() under cProfile; the top functions by own and cumulative time go to `path` and stdout."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    result = prof.runcall(fn)
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    with open(path, "w") as f:
        f.write(text.getvalue())
    print(text.getvalue()[:6000], flush=True)
    return result


@torch.inference_mode()
def decode_step_ms(llm, batch: int, context: int) -> float | None:
    """Device time of one graphed decode step (forward, logits, argmax) at `batch` rows of `context`
    tokens: the floor under the engine's step time, to set against the host's share. Every row reads
    blocks of its own (shared blocks would be served from L2 and understate attention)."""
    graphs = llm.engine.runner.graphs
    if graphs is None or (batch, "plain") not in graphs.graphs:
        return None
    d = graphs.dev
    blocks = -(-context // llm.engine.runner.block_size)
    if batch * blocks >= llm.engine.kv.pool.num_blocks:
        return None
    d["block_tables"][:batch, :blocks] = 1 + torch.arange(batch * blocks, dtype=torch.int32,
                                                          device="cuda").view(batch, blocks)
    d["context_lens"][:batch] = context
    d["slots"][:batch] = -1  # write nothing: the cache holds no live request now
    graph, hidden = graphs.graphs[batch, "plain"]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        graph.replay()
    start.record()
    for _ in range(20):
        graph.replay()
        llm.engine.model.compute_logits(hidden).argmax(-1)
    end.record()
    torch.cuda.synchronize()
    d["block_tables"][:batch].zero_()
    d["context_lens"][:batch] = 0
    return start.elapsed_time(end) / 20


def run_tandem(folder: str, runs: dict[str, list[tuple[int, int]]], rng, max_model_len: int,
               profile: str | None = None, out_dir: str = ".", repeat: int = 1, policy: str = "fcfs",
               steps: int = 8, budget: int = 16384, tp: int = 1) -> dict:
    from tandem import LLM, SamplingParams

    llm = LLM(folder, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", max_model_len=max_model_len,
              max_num_seqs=256, max_num_batched_tokens=budget, gpu_memory_utilization=0.9, enable_prefix_caching=False,
              scheduling_policy=policy, num_scheduler_steps=steps, tensor_parallel_size=tp)
    vocab = llm.engine.model.shape.vocab
    warm = [rng.integers(0, vocab, 64).tolist() for _ in range(8)]
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    out = {}
    for name, reqs in runs.items():
        prompts = [rng.integers(0, vocab, p).tolist() for p, _ in reqs]
        params = [SamplingParams(temperature=0, max_tokens=o, min_tokens=o, ignore_eos=True) for _, o in reqs]
        # the warm-up pass: this workload's shapes (prefill chunks, decode batches), few tokens each
        short = [SamplingParams(temperature=0, max_tokens=min(o, 16), min_tokens=min(o, 16), ignore_eos=True)
                 for _, o in reqs]
        llm.generate([rng.integers(0, vocab, p).tolist() for p, _ in reqs], short, use_tqdm=False)
        first, starts = [], []
        for _ in range(max(1, repeat)):  # the median of several: cells near their target are within run-to-run noise
            starts.append(time.time())  # to line runs up with a clock/power log
            t = time.perf_counter()
            results = llm.generate(prompts, params, use_tqdm=False)
            first.append(time.perf_counter() - t)
            tokens = sum(len(r.outputs[0].token_ids) for r in results)
            assert tokens == sum(o for _, o in reqs), "every request generates exactly its max_tokens"
        elapsed = statistics.median(first)
        stats = llm.stats()
        out[name] = {"seconds": elapsed, "output_tokens": tokens, "tok_per_s": tokens / elapsed,
                     "runs_seconds": first, "lookahead_steps": stats.num_lookahead_steps,
                     "lookahead_prompt_tokens": stats.num_lookahead_prompt_tokens, "run_starts_unix": starts}
        spread = f", runs {min(first):.2f}-{max(first):.2f} s" if repeat > 1 else ""
        print(f"  tandem {name}: {tokens / elapsed:,.0f} out tok/s ({elapsed:.2f} s{spread}; totals so far: "
              f"{stats.num_lookahead_steps} lookahead steps, {stats.num_lookahead_prompt_tokens} prompt tokens "
              f"in their lanes)", flush=True)
        if name == profile:  # again, under cProfile: where the host's time goes
            profiled(lambda: llm.generate(prompts, params, use_tqdm=False),
                     os.path.join(out_dir, f"profile-{os.path.basename(folder)}-{name}.txt"))
    out["num_kv_blocks"] = llm.engine.kv.pool.num_blocks
    out["decode_step_ms"] = {f"{b}x{c}": decode_step_ms(llm, b, c) for b, c in ((1, 576), (64, 384), (256, 384))}
    print(f"  device time of one decode step (batch x context): {out['decode_step_ms']}", flush=True)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return out


def run_hf(cfg: dict, runs: dict[str, list[tuple[int, int]]], rng) -> dict:
    """transformers' generate, one static batch per workload (equal lengths only)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    # torch 2.11's cuDNN attention failed inside generate on an H100 ("mha_graph.execute ... is_good()");
    # flash and memory-efficient SDPA remain
    torch.backends.cuda.enable_cudnn_sdp(False)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), dtype=torch.bfloat16).eval()
    out = {}
    warm = torch.randint(0, cfg["vocab_size"], (8, 64), device="cuda")
    model.generate(warm, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    for name, reqs in runs.items():
        if len(set(reqs)) != 1:
            out[name] = None  # variable lengths: no fair static batch
            continue
        p, o = reqs[0]
        ids = torch.from_numpy(rng.integers(0, cfg["vocab_size"], (len(reqs), p))).cuda()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                       do_sample=False, pad_token_id=0)  # warm-up at this workload's shapes
        elapsed = timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=o,
                                               min_new_tokens=o, do_sample=False, pad_token_id=0))
        tokens = len(reqs) * o
        out[name] = {"seconds": elapsed, "output_tokens": tokens, "tok_per_s": tokens / elapsed}
        print(f"  transformers {name}: {tokens / elapsed:,.0f} out tok/s ({elapsed:.2f} s)", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def unpruned_last_layer() -> None:
    """The engine as it ran before it pruned the last layer's rows: every row made, the sampled ones picked after."""
    from tandem.engine.model_runner import ModelRunner

    forward = ModelRunner._forward

    def every_row(self, input_ids, positions, slots, seqs, on_layer_written, keep=None, *rest):
        hidden = forward(self, input_ids, positions, slots, seqs, on_layer_written, None, *rest)
        return hidden if keep is None else hidden[self._device_tensor(keep)]
    ModelRunner._forward = every_row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--workloads", default="W1,W1-64,P512,single,W2")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--profile", help="a workload to run once more under cProfile")
    ap.add_argument("--fresh", action="store_true", help="a new engine for every workload (one process each, "
                    "as benchmarks of other engines run), instead of one engine running them in turn")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per workload; the median is reported")
    ap.add_argument("--policy", default="fcfs", help="the engine's scheduling policy (fcfs, as vLLM's "
                    "figures; lof: longest max_tokens first, prompts paced into the decode steps)")
    ap.add_argument("--steps", type=int, default=8, help="the engine's num_scheduler_steps (greedy decode steps "
                    "per host round trip)")
    # 16384 batched tokens: vLLM's default for its LLM class on GPUs of >= 70 GiB (arg_utils.py)
    ap.add_argument("--budget", type=int, default=16384, help="the engine's max_num_batched_tokens")
    ap.add_argument("--tp", type=int, default=1, help="the engine's tensor_parallel_size (GPUs)")
    ap.add_argument("--warm-seconds", type=float, default=20, help="GPU load before anything is timed")
    ap.add_argument("--no-prune", action="store_true", help="A/B: every prompt row through the last layer (the "
                    "engine computes only the sampled rows' projection and MLP there)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    args = ap.parse_args()
    if args.no_prune:
        unpruned_last_layer()
    import triton
    import transformers

    device = torch.cuda.get_device_name()
    warm_up_gpu(args.warm_seconds)
    ceil = ceilings()
    print(f"{device}: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    bw_scale = ceil["copy_bytes_per_s"] / 1e12 / H200_COPY_TBPS
    result = {"device": device, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
              "ceilings": ceil, "policy": args.policy, "num_scheduler_steps": args.steps,
              "max_num_batched_tokens": args.budget, "tensor_parallel_size": args.tp,
              "pruned_last_layer": not args.no_prune, "shapes": {}}
    rows = []
    for shape in args.shapes.split(","):
        cfg = llama_config(shape)
        rng = np.random.default_rng(0)
        runs = {w: workload(w, rng) for w in args.workloads.split(",")}
        longest = max(p + o for reqs in runs.values() for p, o in reqs)
        folder = config_folder(shape)
        print(f"{shape}: {num_params(cfg) / 1e9:.2f} B parameters", flush=True)
        os.makedirs(args.out, exist_ok=True)
        if args.fresh:
            ours = {}
            for w, reqs in runs.items():
                ours.update(run_tandem(folder, {w: reqs}, np.random.default_rng(1), max(longest, 4096),
                                       args.profile, args.out, args.repeat, args.policy, args.steps,
                                       args.budget, args.tp))
        else:
            ours = run_tandem(folder, runs, np.random.default_rng(1), max(longest, 4096), args.profile, args.out,
                              args.repeat, args.policy, args.steps, args.budget, args.tp)
        hf = {}
        if not args.no_hf:
            try:
                hf = run_hf(cfg, runs, np.random.default_rng(1))
            except Exception as exc:  # noqa: BLE001 - the baseline failing must not lose the engine's figures
                print(f"  transformers failed on {shape}: {type(exc).__name__}: {exc}", flush=True)
                result.setdefault("transformers_errors", {})[shape] = f"{type(exc).__name__}: {exc}"
                gc.collect()
                torch.cuda.empty_cache()
        shape_result = {}
        for w, reqs in runs.items():
            ceiling_tps = sum(o for _, o in reqs) / roofline_seconds(cfg, reqs, ceil)
            vllm = VLLM_H200.get((w, shape))
            target = vllm * 1.1 * (1.0 if "H200" in device else bw_scale) if vllm else None
            shape_result[w] = {"tandem": ours[w], "transformers": hf.get(w), "ceiling_tok_per_s": ceiling_tps,
                               "vllm_h200": vllm, "target_tok_per_s": target}
            t = ours[w]["tok_per_s"]
            h = (hf.get(w) or {}).get("tok_per_s")
            rows.append(f"{shape:>3} {w:<7} {t:>9,.0f} {h or 0:>9,.0f} {t / h if h else 0:>6.2f}x "
                        f"{ceiling_tps:>9,.0f} {100 * t / ceiling_tps:>5.1f}% "
                        f"{(vllm or 0):>8,} {t / target if target else 0:>6.2f}")
        result["shapes"][shape] = shape_result
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"gpu-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nshape workload  tandem/s     hf/s  ratio  ceiling/s  %ceil  vllm-H200  vs target(1.1x vllm"
          f"{'' if 'H200' in device else ' x copy-bandwidth ratio'}))")
    print("\n".join(rows))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
