"""Why a workload slows down after others ran in the same process (bench/results: P512 1b ran at
27.9k out tok/s first in a process, 16.6k after two other engines; transformers' generate ran 4x
below the issue's figure after our engines). Prints, per phase: out tok/s, wall vs process CPU
time, GPU memory held, live Python objects and threads, with GC on and off.

    python bench/gpu_diag.py
"""
from __future__ import annotations

import gc
import os
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_models import config_folder, llama_config  # noqa: E402


def state() -> str:
    return (f"GPU allocated {torch.cuda.memory_allocated() / 2**30:.1f} GiB, reserved "
            f"{torch.cuda.memory_reserved() / 2**30:.1f} GiB, free {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB; "
            f"{len(gc.get_objects())} objects, {threading.active_count()} threads")


def timed(label: str, fn, tokens: int) -> None:
    torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{label}: {tokens / wall:,.0f} out tok/s, wall {wall:.2f} s, process CPU {cpu:.2f} s | {state()}", flush=True)


def main() -> None:
    from tandem import LLM, SamplingParams

    folder = config_folder("1b")
    rng = np.random.default_rng(0)
    print("start |", state(), flush=True)

    def engine():
        return LLM(folder, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", max_model_len=4096,
                   max_num_seqs=256, max_num_batched_tokens=8192, enable_prefix_caching=False)

    def workload(llm, n, p, o):
        prompts = [rng.integers(0, 128256, p).tolist() for _ in range(n)]
        params = SamplingParams(temperature=0, max_tokens=o, min_tokens=o, ignore_eos=True)
        return lambda: llm.generate(prompts, params, use_tqdm=False)

    llm = engine()
    workload(llm, 8, 64, 16)()
    timed("engine 1, P512 first", workload(llm, 256, 512, 128), 256 * 128)
    timed("engine 1, W1", workload(llm, 256, 128, 512), 256 * 512)
    timed("engine 1, P512 after W1", workload(llm, 256, 512, 128), 256 * 128)
    gc.disable()
    timed("engine 1, P512 after W1, GC off", workload(llm, 256, 512, 128), 256 * 128)
    gc.enable()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    print("engine 1 deleted |", state(), flush=True)
    llm = engine()
    workload(llm, 8, 64, 16)()
    timed("engine 2, P512", workload(llm, 256, 512, 128), 256 * 128)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    from transformers import AutoModelForCausalLM, LlamaConfig
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**llama_config("1b")), dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 128256, (1, 512), device="cuda")
    gen = lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,  # noqa: E731
                                 min_new_tokens=32, do_sample=False, pad_token_id=0)
    gen()
    timed("transformers single, 32 tokens", gen, 32)


if __name__ == "__main__":
    main()
