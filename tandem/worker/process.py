"""`tandem prefill` / `tandem decode`: one worker process, as a pod runs it.

The main thread runs an asyncio loop with the gRPC server (the role's service and Worker.GetState),
the HTTP side (/health, /metrics) and the heartbeat to the router; the engine steps on its own
thread. SIGTERM or SIGINT: deregister, stop taking requests, end the engine, exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import socket
import sys

from tandem.engine.kv_transfer import DEFAULT_CHUNK_BYTES
from tandem.kvstore.replicas import address_argument
from tandem.proto import router_pb2, router_pb2_grpc

log = logging.getLogger("tandem.worker")


def add_worker_args(p: argparse.ArgumentParser) -> None:
    from tandem.cli import _add_engine_args
    from tandem.server.launch import add_lora_args

    _add_engine_args(p)
    g = p.add_argument_group("worker")
    g.add_argument("--host", default="0.0.0.0", help="address the gRPC and HTTP servers bind (default: 0.0.0.0)")
    g.add_argument("--port", type=int, default=0, help="gRPC port (default: 0, any free port)")
    g.add_argument("--http-port", type=int, default=0, help="HTTP port of /health and /metrics (default: any free)")
    g.add_argument("--advertise-address", help="host:port peers use to reach this worker's gRPC server "
                   "(default: $POD_IP or 127.0.0.1, with the bound port)")
    g.add_argument("--worker-id", help="stable worker name (default: $POD_NAME or ROLE-host:port)")
    g.add_argument("--router", metavar="HOST:PORT", help="the router's gRPC address to register and heartbeat with")
    g.add_argument("--heartbeat-interval", type=float, default=0.5, help="seconds between heartbeats (default: 0.5)")
    g.add_argument("--seed", type=int, default=0, help="engine random seed (default: 0)")
    g.add_argument("--num-threads", type=int, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--otlp-traces-endpoint", help="OTLP gRPC endpoint for traces (default: none)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--kv-chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES,
                   help="prefill: largest KV chunk on the wire, in bytes (default: 4 MiB)")
    g.add_argument("--kv-stream", choices=["auto", "layer", "step"], default="auto",
                   help="prefill: send a step's KV layer by layer during its forward pass (layer) or once it "
                        "ended (step); auto (default): layer on a GPU or when the engine's threads leave a CPU "
                        "core free, else step (sending would slow the forward pass)")
    g.add_argument("--kv-window", type=int, default=16,
                   help="prefill: KV chunks in flight before an acknowledgement (default: 16)")
    g.add_argument("--kv-transport", choices=["auto", "grpc", "shm", "nixl"], default="auto",
                   help="KV bytes between workers: shm stages them in shared memory (/dev/shm, a file per lease) "
                        "with gRPC for control; nixl (decode) stages them in memory registered with NIXL, which "
                        "prefill writes into from any host (UCX); grpc streams them; auto (default) uses what "
                        "decode offers (shm when on this host), else grpc (shm and nixl do too, with a warning)")
    g.add_argument("--kv-nixl-bytes", type=int, default=512 << 20,
                   help="decode with --kv-transport nixl: its registered staging buffer, shared by the leases in "
                        "flight (a lease that finds no room goes over gRPC; default: 512 MiB)")
    g.add_argument("--kv-store", metavar="HOST:PORT[,...]", type=address_argument,
                   default=os.environ.get("TANDEM_KVSTORE_ADDRESS") or None,
                   help="the prefix KV store (`tandem kvstore`) to load prompt prefixes from before computing them "
                        "and save computed blocks to; several replicas (a list, or a DNS name resolving to each) "
                        "each hold their share of the blocks (default: $TANDEM_KVSTORE_ADDRESS, which the operator "
                        "sets when the model's kvStore is enabled; else none)")
    add_lora_args(g)
    g.add_argument("--kv-port", type=int, default=0,
                   help="decode: port of the KV transfer server prefill workers write to (default: any free)")


def add_worker_parsers(sub: argparse._SubParsersAction) -> None:
    for role, text in ((router_pb2.PREFILL, "compute prompts' KV caches and write them into decode workers"),
                       (router_pb2.DECODE, "run the paged-attention engine for requests the router sends")):
        name = router_pb2.Role.Name(role).lower()
        p = sub.add_parser(name, help=f"a {name} worker: {text}",
                           description=f"A {name} worker: {text}. Serves gRPC; registers with --router.")
        add_worker_args(p)
        p.set_defaults(func=lambda args, role=role: run_worker(args, role), config_parser=p)


def engine_config(args: argparse.Namespace, kv_role: str):
    from tandem.config import EngineConfig

    return EngineConfig.from_args(args, kv_role=kv_role)


def parallel_settings(env: dict[str, str], args: argparse.Namespace) -> str | None:
    """The parallel group the operator placed this process in, onto `args` (tensor_parallel_size,
    pipeline_parallel_size, group: config.GroupConfig); or why it cannot serve there.

    The operator writes TANDEM_TENSOR_PARALLEL_SIZE and TANDEM_PIPELINE_PARALLEL_SIZE and, for a replica
    spanning pods, TANDEM_GROUP_SIZE (pods), TANDEM_WORKER_INDEX (this pod's) and TANDEM_LEADER_ADDRESS;
    TANDEM_GROUP_PORT (default 29500) is where the leader's group store listens, its command listener on the
    next port. Pod 0 is the leader and serves as a worker; the others host their ranks only (rank_worker.py)."""
    from tandem.config import GroupConfig

    sizes = {}
    for name, default in (("TANDEM_TENSOR_PARALLEL_SIZE", "1"), ("TANDEM_PIPELINE_PARALLEL_SIZE", "1"),
                          ("TANDEM_GROUP_SIZE", "1"), ("TANDEM_WORKER_INDEX", "0"), ("TANDEM_GROUP_PORT", "29500")):
        value = env.get(name, default)
        if not value.isdigit() or (int(value) < 1 and name != "TANDEM_WORKER_INDEX"):
            return f"{name}={value!r} is not a {'non-negative' if name == 'TANDEM_WORKER_INDEX' else 'positive'} integer"
        sizes[name] = int(value)
    for name, flag in (("TANDEM_TENSOR_PARALLEL_SIZE", "tensor_parallel_size"),
                       ("TANDEM_PIPELINE_PARALLEL_SIZE", "pipeline_parallel_size")):
        ours, theirs = sizes[name], getattr(args, flag)
        if ours > 1 and theirs not in (1, ours):
            return f"{name}={ours} and --{flag.replace('_', '-')} {theirs} disagree"
        setattr(args, flag, max(ours, theirs))
    size = sizes["TANDEM_GROUP_SIZE"]
    if size > 1 and "TANDEM_LEADER_ADDRESS" not in env:
        return f"TANDEM_GROUP_SIZE={size} needs TANDEM_LEADER_ADDRESS (the group's pod 0)"
    if size > 1 and not env.get("TANDEM_GROUP_SECRET"):
        return f"TANDEM_GROUP_SIZE={size} needs TANDEM_GROUP_SECRET (the key every pod of the group shares)"
    try:
        args.group = GroupConfig(size, sizes["TANDEM_WORKER_INDEX"], env.get("TANDEM_LEADER_ADDRESS", "127.0.0.1"),
                                 sizes["TANDEM_GROUP_PORT"])
    except ValueError as exc:
        return str(exc)
    ranks = args.tensor_parallel_size * args.pipeline_parallel_size
    if ranks % size:
        return f"{ranks} ranks (tensor x pipeline parallel sizes) do not split over TANDEM_GROUP_SIZE={size} pods"
    return None


def run_worker(args: argparse.Namespace, role: int) -> int:
    """Build the engine host for `role`, then serve until told to stop."""
    name = router_pb2.Role.Name(role).lower()
    problem = parallel_settings(dict(os.environ), args)
    if problem:
        print(f"tandem {name}: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format=f"%(levelname)s %(asctime)s {name} %(name)s: %(message)s")
    if args.group.index > 0:  # not the group's leader: this pod only hosts ranks of the leader's engine
        from tandem.engine.rank_worker import serve_host

        return serve_host(args.group, args.tensor_parallel_size * args.pipeline_parallel_size, args.http_port)
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    from tandem.rpc.grpc_util import keep_bulk_buffers_mapped

    keep_bulk_buffers_mapped()
    from tandem.server.launch import DEFAULT_MODEL_NAME
    from tandem.telemetry import setup_tracing

    setup_tracing(f"tandem-{name}", args.otlp_traces_endpoint)
    try:
        if role == router_pb2.DECODE:
            from tandem.decode.engine import DecodeEngine

            host = DecodeEngine(engine_config(args, "consumer"), model_name=args.model or DEFAULT_MODEL_NAME)
        else:
            from tandem.prefill.engine import PrefillEngine

            host = PrefillEngine(engine_config(args, "producer"), model_name=args.model or DEFAULT_MODEL_NAME)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tandem {name}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(args, role, host))
    finally:
        host.shutdown()
        if role == router_pb2.DECODE:
            host.engine.consumer.close_staging()  # leases the engine granted while stopping


class WorkerServer:
    """One worker's servers around its engine host: gRPC (its role's service and Worker.GetState),
    HTTP (/health, /metrics) and the heartbeat to a router. `start` / `stop` also serve tests
    that run workers in-process."""

    def __init__(self, role: int, host, *, bind_host: str = "127.0.0.1", port: int = 0, http_port: int = 0,
                 advertise: str | None = None, worker_id: str | None = None, router: str | None = None,
                 heartbeat_interval: float = 0.5, kv_chunk_bytes: int = DEFAULT_CHUNK_BYTES, kv_window: int = 16,
                 kv_port: int = 0, kv_transport: str = "auto", kv_stream: str = "auto",
                 kv_store: str | None = None, kv_nixl_bytes: int = 512 << 20) -> None:
        self.role, self.host, self.bind_host = role, host, bind_host
        self.port, self.http_port, self.advertise, self.worker_id = port, http_port, advertise, worker_id
        self.router, self.heartbeat_interval = router, heartbeat_interval
        self.kv_chunk_bytes, self.kv_window, self.kv_port = kv_chunk_bytes, kv_window, kv_port
        self.kv_transport, self.kv_nixl_bytes = kv_transport, kv_nixl_bytes
        self.kv_stream = kv_stream
        self.kv_store = kv_store  # the prefix KV store's address
        self.kv_server = self.store = None
        self.name = router_pb2.Role.Name(role).lower()

    async def start(self) -> None:
        from tandem.rpc.grpc_util import bind, make_server
        from tandem.server.embedded import bound_port, start_http
        from tandem.worker.metrics import WorkerMetrics, http_app
        from tandem.worker.reporter import WorkerReporter, WorkerStateServicer

        host = self.host
        self.server = make_server()
        self.port = bind(self.server, self.bind_host, self.port)
        self.advertise = self.advertise or f"{os.environ.get('POD_IP', '127.0.0.1')}:{self.port}"
        self.worker_id = self.worker_id or os.environ.get("POD_NAME") or f"{self.name}-{self.advertise}"
        self.metrics = WorkerMetrics(host, host.model_name)
        self.http, self._http_task = await start_http(http_app(host, self.metrics), self.bind_host, self.http_port)
        self.http_port = bound_port(self.http)
        metrics_host = self.advertise.rsplit(":", 1)[0]
        if self.kv_store and host.engine.kv.enable_caching:  # else nothing loaded could be kept
            from tandem.worker.store_link import StoreLink

            self.store = StoreLink(self.kv_store, host, host.engine.layout, self.metrics)
            await self.store.start()
        if self.role == router_pb2.DECODE:
            from tandem.decode.kv_receiver import start_kv_server
            from tandem.decode.service import DecodeServicer
            from tandem.engine.kv_transfer import nixl_staging, shm
            from tandem.proto import decode_pb2_grpc

            if self.kv_transport == "nixl" and nixl_staging.available():
                host.engine.consumer.staging_pool = nixl_staging.NixlStagingPool(self.kv_nixl_bytes)
                host.engine.consumer.staging_max_bytes = self.kv_nixl_bytes
            elif self.kv_transport == "nixl":
                log.warning("--kv-transport nixl: NIXL is not installed (pip install nixl); KV transfers go over gRPC")
            elif self.kv_transport != "grpc" and shm.usable():
                shm.sweep()  # staging files a killed worker left
                host.engine.consumer.staging_max_bytes = shm.MAX_LEASE_BYTES
            elif self.kv_transport == "shm":
                log.warning("--kv-transport shm: %s is not usable here; KV transfers go over gRPC", shm.SHM_DIR)
            self.kv_server, self.kv_port = start_kv_server(host.engine.consumer, self.metrics.transfers,
                                                           self.bind_host, self.kv_port)
            kv_endpoint = f"{metrics_host}:{self.kv_port}"
            decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(host, kv_endpoint, self.worker_id, self.store),
                                                         self.server)
            extra = lambda load: setattr(load, "num_leases", host.num_leases)  # noqa: E731
        else:
            from tandem.prefill.service import PrefillServicer
            from tandem.proto import prefill_pb2_grpc

            host.engine.producer.max_chunk_bytes = self.kv_chunk_bytes
            if self.kv_stream != "auto":
                host.engine.producer.layerwise = self.kv_stream == "layer"
            prefill_pb2_grpc.add_PrefillServicer_to_server(
                PrefillServicer(host, self.worker_id, self.metrics.transfers, chunk_window=self.kv_window,
                                kv_transport=self.kv_transport, store=self.store), self.server)
            extra = lambda load: setattr(load, "num_prefilling", host.num_prefilling)  # noqa: E731
        self.reporter = WorkerReporter(host, self.role, self.worker_id, self.advertise, host.model_name, extra,
                                       metrics_url=f"http://{metrics_host}:{self.http_port}/metrics",
                                       kv_store=self.kv_store if self.store else "")
        router_pb2_grpc.add_WorkerServicer_to_server(WorkerStateServicer(self.reporter), self.server)
        await self.server.start()
        self._stop = asyncio.Event()
        self._heartbeat = asyncio.ensure_future(self.reporter.heartbeat(
            self.router, self._stop, self.heartbeat_interval)) if self.router else None
        log.info("%s worker %s ready: gRPC %s (bound %s:%d), HTTP http://%s:%d (/health, /metrics), KV layout %s%s",
                 self.name, self.worker_id, self.advertise, self.bind_host, self.port, metrics_host, self.http_port,
                 host.engine.layout.compat_hash, f", KV transfers on port {self.kv_port}" if self.kv_server else
                 f", prefix KV store {self.kv_store}" if self.store else "")
        if self.kv_store and self.store is None:
            log.warning("--kv-store %s ignored: prefix caching is off, so loaded blocks could not be kept",
                        self.kv_store)

    async def stop(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            await asyncio.wait_for(self._heartbeat, 3)
        await self.server.stop(grace=2)
        if self.store is not None:
            await self.store.close()
        if self.kv_server is not None:
            self.kv_server.stop(grace=1).wait()
            self.host.engine.consumer.close_staging()  # no staging file outlives the worker
        self.http.should_exit = True
        await self._http_task


async def _serve(args: argparse.Namespace, role: int, host) -> int:
    worker = WorkerServer(role, host, bind_host=args.host, port=args.port, http_port=args.http_port,
                          advertise=args.advertise_address, worker_id=args.worker_id, router=args.router,
                          heartbeat_interval=args.heartbeat_interval, kv_chunk_bytes=args.kv_chunk_bytes,
                          kv_window=args.kv_window, kv_port=args.kv_port, kv_transport=args.kv_transport,
                          kv_stream=args.kv_stream, kv_store=args.kv_store, kv_nixl_bytes=args.kv_nixl_bytes)
    await worker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"TANDEM_READY role={worker.name} grpc={worker.advertise} http_port={worker.http_port} pid={os.getpid()}",
          flush=True)
    await stop.wait()
    log.info("%s worker %s stopping", worker.name, worker.worker_id)
    await worker.stop()
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a process that binds it later (a worker that loads its model first, a
    restarted worker that must come back on the same port). Taken below the kernel's ephemeral range
    where it can: a port from bind(0) lies inside that range, where any outgoing connection may take it
    as its source port before the worker binds it (seen in CI: EADDRINUSE at a worker's start)."""
    low = _ephemeral_low()
    for _ in range(100):
        port = random.randrange(10000, low) if low > 10000 else 0
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError(f"no free port on {host} below {low}")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # elsewhere: the kernel's choice
