"""`tandem kvstore`: the store as a process, as its pod runs it.

The main thread runs one asyncio loop with the gRPC server (KVStore) and the HTTP side (/health,
/metrics: the same helpers as the workers'). SIGTERM or SIGINT: health turns 503, event streams
end, in-flight calls get a short grace, exit 0. The blocks are a cache and are not saved, except
that a disk tier's files stay for the next run to adopt.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

log = logging.getLogger("tandem.kvstore")


def add_kvstore_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from tandem.kvstore.sizes import positive_bytes

    p = sub.add_parser("kvstore", help="the cluster-wide prefix KV store",
                       description="Serve KV blocks by hash over gRPC (Put, Get, Exists, Events) from a DRAM tier "
                                   "and an optional disk tier, each with a hard capacity. Sizes take suffixes: "
                                   "4GiB, 16Gi, 512M.")
    p.add_argument("--host", default="0.0.0.0", help="address the gRPC and HTTP servers bind (default: 0.0.0.0)")
    p.add_argument("--port", type=int, default=50060, help="gRPC port (default: 50060; 0: any free port)")
    p.add_argument("--http-port", type=int, default=0, help="HTTP port of /health and /metrics (default: any free)")
    p.add_argument("--capacity-bytes", type=positive_bytes, default=positive_bytes("1GiB"), metavar="SIZE",
                   help="DRAM tier: most bytes of blocks held (default: 1GiB)")
    p.add_argument("--disk-dir", help="disk tier: a directory for blocks evicted from DRAM (default: no disk tier)")
    p.add_argument("--disk-capacity-bytes", type=positive_bytes, metavar="SIZE",
                   help="disk tier: most bytes of block files (required with --disk-dir)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=lambda args: cmd_kvstore(args, p))
    return p


def cmd_kvstore(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if (args.disk_dir is None) != (args.disk_capacity_bytes is None):
        parser.error("--disk-dir and --disk-capacity-bytes go together")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(levelname)s %(asctime)s kvstore %(name)s: %(message)s")
    from tandem.kvstore.store import KVStore

    try:
        store = KVStore(args.capacity_bytes, args.disk_dir, args.disk_capacity_bytes or 0)
    except OSError as exc:
        print(f"tandem kvstore: error: disk tier: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(args, store))


class KVStoreServer:
    """The store's gRPC and HTTP servers; `start` / `stop` also serve tests that run it in-process."""

    def __init__(self, store, *, host: str = "127.0.0.1", port: int = 0, http_port: int = 0) -> None:
        self.store, self.host, self.port, self.http_port = store, host, port, http_port

    async def start(self) -> None:
        from tandem.kvstore.metrics import store_registry
        from tandem.kvstore.service import KVStoreServicer
        from tandem.proto import kvstore_pb2_grpc
        from tandem.rpc.grpc_util import bind, make_server
        from tandem.server.embedded import bound_port, start_http
        from tandem.worker.metrics import probe_app

        self.server = make_server()  # bounded messages, keepalive: the settings of every Tandem service
        kvstore_pb2_grpc.add_KVStoreServicer_to_server(KVStoreServicer(self.store), self.server)
        self.port = bind(self.server, self.host, self.port)
        await self.server.start()
        app = probe_app(lambda: not self.store.closed, store_registry(self.store.stats))
        self.http, self._http_task = await start_http(app, self.host, self.http_port)
        self.http_port = bound_port(self.http)

    async def stop(self) -> None:
        self.store.close()  # ends Events streams, which would otherwise hold stop for its whole grace
        await self.server.stop(grace=2)
        self.http.should_exit = True
        await self._http_task


async def _serve(args: argparse.Namespace, store) -> int:
    server = KVStoreServer(store, host=args.host, port=args.port, http_port=args.http_port)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    disk = f", disk {store.disk.directory} ({store.disk.capacity} bytes)" if store.disk is not None else ""
    log.info("kvstore ready: gRPC %s:%d, HTTP %d (/health, /metrics), DRAM %d bytes%s", args.host, server.port,
             server.http_port, store.dram.capacity, disk)
    print(f"TANDEM_READY role=kvstore grpc={args.host}:{server.port} http_port={server.http_port} pid={os.getpid()}",
          flush=True)
    await stop.wait()
    log.info("kvstore stopping")
    await server.stop()
    return 0
