#!/usr/bin/env python3
"""Online-serving benchmark: `tandem serve` vs llama.cpp's OpenAI server on the same GGUF.

Starts each server in turn (one at a time, so they never share the CPU), sends the same
fixed-seed workload through /v1/completions with streaming (httpx, Poisson arrivals at
--request-rate, at most --max-concurrency in flight), and reports TTFT, ITL and TPOT
percentiles, output tokens/s and requests/s. See bench/README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # bench/offline.py: the prompt builder and model paths
import offline  # noqa: E402

ENGINES = ("tandem", "llamacpp")
MODEL = "smollm2"


def workload(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Chat-templated prompt texts and exact output lengths, all fixed by --seed."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(offline.hf_model_dir())
    ids = offline.build_prompts(tok, args.num_prompts, args.seed, args.min_len, args.max_len)
    rng = random.Random(args.seed + 1)
    return [{"prompt": tok.decode(p), "prompt_tokens": len(p), "max_tokens": rng.randint(args.min_out, args.max_out)}
            for p in ids]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(engine: str, args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen:
    gguf = offline.gguf_path()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TANDEM_NO_PROGRESS": "1"}
    if engine == "tandem":
        cmd = [str(Path(sys.executable).with_name("tandem")), "serve", gguf, "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", MODEL, "--max-model-len", str(args.context),
               "--disable-log-requests", "--uvicorn-log-level", "warning"]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", MODEL,
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(args.context),
               "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_batch", "512",
               "--flash_attn", "True", "--interrupt_requests", "False", "--verbose", "False"]
    # cwd outside the repo: its top-level operator/ would shadow the standard library's
    return subprocess.Popen(cmd, cwd=tempfile.gettempdir(), env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s")


async def one_request(http: httpx.AsyncClient, url: str, item: dict[str, Any], model: str) -> dict[str, Any]:
    """Stream one completion; timestamps of every chunk that carries text."""
    body = {"model": model, "prompt": item["prompt"], "max_tokens": item["max_tokens"],
            "min_tokens": item["max_tokens"],  # exact lengths in both servers (EOS is masked until then)
            "temperature": 0.0, "repeat_penalty": 1.0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunks: list[float] = []
    usage = None
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                if any(c.get("text") for c in chunk.get("choices") or []):
                    chunks.append(time.perf_counter())
    except httpx.HTTPError as exc:
        return {"error": repr(exc)}
    end = time.perf_counter()
    if not chunks:
        return {"error": "no tokens"}
    # llama.cpp's stream has no usage: one chunk per token there, and min_tokens makes it exact
    tokens = (usage or {}).get("completion_tokens") or item["max_tokens"]
    return {"ttft": chunks[0] - start, "itl": [b - a for a, b in zip(chunks, chunks[1:])], "e2e": end - start,
            "tokens": tokens, "expected": item["max_tokens"], "chunks": len(chunks),
            "tpot": (end - chunks[0]) / max(tokens - 1, 1)}


async def run_load(url: str, items: list[dict[str, Any]], rate: float, concurrency: int,
                   seed: int, model: str = MODEL) -> tuple[list[dict[str, Any]], float]:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800), limits=limits) as http:
        async def limited(item: dict[str, Any]) -> dict[str, Any]:
            async with gate:
                return await one_request(http, url, item, model)

        tasks = []
        t0 = time.perf_counter()
        for item in items:
            tasks.append(asyncio.create_task(limited(item)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summarize(results: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    itl = [x for r in ok for x in r["itl"]]
    out = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
           "output_tokens": tokens, "output_tok_s": tokens / duration, "req_s": len(ok) / duration,
           "short_outputs": sum(r["tokens"] != r["expected"] for r in ok),
           "errors": sorted({r["error"] for r in results if "error" in r})[:5]}
    for name, values in (("ttft_ms", [r["ttft"] for r in ok]), ("itl_ms", itl), ("tpot_ms", [r["tpot"] for r in ok]),
                         ("e2e_ms", [r["e2e"] for r in ok])):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = 1000 * pct(values, q)
    return out


def bench_engine(engine: str, args: argparse.Namespace, items: list[dict[str, Any]], logdir: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = logdir / f"{engine}.log"
    busy = offline.cpu_busy()
    print(f"[serve-bench] starting {engine} (CPU {busy:.0%} busy before; log {log})", flush=True)
    if busy > 0.15:
        print("[serve-bench] WARNING: the machine is not idle; numbers will be distorted", flush=True)
    proc = launch(engine, args, port, log)
    try:
        wait_ready(url, proc, args.startup_timeout)
        warm = [{"prompt": "Hello there! How are you today?", "max_tokens": 8}] * 2
        asyncio.run(run_load(url, warm, float("inf"), 2, 0))
        print(f"[serve-bench] {engine}: {len(items)} requests, rate {args.request_rate}/s, "
              f"max concurrency {args.max_concurrency}", flush=True)
        results, duration = asyncio.run(run_load(url, items, args.request_rate, args.max_concurrency, args.seed))
        summary = summarize(results, duration)
        summary["cpu_busy_before"] = busy
        return summary
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def report(args: argparse.Namespace, items: list[dict[str, Any]], results: dict[str, dict[str, Any]]) -> None:
    cols = [("ok", "completed", "d"), ("fail", "failed", "d"), ("dur s", "duration_s", ".1f"),
            ("req/s", "req_s", ".2f"), ("out tok/s", "output_tok_s", ".1f")]
    cols += [(f"{m} p{q}", f"{m.lower()}_ms_p{q}", ".0f") for m in ("TTFT", "ITL") for q in (50, 90, 99)]
    cols += [("TPOT p50", "tpot_ms_p50", ".0f")]
    print("\nlatencies in ms")
    print(f"{'engine':<9}" + "".join(f"{c[0]:>10}" for c in cols))
    for engine, r in results.items():
        if "error" in r:
            print(f"{engine:<9} {r['error']}")
            continue
        print(f"{engine:<9}" + "".join(f"{r[key]:>10{fmt}}" for _, key, fmt in cols))
        if r["failed"] or r["short_outputs"]:
            print(f"          {r['failed']} failed, {r['short_outputs']} with unexpected lengths: {r['errors']}")
    t, l = results.get("tandem", {}), results.get("llamacpp", {})
    if "output_tok_s" in t and "output_tok_s" in l:
        ratio = t["output_tok_s"] / l["output_tok_s"]
        print(f"tandem / llama.cpp output tokens/s: {ratio:.2f}x (target >= 1.5x) "
              f"{'OK' if ratio >= 1.5 else 'BELOW TARGET'}")
        print(f"TTFT p50: tandem {t['ttft_ms_p50']:.0f} ms vs llama.cpp {l['ttft_ms_p50']:.0f} ms "
              f"{'OK' if t['ttft_ms_p50'] <= l['ttft_ms_p50'] else 'WORSE'}")
    out = Path(args.out or BENCH / "results" / f"serve-{dt.datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {**vars(args), "cpu_count": os.cpu_count(), "prompt_tokens": [i["prompt_tokens"] for i in items],
              "output_tokens": [i["max_tokens"] for i in items]}
    out.write_text(json.dumps({"config": config, "results": results}, indent=1))
    print(f"[serve-bench] results written to {out}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default=",".join(ENGINES), help="comma list of tandem,llamacpp")
    p.add_argument("--url", help="benchmark an already running server at this URL instead (name: 'url')")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrival rate in requests/s (default inf: all at once, gated by concurrency)")
    p.add_argument("--max-concurrency", type=int, default=16, help="requests in flight at most (clients)")
    for flag, default, help_ in (("--num-prompts", 64, "requests in the workload"),
                                 ("--min-len", 32, "approx. shortest prompt (tokens)"),
                                 ("--max-len", 512, "approx. longest prompt (tokens)"),
                                 ("--min-out", 32, "shortest output (tokens, exact)"),
                                 ("--max-out", 160, "longest output (tokens, exact)"),
                                 ("--context", 2048, "server context length"),
                                 ("--seed", 0, "workload and arrival seed"),
                                 ("--threads", 2, "CPU threads for every server"),
                                 ("--startup-timeout", 600, "seconds to wait for a server")):
        p.add_argument(flag, type=int, default=default, help=help_)
    p.add_argument("--out", help="JSON path (default bench/results/serve-<date>.json)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    items = workload(args)
    lens = sorted(i["prompt_tokens"] for i in items)
    print(f"[serve-bench] {len(items)} prompts, input tokens min/median/max {lens[0]}/{lens[len(lens) // 2]}/"
          f"{lens[-1]}, output {args.min_out}-{args.max_out} tokens (exact)", flush=True)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            url = args.url.rstrip("/")
            wait_ready(url, None, args.startup_timeout)
            model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
            res, duration = asyncio.run(run_load(url, items, args.request_rate, args.max_concurrency,
                                                 args.seed, model))
            results["url"] = summarize(res, duration)
        for engine in ([] if args.url else [e.strip() for e in args.engines.split(",") if e.strip()]):
            assert engine in ENGINES, f"--engines must be a subset of {ENGINES}"
            try:
                results[engine] = bench_engine(engine, args, items, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - report the other engine anyway
                log = Path(tmp, f"{engine}.log")
                tail = log.read_text()[-2000:] if log.exists() else ""
                results[engine] = {"error": f"{exc!r}\n{tail}"}
    report(args, items, results)


if __name__ == "__main__":
    main()
