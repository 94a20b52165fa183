#!/usr/bin/env python3
"""Disaggregated vs colocated serving on this machine, in one run (see bench/README.md).

1. The same open-loop workload (Poisson arrivals, fixed-seed prompt and output lengths, streaming)
   against colocated `tandem serve` and against `tandem up` (router + prefill + decode processes):
   TTFT and ITL p50/p99, output tokens/s.
2. TTFT of ~1000-token prompts, one request at a time (the handoff's own cost): median over
   repeats, and the overhead of disaggregation in percent (target <= 15%). With `--paired` (default)
   both deployments then run at once, idle but for the one request in flight, and each prompt goes to
   one and then the other, the order alternating: the overhead is the median of the per-prompt ratios,
   so this machine's speed drifting between phases (2x in an hour on a shared VM) cancels out.
3. KV transfer as the router saw it: GB/s on the wire (bytes / time with a chunk in flight),
   bytes, wire, queue and handshake time per request (target >= 0.8 GB/s on one host; --kv-transport).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import offline  # noqa: E402
import serve  # noqa: E402


def tandem() -> str:
    return str(Path(sys.executable).with_name("tandem"))


def start(kind: str, args: argparse.Namespace, port: int, logdir: Path) -> subprocess.Popen:
    model = [args.model] if args.model else []
    env = {**os.environ, "TANDEM_NO_PROGRESS": "1"}
    common = ["--max-model-len", str(args.context)]
    if kind == "colocated":
        cmd = [tandem(), "serve", *model, "--host", "127.0.0.1", "--port", str(port), "--served-model-name",
               serve.MODEL, "--disable-log-requests", "--uvicorn-log-level", "warning", *common]
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    else:
        per = args.worker_threads or args.threads
        cmd = [tandem(), "up", *model, "--port", str(port), "--threads-per-worker", str(per), "--kv-cache-gib", "2",
               "--router-args", f"--served-model-name {serve.MODEL} --disable-log-requests "
                                f"--local-prefill-threshold {args.local_prefill_threshold}",
               "--worker-args", f"--kv-transport {args.kv_transport}", "--log-dir", str(logdir), *common]
        env.update(OMP_NUM_THREADS=str(per), MKL_NUM_THREADS=str(per), OMP_WAIT_POLICY="PASSIVE")
    return subprocess.Popen(cmd, cwd=tempfile.gettempdir(), env=env, stdout=(logdir / f"{kind}.log").open("w"),
                            stderr=subprocess.STDOUT)


def long_prompts(args: argparse.Namespace, count: int | None = None, seed_offset: int = 7) -> list[dict[str, Any]]:
    """Prompts of ~long_len tokens, all different (a repeat would hit the prefix cache)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(offline.hf_model_dir())
    ids = offline.build_prompts(tok, count or args.long_repeats, args.seed + seed_offset, args.long_len,
                                args.long_len + 24)
    return [{"prompt": tok.decode(p), "prompt_tokens": len(p), "max_tokens": 1} for p in ids]


def transfer_raw(url: str) -> dict[str, float]:
    """The router's KV-transfer and decision counters, summed over label sets."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name.startswith("tandem:kv_transfer") or s.name.startswith("tandem:router_prefill_decisions"):
                key = s.name + (f"[{s.labels.get('decision')}]" if "decision" in s.labels else "")
                sums[key] = sums.get(key, 0.0) + s.value
    return sums


def derive(sums: dict[str, float]) -> dict[str, float]:
    n = sums.get("tandem:kv_transfer_wire_seconds_count", 0.0)
    wire = sums.get("tandem:kv_transfer_wire_seconds_sum", 0.0)
    total = sums.get("tandem:kv_transfer_bytes_total", 0.0)
    per = lambda key: 1e3 * sums.get(key, 0.0) / n if n else 0.0  # noqa: E731
    return {"transfers": n, "bytes": total, "bytes_per_transfer": total / n if n else 0.0,
            "wire_ms_per_transfer": per("tandem:kv_transfer_wire_seconds_sum"),
            "queue_ms_per_transfer": per("tandem:kv_transfer_queue_seconds_sum"),
            "handshake_ms_per_transfer": per("tandem:kv_transfer_handshake_seconds_sum"),
            "gbps": total / wire / 1e9 if wire else 0.0,
            **{d: sums.get(f"tandem:router_prefill_decisions_total[{d}]", 0.0) for d in ("remote", "local", "fallback")}}


def ready(kind: str, args: argparse.Namespace, logdir: Path) -> tuple[subprocess.Popen, str]:
    """A started, warmed deployment of `kind` and its URL."""
    port = serve.free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(kind, args, port, logdir)
    try:
        serve.wait_ready(url, proc, args.startup_timeout)
        if kind == "disaggregated":  # the router answers before every worker registered: wait for both
            deadline = time.monotonic() + args.startup_timeout
            while len([w for w in httpx.get(url + "/workers").json()["workers"] if w["healthy"]]) < 2:
                assert time.monotonic() < deadline, "workers did not register"
                time.sleep(0.5)
    except BaseException:
        serve.stop(proc)
        raise
    return proc, url


def paired(args: argparse.Namespace, longs: list[dict[str, Any]], logdir: Path) -> dict[str, Any]:
    """Both deployments up at once; each long prompt to one then the other (alternating which first).
    `longs`: prompts neither deployment saw before (the first one warms them both up)."""
    started = []
    try:
        started = [ready(kind, args, logdir) for kind in ("colocated", "disaggregated")]
        urls = [url for _, url in started]
        for url in urls:
            asyncio.run(serve.run_load(url, longs[:1], float("inf"), 1, 0))
        pairs = []
        for i, item in enumerate(longs[1:]):
            ttft = {}
            for k in ((0, 1) if i % 2 == 0 else (1, 0)):
                r = asyncio.run(serve.run_load(urls[k], [item], float("inf"), 1, 0))[0][0]
                assert "error" not in r, r
                ttft[k] = 1e3 * r["ttft"]
            pairs.append((ttft[0], ttft[1]))
        ratios = [d / c for c, d in pairs]
        return {"pairs_ms": pairs, "ratio_median": statistics.median(ratios),
                "colocated_median_ms": statistics.median(c for c, _ in pairs),
                "disaggregated_median_ms": statistics.median(d for _, d in pairs)}
    finally:
        for proc, _ in started:
            serve.stop(proc)


def run_kind(kind: str, args: argparse.Namespace, items, longs, logdir: Path) -> dict[str, Any]:
    busy = offline.cpu_busy()
    print(f"[pd-bench] starting {kind} (CPU {busy:.0%} busy before)", flush=True)
    proc, url = ready(kind, args, logdir)
    try:
        warm = [{"prompt": "Hello there! How are you today?", "max_tokens": 8}] * 2 + longs[:1]
        asyncio.run(serve.run_load(url, warm, float("inf"), 1, 0))
        before = transfer_raw(url) if kind == "disaggregated" else {}
        ttfts = []
        for item in longs:  # one at a time: the handoff's cost, not queueing
            r = asyncio.run(serve.run_load(url, [item], float("inf"), 1, 0))[0][0]
            assert "error" not in r, r
            ttfts.append(r["ttft"])
        after_long = transfer_raw(url) if kind == "disaggregated" else {}
        print(f"[pd-bench] {kind}: open-loop {len(items)} requests at {args.request_rate}/s", flush=True)
        results, duration = asyncio.run(serve.run_load(url, items, args.request_rate, args.max_concurrency,
                                                        args.seed))
        out = serve.summarize(results, duration)
        out["long_ttft_ms"] = [1e3 * t for t in ttfts]
        out["long_ttft_ms_median"] = 1e3 * statistics.median(ttfts)
        if kind == "disaggregated":
            out["transfer_long"] = derive({k: v - before.get(k, 0.0) for k, v in after_long.items()})
            out["transfer_all"] = derive(transfer_raw(url))
        out["cpu_busy_before"] = busy
        return out
    finally:
        serve.stop(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF folder or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--request-rate", type=float, default=1.0, help="Poisson arrivals per second (default: 1)")
    p.add_argument("--max-concurrency", type=int, default=16)
    for flag, default in (("--num-prompts", 32), ("--min-len", 32), ("--max-len", 1024), ("--min-out", 16),
                          ("--max-out", 64), ("--context", 2048), ("--seed", 0), ("--threads", 2),
                          ("--long-len", 1000), ("--long-repeats", 8), ("--local-prefill-threshold", 128),
                          ("--startup-timeout", 600), ("--worker-threads", 0), ("--paired-rounds", 2)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--kv-transport", choices=["auto", "grpc", "shm"], default="auto",
                   help="the workers' KV transport (default: auto, shared memory on one host)")
    p.add_argument("--out", help="JSON path (default bench/results/pd-<date>.json)")
    p.add_argument("--no-paired", dest="paired", action="store_false",
                   help="skip the interleaved TTFT comparison (both deployments up at once)")
    args = p.parse_args()
    items = serve.workload(args)
    longs = long_prompts(args)
    print(f"[pd-bench] {len(items)} open-loop prompts ({args.min_len}-{args.max_len} tokens, {args.min_out}-"
          f"{args.max_out} out), {len(longs)} prompts of ~{longs[0]['prompt_tokens']} tokens for TTFT", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("colocated", "disaggregated"):
            results[kind] = run_kind(kind, args, items, longs, Path(tmp))
        if args.paired:
            fresh = long_prompts(args, 1 + args.long_repeats * args.paired_rounds, seed_offset=11)
            results["paired"] = paired(args, fresh, Path(tmp))
    c, d = results["colocated"], results["disaggregated"]
    print("\nlatencies in ms        TTFT p50  TTFT p99   ITL p50   ITL p99  out tok/s  1k-prompt TTFT (median)")
    for kind, r in ((k, results[k]) for k in ("colocated", "disaggregated")):
        print(f"{kind:<20}{r['ttft_ms_p50']:>10.0f}{r['ttft_ms_p99']:>10.0f}{r['itl_ms_p50']:>10.1f}"
              f"{r['itl_ms_p99']:>10.1f}{r['output_tok_s']:>11.1f}{r['long_ttft_ms_median']:>14.0f}")
    overhead = d["long_ttft_ms_median"] / c["long_ttft_ms_median"] - 1
    print(f"handoff adds {overhead:+.1%} to the TTFT of ~{args.long_len}-token prompts, phase against phase "
          f"(target <= +15%)")
    if args.paired:
        pr = results["paired"]
        print(f"interleaved, both up at once: median per-prompt ratio {pr['ratio_median'] - 1:+.1%} "
              f"({pr['colocated_median_ms']:.0f} ms colocated, {pr['disaggregated_median_ms']:.0f} ms "
              f"disaggregated, {len(pr['pairs_ms'])} pairs)")
    t = d["transfer_long"]
    print(f"KV transfer ({args.long_len}-token prompts, --kv-transport {args.kv_transport}): {t['gbps']:.2f} GB/s "
          f"on the wire (target >= 0.8), "
          f"{t['bytes_per_transfer'] / 1e6:.1f} MB, wire {t['wire_ms_per_transfer']:.1f} ms, queue "
          f"{t['queue_ms_per_transfer']:.1f} ms, handshake {t['handshake_ms_per_transfer']:.2f} ms per request")
    a = d["transfer_all"]
    print(f"open-loop decisions: remote {a['remote']:.0f}, local {a['local']:.0f}, fallback {a['fallback']:.0f}; "
          f"all transfers {a['gbps']:.2f} GB/s")
    out = Path(args.out or BENCH / "results" / f"pd-{dt.datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": {**vars(args), "cpu_count": os.cpu_count()}, "results": results}, indent=1))
    print(f"[pd-bench] results written to {out}")


if __name__ == "__main__":
    main()
