"""Can a prompt batch and a decode batch share the GPU? The question behind P512's last 10%: its prefill
GEMMs are compute-bound and its decode attention memory-bound, yet the engine runs one batch at a time.

On one engine's weights and cache (8B, bf16) this times
  prefill: one eager forward pass over N prompts of L tokens, as the engine's prompt steps run;
  decode: K graphed greedy steps of B rows at context C, as its lookaheads run (bench/gpu_step.py);
each alone, then both at once on two streams (either launched first; the decode stream at normal or
high priority), and prints the share of the shorter one that running them together hid. A share near 0
says two batches in flight cannot pay; a large one is the case for a two-batch scheduler.

    python bench/gpu_overlap.py [--shape 8b] [--prefill 32x512] [--decode 256x576] [--steps 0 (match)]

On a machine without CUDA it runs the same closures in turn (a smoke test, no timing worth reading):
    TANDEM_ATTENTION_BACKEND=triton TRITON_INTERPRET=1 python bench/gpu_overlap.py --shape tiny \
        --prefill 4x32 --decode 4x48 --steps 1 --repeat 1
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_models import config_folder  # noqa: E402
from gpu_step import greedy_step  # noqa: E402


def prefill_pass(llm, num: int, length: int, first_block: int):
    """A closure running one forward pass over `num` whole prompts of `length` tokens."""
    from tandem.engine.attention import build_attention, whole_prompts

    runner = llm.engine.runner
    seqs, slots = whole_prompts([length] * num, runner.block_size, first_block)
    ids = torch.randint(0, runner.model.shape.vocab, (num * length,), device=runner.device)
    positions = torch.arange(length, device=runner.device).repeat(num)
    attn = build_attention(runner.kv_caches, seqs, slots, runner.scale, runner.model.shape.sliding_window)
    return lambda: runner.model(ids, positions, attn)


def wall_ms(fn) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1e3


def on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def together(prefill, decode, steps: int, decode_first: bool, priority: int):
    """Both batches at once, each on its own stream, joined on the current one."""
    cuda = torch.cuda.is_available()
    pre = torch.cuda.Stream() if cuda else None
    dec = torch.cuda.Stream(priority=priority) if cuda else None

    def run():
        for s in (pre, dec):
            if s is not None:
                s.wait_stream(torch.cuda.current_stream())
        for stream, fn in ((dec, lambda: decode(steps)), (pre, prefill))[::1 if decode_first else -1]:
            with on(stream):
                fn()
        for s in (pre, dec):
            if s is not None:
                torch.cuda.current_stream().wait_stream(s)
    return run


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--prefill", default="32x512", help="prompts x tokens")
    ap.add_argument("--decode", default="256x576", help="rows x context")
    ap.add_argument("--steps", type=int, default=0, help="decode steps (0: as many as take the prefill's time)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    args = ap.parse_args()
    from tandem import LLM

    num, length = map(int, args.prefill.split("x"))
    rows, context = map(int, args.decode.split("x"))
    cuda = torch.cuda.is_available()
    block_size = 16
    decode_blocks = rows * -(-(context + 1) // block_size)
    # both batches' blocks at once: more than the engine's own cap (max_num_seqs full-length sequences)
    pool = 1 + decode_blocks + num * -(-length // block_size)
    llm = LLM(config_folder(args.shape), load_format="dummy", skip_tokenizer_init=True,
              dtype="bfloat16" if cuda else "float32", max_model_len=max(length, context + 64),
              max_num_seqs=rows, max_num_batched_tokens=num * length, gpu_memory_utilization=0.9,
              enable_prefix_caching=False, block_size=block_size, num_gpu_blocks_override=pool)
    decode = greedy_step(llm, rows, context, block_size)
    prefill = prefill_pass(llm, num, length, first_block=decode_blocks + 1)
    decode(2)  # compiles and warms both
    prefill()
    median = lambda fn: sorted(wall_ms(fn) for _ in range(args.repeat))[args.repeat // 2]  # noqa: E731
    pre_ms = median(prefill)
    step_ms = median(lambda: decode(4)) / 4
    steps = args.steps or max(1, round(pre_ms / step_ms))
    dec_ms = median(lambda: decode(steps))
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "date": datetime.datetime.now().isoformat(),
           "torch": torch.__version__, "shape": args.shape, "prefill": args.prefill, "decode": args.decode,
           "decode_steps": steps, "prefill_ms": round(pre_ms, 2), "decode_ms": round(dec_ms, 2), "together": {}}
    print(f"{args.shape}: prefill {args.prefill} {pre_ms:.1f} ms; decode {args.decode} x {steps} steps "
          f"{dec_ms:.1f} ms; in turn {pre_ms + dec_ms:.1f} ms", flush=True)
    for decode_first in (False, True):
        for priority in (0, -1):
            ms = median(together(prefill, decode, steps, decode_first, priority))
            hidden = (pre_ms + dec_ms - ms) / min(pre_ms, dec_ms)
            name = f"{'decode' if decode_first else 'prefill'} first, decode priority {priority}"
            res["together"][name] = {"ms": round(ms, 2), "hidden_share": round(hidden, 3)}
            print(f"  together, {name}: {ms:.1f} ms, hid {100 * hidden:.0f}% of the shorter", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"overlap-{args.shape}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("results:", path)


if __name__ == "__main__":
    main()
