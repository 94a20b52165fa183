"""A cost model of the engine's scheduler on the 8B shape (no GPU): how admission order and the
per-step token budget change the time of bench/gpu.py's workloads. Each step decodes every running
request and fills the rest of the budget with prompt chunks; its time is the larger of one weight read
and its tokens' matmul time, plus its KV reads and prefill attention. Constants are the H200's (fit
within ~10% of the measured W1, W1-64, P512 and W2 rates).

    python bench/sched_sim.py

Its finding: W2 (lognormal output lengths, each request its own max_tokens) spends most of its time in
a tail of ~1,000 weight-bound steps at small batch. Admitting the longest max_tokens first with a small
budget overlaps that tail with the other requests' prefill (7.4-8.1 s instead of 10 s in the model),
but the same small budget slows the uniform workloads (P512 -10%), so no fixed setting wins both.
"Deadline" pacing does: longest first, and each step computes just enough prompt tokens that every
waiting request can still finish with the longest running one (none beyond the budget; the full budget
when some request has no slack). In the model it leaves W1/W1-64/P512 unchanged and makes W2 1.35x.
It only holds for known lengths (min_tokens = max_tokens), and in the engine its small prompt chunks
would make nearly every step a mixed one, run eagerly and synced to the host, not a graphed multi-step
lookahead: it needs CUDA graphs for mixed steps first (piecewise, around attention).

Measured since (the engine's lof policy, its prompt chunks in graphed lookaheads; results/
trace-8b-W2-20261202.txt): W2 ran 8-18% slower than FCFS, not 1.35x faster. The model's step costs do not
hold at these batches: a lookahead step of ~40 long-context decode rows and ~130 prompt tokens took
10-13.5 ms on the H200, not ~6: GEMMs at ~176 rows ran at ~450 TFLOP/s (the model: 650, or the weight
read), the few decode rows' attention cannot fill the GPU the way 256 rows do, and the prefill kernel
is latency-bound on a few short chunks over long prefixes (no split over the prefix).
"""
from __future__ import annotations

import numpy as np

WEIGHT_READ_S = 3.9e-3  # 16 GB of bf16 weights at ~4.1 TB/s
MATMUL_FLOPS = 650e12  # effective bf16 rate of the projections
KV_BYTES_PER_S = 3.6e12  # decode attention's measured rate
KV_BYTES_PER_TOKEN = 131072  # 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes
FLOPS_PER_TOKEN = 16e9  # 2 x 8B parameters
ATTN_FLOPS = 300e12  # prefill attention kernel
STEP_OVERHEAD_S = 0.25e-3


def workload(name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(prompt lengths, output lengths), as bench/gpu.py draws them."""
    fixed = {"W1": (256, 128, 512), "W1-64": (64, 128, 512), "P512": (256, 512, 128)}
    if name in fixed:
        n, p, o = fixed[name]
        return np.full(n, p), np.full(n, o)

    def lognormal(mean: float, lo: int, hi: int) -> np.ndarray:
        return np.clip(rng.lognormal(np.log(mean) - 0.8 ** 2 / 2, 0.8, 256), lo, hi).astype(int)
    return lognormal(600, 16, 2048), lognormal(250, 8, 1024)


def step_seconds(decode_contexts: list[int], chunks: list[tuple[int, int]]) -> float:
    """chunks: (tokens already cached, tokens computed now) of each prompt chunk."""
    tokens = len(decode_contexts) + sum(n for _, n in chunks)
    gemm = max(WEIGHT_READ_S, tokens * FLOPS_PER_TOKEN / MATMUL_FLOPS)
    kv = (sum(decode_contexts) + sum(s + n for s, n in chunks)) * KV_BYTES_PER_TOKEN / KV_BYTES_PER_S
    attention = sum(4 * n * (s + n / 2) * 4096 * 32 for s, n in chunks) / ATTN_FLOPS
    return gemm + kv + attention + STEP_OVERHEAD_S


def simulate(prompts: np.ndarray, outputs: np.ndarray, order: list[int], budget: int,
             max_seqs: int = 256, paced: bool = False) -> float:
    waiting, running = list(order), {}  # request -> [prompt tokens computed, tokens generated]
    seconds = 0.0
    while waiting or running:
        decoding = [i for i, (c, _) in running.items() if c >= prompts[i]]
        left = budget - len(decoding)
        if paced:
            left = deadline_allowance(prompts, outputs, running, waiting, budget)
        chunks = []
        for i in [i for i, (c, _) in running.items() if c < prompts[i]]:
            n = min(prompts[i] - running[i][0], left)
            if n > 0:
                chunks.append((i, running[i][0], n))
                left -= n
        while left > 0 and waiting and len(running) < max_seqs:
            i = waiting.pop(0)
            running[i] = [0, 0]
            n = min(prompts[i], left)
            chunks.append((i, 0, n))
            left -= n
        seconds += step_seconds([prompts[i] + running[i][1] for i in decoding], [(s, n) for _, s, n in chunks])
        for i in decoding:
            running[i][1] += 1
        for i, _, n in chunks:
            running[i][0] += n
            running[i][1] += running[i][0] >= prompts[i]  # the last chunk samples the first token
        for i in [i for i, (_, g) in running.items() if g >= outputs[i]]:
            del running[i]
    return seconds


def deadline_allowance(prompts, outputs, running: dict, waiting: list[int], budget: int) -> int:
    """Prompt tokens this step under deadline pacing (running: request -> [computed, generated])."""
    longest = max([outputs[i] - g for i, (_, g) in running.items()], default=0)
    partial = [(i, prompts[i] - c) for i, (c, _) in running.items() if c < prompts[i]]
    cumulative = sum(r for _, r in partial)
    need = max([cumulative / max(1, longest - outputs[i]) for i, _ in partial], default=0.0)
    for j in waiting:
        cumulative += prompts[j]
        slack = longest - outputs[j]
        need = max(need, cumulative / slack if slack > 0 else budget)
    return int(min(budget, need)) + 1


def main() -> None:
    for name in ("W1", "W1-64", "P512", "W2"):
        prompts, outputs = workload(name, np.random.default_rng(0))
        orders = {"fcfs": list(range(len(prompts))),
                  "longest-first": sorted(range(len(prompts)), key=lambda i: -outputs[i])}
        cells = [f"{order}/{budget}: {outputs.sum() / simulate(prompts, outputs, o, budget):,.0f}"
                 for order, o in orders.items() for budget in (16384, 2048, 512, 256)]
        paced = outputs.sum() / simulate(prompts, outputs, orders["longest-first"], 16384, paced=True)
        print(f"{name:6} out tok/s  " + " | ".join(cells) + f" | deadline-paced: {paced:,.0f}", flush=True)


if __name__ == "__main__":
    main()
