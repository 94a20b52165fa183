"""The engine's host work alone, on CPUs: a bench/gpu.py workload (W2 by default, under lof) through the
real scheduler, pacing, lookahead planning, prompt-lane packing, staging and token application, with
the model's forward passes stubbed out (zeros in, greedy token 0 out; every request runs to its
max_tokens). On a GPU that work runs while the device computes the lookahead in flight (lookaheads.py),
so it must stay under a lookahead's device time (~70 ms for 8 lane steps on the 8B shape; before
lookaheads were planned ahead, the device idled through it: ~7.6 ms per lookahead, gpu_trace.py).

    python bench/host_overhead.py [--workload W2] [--policy lof] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time

os.environ.setdefault("TANDEM_ATTENTION_BACKEND", "triton")  # the graphs' static buffers and lookaheads
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import workload  # noqa: E402

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "float32"}


def stub_model() -> None:
    """Forward passes return zeros of the right shape: the host's work is all that is left."""
    from tandem.engine.cuda_graphs import DecodeGraphs
    from tandem.engine.model_runner import ModelRunner

    hidden = TINY["hidden_size"]

    def replay(self, key: tuple[int, str]) -> torch.Tensor:
        return torch.zeros(key[0], hidden)

    def forward(self, input_ids, positions, slots, seqs, on_layer_written) -> torch.Tensor:
        return torch.zeros(len(input_ids), hidden)

    DecodeGraphs._replay = replay
    ModelRunner._forward = forward


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="W2")
    ap.add_argument("--policy", default="lof")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    from tandem import LLM, SamplingParams

    torch.set_num_threads(1)
    stub_model()
    folder = tempfile.mkdtemp(prefix="tandem-host-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(TINY, f)
    llm = LLM(folder, load_format="dummy", skip_tokenizer_init=True, dtype="float32", max_model_len=4096,
              max_num_seqs=256, max_num_batched_tokens=16384, enable_prefix_caching=False,
              scheduling_policy=args.policy, num_scheduler_steps=8)
    eng = llm.engine
    reqs = workload(args.workload, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    prompts = [{"prompt_token_ids": rng.integers(0, TINY["vocab_size"], p).tolist()} for p, _ in reqs]
    params = [SamplingParams(temperature=0, max_tokens=o, min_tokens=o, ignore_eos=True) for _, o in reqs]
    calls: list[tuple[int, int, float]] = []  # (lookahead steps, prompt-lane tokens, seconds) per step() call
    step = eng.step

    def timed():
        s = eng.stats()
        t = time.perf_counter()
        out = step()
        e = eng.stats()
        calls.append((e.num_lookahead_steps - s.num_lookahead_steps,
                      e.num_lookahead_prompt_tokens - s.num_lookahead_prompt_tokens, time.perf_counter() - t))
        return out
    eng.step = timed
    prof = cProfile.Profile() if args.profile else None
    t = time.perf_counter()
    if prof:
        prof.enable()
    llm.generate(prompts, params, use_tqdm=False)
    if prof:
        prof.disable()
    total = time.perf_counter() - t
    lanes = [c for c in calls if c[1]]
    plain = [c for c in calls if c[0] and not c[1]]
    ordinary = [c for c in calls if not c[0]]
    print(f"{args.workload} {args.policy}: {total:.2f} s of host work, {len(calls)} step() calls; "
          f"lane lookaheads {len(lanes)} x {1000 * np.mean([c[2] for c in lanes] or [0]):.2f} ms, "
          f"plain lookaheads {len(plain)} x {1000 * np.mean([c[2] for c in plain] or [0]):.2f} ms, "
          f"ordinary steps {len(ordinary)} x {1000 * np.mean([c[2] for c in ordinary] or [0]):.2f} ms")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
