"""`tandem up`: the whole disaggregated stack on this machine, each part its own process started
exactly as a pod would start it (`tandem router`, `tandem prefill`, `tandem decode`).

Lifecycle: the model is resolved once (a GGUF is converted before any worker needs it) -> the
router starts, then N prefill and M decode workers that register with it -> once every /health
answers and the router lists every worker, the gateway URL is printed -> a child that exits is
reported and restarted on the same ports (after a short backoff) -> Ctrl-C, or SIGTERM to the
launcher alone, stops every child (SIGTERM, then SIGKILL after a grace period). Children run in
their own sessions and die with the launcher (PR_SET_PDEATHSIG), so none outlives it.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tandem.engine.kv_transfer import shm
from tandem.kvstore.sizes import positive_bytes
from tandem.server.launch import lora_module
from tandem.worker.process import free_port

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: children may outlive a launcher killed with -9
        pass


def tandem_command() -> list[str]:
    exe = Path(sys.executable).with_name("tandem")
    return [str(exe)] if exe.exists() else [shutil.which("tandem") or sys.executable, *(
        [] if shutil.which("tandem") else ["-m", "tandem.cli"])]


@dataclass
class Child:
    name: str
    argv: list[str]
    http_port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    restarts: int = 0
    exited_at: float | None = None
    registers: bool = True  # a worker the router lists once it is up (the router and the KV store do not)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


class Stack:
    """The router and workers of one local deployment; tests drive it directly."""

    def __init__(self, model: str | None, port: int = 8000, num_prefill: int = 1, num_decode: int = 1,
                 host: str = "127.0.0.1", threads_per_worker: int | None = None, engine_args: list[str] = (),
                 router_args: list[str] = (), worker_args: list[str] = (), env: dict[str, dict[str, str]] | None = None,
                 log_dir: str | None = None, child_args: dict[str, list[str]] | None = None,
                 kv_store_bytes: int | None = None) -> None:
        """`env` and `child_args`: more environment and flags for the children so named (tests).
        `kv_store_bytes`: also a prefix KV store of that capacity, which the workers share."""
        self.host = host
        self.port = port
        self.grpc_port = free_port(host)
        self.log_dir = log_dir
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
        env, child_args = env or {}, child_args or {}
        cmd = tandem_command()
        model_arg = [model] if model else []
        # Every worker may use every core: a request's prefill and its decode rarely compute at once, and
        # idle workers sleep (OMP_WAIT_POLICY=PASSIVE below). Splitting the cores made a lone 1,000-token
        # prompt's TTFT 1.7x slower on 2 cores (median 2,125 ms against 1,245-1,300 ms, 7 streamed requests).
        threads = threads_per_worker or os.cpu_count() or 2
        store_args, stores = [], []
        if kv_store_bytes:
            store_port, store_http = free_port(host), free_port(host)
            stores = [Child("kvstore", [*cmd, "kvstore", "--host", host, "--port", str(store_port), "--http-port",
                                        str(store_http), "--capacity-bytes", str(kv_store_bytes)], store_http,
                            env.get("kvstore", {}), registers=False)]
            store_args = ["--kv-store", f"{host}:{store_port}"]  # the workers load from it, the router follows it
        self.children = [Child("router", [*cmd, "router", *model_arg, "--host", host, "--port", str(port),
                                          "--grpc-host", host, "--grpc-port", str(self.grpc_port),
                                          "--uvicorn-log-level", "warning", *engine_args_for_router(engine_args),
                                          *store_args, *router_args], port, env.get("router", {}), registers=False),
                         *stores]
        for role, count in (("prefill", num_prefill), ("decode", num_decode)):
            for i in range(count):
                name = f"{role}-{i}"
                grpc_port, http_port = free_port(host), free_port(host)
                self.children.append(Child(name, [
                    *cmd, role, *model_arg, "--host", host, "--port", str(grpc_port), "--http-port", str(http_port),
                    "--worker-id", name, "--router", f"{host}:{self.grpc_port}", "--num-threads", str(threads),
                    *engine_args, *worker_args, *store_args,
                    *child_args.get(name, [])], http_port, env.get(name, {})))
        self.stopping = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def start(self, child: Child) -> None:
        out = None
        if self.log_dir:
            out = open(os.path.join(self.log_dir, f"{child.name}.log"), "ab")
        # outside the repository: its top-level operator/ folder would shadow the standard library's
        # several engines share the cores: idle OpenMP threads must sleep, not spin
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "TANDEM_NO_PROGRESS": "1", **child.env}
        child.proc = subprocess.Popen(child.argv, env=env,
                                      cwd=tempfile.gettempdir(), stdout=out, stderr=subprocess.STDOUT if out else None,
                                      start_new_session=True, preexec_fn=_die_with_parent)
        child.exited_at = None

    def start_all(self) -> None:
        for child in self.children:
            self.start(child)

    def healthy(self, child: Child) -> bool:
        try:
            return httpx.get(f"http://{self.host}:{child.http_port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def registered(self) -> set[str]:
        try:
            workers = httpx.get(self.url + "/workers", timeout=2).json()["workers"]
        except (httpx.HTTPError, ValueError, KeyError):
            return set()
        return {w["worker_id"] for w in workers if w["healthy"]}

    def wait_ready(self, timeout: float = 300.0, names: list[str] | None = None) -> None:
        """Until every child (or those named) answers /health and the router lists each worker."""
        wanted = [c for c in self.children if names is None or c.name in names]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [c for c in self.children if c.proc is None or c.proc.poll() is not None]
            if dead and not self.stopping and names is None:
                raise RuntimeError(f"{dead[0].name} exited with code {dead[0].proc.returncode} while starting")
            workers = {c.name for c in wanted if c.registers}
            if all(self.healthy(c) for c in wanted) and workers <= self.registered():
                return
            time.sleep(0.2)
        raise TimeoutError(f"the stack was not ready after {timeout:.0f}s")

    def check(self, backoff: float = 1.0) -> list[str]:
        """Restart children that exited (after `backoff` seconds); returns what happened."""
        events = []
        now = time.monotonic()
        for c in self.children:
            if c.proc is None or c.proc.poll() is None or self.stopping:
                continue
            if c.exited_at is None:
                c.exited_at = now
                events.append(f"{c.name} (pid {c.proc.pid}) exited with code {c.proc.returncode}")
                shm.sweep()  # its staging files (pooled areas, a lease in flight): nobody else removes them
            elif now - c.exited_at >= backoff:
                c.restarts += 1
                self.start(c)
                events.append(f"{c.name} restarted (restart #{c.restarts}, pid {c.proc.pid})")
        return events

    def stop(self, grace: float = 10.0) -> None:
        self.stopping = True
        live = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in live:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        shm.sweep()  # what a killed worker left in /dev/shm


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signals a child's process group (each child leads its own session), so what it started goes too:
    a worker stopped while it compiles the CPU kernels would leave its compilers writing the build."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def lora_flags(modules: list[tuple[str, str]]) -> list[str]:
    return ["--lora-modules", *(f"{name}={os.path.abspath(path)}" for name, path in modules)] if modules else []


def engine_args_for_router(engine_args: list[str]) -> list[str]:
    """The router takes the model's context length, not the engine's memory flags."""
    out, it = [], iter(engine_args)
    for arg in it:
        if arg.startswith("--max-model-len"):
            out += [arg] if "=" in arg else [arg, next(it)]
    return out


def add_up_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("up", help="run the whole disaggregated stack locally (router, prefill and decode workers)",
                       description="Start a router, N prefill and M decode workers on this machine, each its own "
                                   "process, and print the OpenAI gateway URL. Ctrl-C stops them all.")
    p.add_argument("model", nargs="?", default=None, help="HF folder or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--port", type=int, default=8000, help="the gateway's port (default: 8000)")
    p.add_argument("--host", default="127.0.0.1", help="address every part binds (default: 127.0.0.1)")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (default: 1)")
    p.add_argument("--decode", type=int, default=1, help="decode workers (default: 1)")
    p.add_argument("--threads-per-worker", type=int,
                   help="torch threads per worker (default: all CPUs; idle workers sleep)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache per worker in GiB (default: 1)")
    p.add_argument("--kv-store-bytes", type=positive_bytes, metavar="SIZE",
                   help="also run a prefix KV store of this capacity (e.g. 2GiB) that the workers load prompt "
                        "prefixes from and save them to (default: none)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks per worker's layer, each a process holding its share of them (default: 1)")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="pipeline stages per worker, each holding a run of the layers (default: 1)")
    p.add_argument("--lora-modules", nargs="+", type=lora_module, metavar="NAME=PATH", default=[],
                   help="LoRA adapters (PEFT folders) every worker serves; the gateway lists each as a model")
    p.add_argument("--router-args", default="", help="more `tandem router` flags, one string (a lone flag takes '=': --router-args=--flag)")
    p.add_argument("--worker-args", default="", help="more flags for every worker, one string (a lone flag takes '=': --worker-args=--enforce-eager)")
    p.add_argument("--log-dir", help="write each process's log to DIR/NAME.log (default: this terminal)")
    p.set_defaults(func=cmd_up)
    return p


def cmd_up(args: argparse.Namespace) -> int:
    from tandem.engine.loader import resolve_model

    if args.prefill < 0 or args.decode < 1:
        print("tandem up: error: --decode must be >= 1 and --prefill >= 0", file=sys.stderr)
        return 2
    try:
        resolve_model(args.model)  # convert a GGUF once, before several processes want it
    except (ValueError, FileNotFoundError) as exc:
        print(f"tandem up: error: {exc}", file=sys.stderr)
        return 2
    engine_args = ["--dtype", args.dtype, "--kv-cache-gib", str(args.kv_cache_gib),
                   "--tensor-parallel-size", str(args.tensor_parallel_size),
                   "--pipeline-parallel-size", str(args.pipeline_parallel_size)]
    if args.max_model_len:
        engine_args += ["--max-model-len", str(args.max_model_len)]
    stack = Stack(args.model, args.port, args.prefill, args.decode, args.host, args.threads_per_worker, engine_args,
                  shlex.split(args.router_args),
                  shlex.split(args.worker_args) + lora_flags(args.lora_modules), log_dir=args.log_dir,
                  kv_store_bytes=args.kv_store_bytes)
    stop = {"signal": None}

    def on_signal(signum, _frame) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    say = lambda msg: print(f"[tandem up] {msg}", flush=True)  # noqa: E731
    say(f"starting a router, {args.prefill} prefill and {args.decode} decode workers"
        + (", a KV store" if any(c.name == "kvstore" for c in stack.children) else ""))
    try:
        stack.start_all()
        while True:  # ready, or a signal, or a child that died while starting
            if stop["signal"] is not None:
                return 0
            try:
                stack.wait_ready(timeout=2.0)
                break
            except TimeoutError:
                continue
        say(f"ready: OpenAI API at {stack.url}/v1 (model: {args.model or 'SmolLM2-135M-Instruct'})")
        for c in stack.children:
            say(f"  {c.name:<10} pid {c.pid}")
        say("Ctrl-C stops everything")
        while stop["signal"] is None:
            for event in stack.check():
                say(event)
            time.sleep(0.2)
        return 0
    except RuntimeError as exc:
        say(f"error: {exc}")
        return 1
    finally:
        say("stopping")
        stack.stop()
        say("stopped")
