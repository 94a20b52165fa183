"""`tandem router`: the gateway process (HTTP OpenAI API + gRPC registration endpoint)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

log = logging.getLogger("tandem.router")


def _addresses(value: str) -> list[str]:
    from tandem.router.discovery import split_address

    addresses = [a.strip() for a in value.split(",") if a.strip()]
    for a in addresses:
        try:
            split_address(a)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return addresses


def add_router_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from tandem.kvstore.replicas import address_argument
    from tandem.server.launch import add_http_args

    p = sub.add_parser("router", help="the OpenAI gateway in front of prefill and decode workers",
                       description="Serve the OpenAI API and route each request to a decode worker, with its "
                                   "prompt prefilled by a prefill worker when that is worth it. Workers register "
                                   "with --grpc-port, or are listed with --prefill-workers / --decode-workers.")
    p.add_argument("model", nargs="?", default=None,
                   help="the model the workers serve, for its tokenizer and chat template (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's; never more than the "
                   "decode workers')")
    p.add_argument("--generation-config", default="auto", help="'auto', 'vllm' or a folder (as in `tandem serve`)")
    add_http_args(p)
    r = p.add_argument_group("routing")
    r.add_argument("--grpc-host", default="0.0.0.0", help="address of the registration endpoint (default: 0.0.0.0)")
    r.add_argument("--grpc-port", type=int, default=50051, help="port workers register and heartbeat on "
                   "(default: 50051; 0: any free port)")
    r.add_argument("--prefill-workers", type=_addresses, default=[], metavar="HOST:PORT,...",
                   help="prefill workers to poll, besides those that register; a DNS name (a headless "
                        "Service) stands for every address it resolves to, re-resolved every few seconds")
    r.add_argument("--decode-workers", type=_addresses, default=[], metavar="HOST:PORT,...",
                   help="decode workers to poll, besides those that register (DNS names as above)")
    r.add_argument("--local-prefill-threshold", type=int, default=128,
                   help="prompts with fewer uncached tokens than this are prefilled on decode (default: 128)")
    r.add_argument("--lease-seconds", type=float, default=30.0, help="how long decode holds blocks for a remote "
                   "prefill (default: 30)")
    r.add_argument("--ticket-timeout", type=float, default=10.0, help="seconds to wait for decode's lease (default: 10)")
    r.add_argument("--prefill-timeout", type=float, default=60.0, help="seconds one remote prefill may take (default: 60)")
    r.add_argument("--prefill-attempts", type=int, default=2, help="prefill workers tried per request (default: 2)")
    r.add_argument("--decode-attempts", type=int, default=3, help="decode workers tried per request (default: 3)")
    r.add_argument("--heartbeat-interval", type=float, default=0.5, help="seconds between worker heartbeats (default: 0.5)")
    r.add_argument("--heartbeat-timeout", type=float, default=2.0,
                   help="a worker silent this long leaves the pool (default: 2)")
    r.add_argument("--kv-store", metavar="HOST:PORT[,...]", type=address_argument,
                   default=os.environ.get("TANDEM_KVSTORE_ADDRESS") or "",
                   help="the prefix KV store the workers load from, written as they are given it: the router "
                        "follows its events, so prefixes it holds count in prefix scoring and in the prefill "
                        "decision for the workers that report this address (default: "
                        "$TANDEM_KVSTORE_ADDRESS, which the operator sets when the model has a store)")
    r.add_argument("--decode-scorers", help="decode scorer weights, e.g. kv_free=1,load=1,prefix=1")
    r.add_argument("--prefill-scorers", help="prefill scorer weights, e.g. prefix=1,queue=1")
    r.add_argument("--otlp-traces-endpoint", help="OTLP gRPC endpoint for traces (default: none)")
    p.set_defaults(func=cmd_router, config_parser=p)
    return p


def router_config(args: argparse.Namespace):
    from tandem.router.config import RouterConfig
    from tandem.router.plugins import DECODE_DEFAULTS, PREFILL_DEFAULTS, parse_weights

    return RouterConfig(
        local_prefill_threshold=args.local_prefill_threshold, lease_seconds=args.lease_seconds,
        ticket_timeout=args.ticket_timeout, prefill_timeout=args.prefill_timeout,
        prefill_attempts=args.prefill_attempts, decode_attempts=args.decode_attempts,
        heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout, kv_store=args.kv_store,
        decode_scorers=parse_weights(args.decode_scorers, DECODE_DEFAULTS),
        prefill_scorers=parse_weights(args.prefill_scorers, PREFILL_DEFAULTS))


def cmd_router(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s router %(name)s: %(message)s")
    from tandem.server.launch import DEFAULT_MODEL_NAME, server_config
    from tandem.telemetry import setup_tracing

    setup_tracing("tandem-router", args.otlp_traces_endpoint)
    try:
        router = Router(args.model, args.model or DEFAULT_MODEL_NAME, router_config(args), server_config(args),
                        max_model_len=args.max_model_len, generation_config=args.generation_config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tandem router: error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(router.run(args))


class Router:
    """The router's parts in one process; `start` / `stop` also serve tests that run it in-process."""

    def __init__(self, model: str | None, model_name: str, config, server_config, *, max_model_len: int | None = None,
                 generation_config: str = "auto") -> None:
        from tandem.router.client import RemoteEngineClient
        from tandem.router.metrics import RouterMetrics
        from tandem.router.pool import WorkerPool
        from tandem.server.api import build_app

        self.pool = WorkerPool(config.heartbeat_interval, config.heartbeat_timeout)
        self.client = RemoteEngineClient(model, model_name, self.pool, config, max_model_len, generation_config)
        self.app = build_app(self.client, server_config)
        self.client.metrics = RouterMetrics(self.app.state.ctx.metrics.registry, self.pool, self.client.store)
        self._add_admin_routes()
        self._tasks: list[asyncio.Task] = []

    def _add_admin_routes(self) -> None:
        from starlette.responses import JSONResponse

        @self.app.get("/workers", tags=["Router"])
        async def workers() -> JSONResponse:
            """The worker pool as the router sees it."""
            return JSONResponse({"workers": [w.describe() for w in self.pool.workers.values()]})

    async def start(self, host: str, port: int, grpc_host: str, grpc_port: int, static: list[str] = (),
                    log_level: str = "warning") -> tuple[int, int]:
        from tandem.proto import router_pb2_grpc
        from tandem.router.discovery import follow
        from tandem.router.pool import RouterServicer
        from tandem.rpc.grpc_util import bind, make_server
        from tandem.server.embedded import bound_port, start_http

        self.grpc = make_server()
        router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(self.pool), self.grpc)
        self.grpc_port = bind(self.grpc, grpc_host, grpc_port)
        await self.grpc.start()
        self._tasks = [asyncio.ensure_future(self.pool.sweep())]
        self._tasks += [asyncio.ensure_future(follow(a, self.pool.poll)) for a in static]
        if self.client.store is not None:
            self._tasks.append(asyncio.ensure_future(self.client.store.follow()))
        self.http, self._http_task = await start_http(self.app, host, port, log_level, timeout_keep_alive=30,
                                                      timeout_graceful_shutdown=10)
        self.port = bound_port(self.http)
        return self.port, self.grpc_port

    async def stop(self) -> None:
        self.http.should_exit = True
        await self._http_task
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.grpc.stop(grace=1)
        await self.client.close()

    async def run(self, args: argparse.Namespace) -> int:
        static = list(args.prefill_workers) + list(args.decode_workers)
        port, grpc_port = await self.start(args.host, args.port, args.grpc_host, args.grpc_port, static,
                                           args.uvicorn_log_level)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        log.info("router ready: OpenAI API on http://%s:%d/v1, workers register on gRPC port %d%s%s", host, port,
                 grpc_port, f", polling {static}" if static else "",
                 f", following KV store {args.kv_store}" if args.kv_store else "")
        print(f"TANDEM_READY role=router http={host}:{port} grpc={grpc_port} pid={os.getpid()}", flush=True)
        await stop.wait()
        await self.stop()
        return 0
