"""uvicorn inside a process that owns its own event loop and signals (router, workers)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Iterator

import uvicorn


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def start_http(app: Any, host: str, port: int, log_level: str = "warning",
                     **config: Any) -> tuple[EmbeddedServer, asyncio.Task]:
    """Serve `app` on host:port in the running loop; returns once it listens (or raises)."""
    server = EmbeddedServer(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                                           **config))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        if task.done():
            task.result()  # re-raise the bind failure
            raise OSError(f"HTTP server on {host}:{port} stopped before it started")
        await asyncio.sleep(0.01)
    return server, task


def bound_port(server: EmbeddedServer) -> int:
    return server.servers[0].sockets[0].getsockname()[1]
