"""Static workers by name: a `HOST:PORT` the router was given (flags or config) whose HOST is a DNS
name is resolved again and again, and every address it resolves to is polled as a worker.

On Kubernetes a pool's headless Service resolves to one A record per ready pod, so the router follows
the pool as pods come and go without the workers having to find the router. An address that drops
out of DNS stops being polled; the pool's heartbeat sweep then takes its worker out.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Awaitable, Callable

log = logging.getLogger("tandem.router")
Resolver = Callable[[str, int], Awaitable[set[str]]]


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"worker address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve(host: str, port: int) -> set[str]:
    """Every address HOST resolves to, as HOST:PORT strings (empty while the name does not resolve)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return set()
    return {join_address(info[4][0], port) for info in infos}


async def follow(address: str, poll: Callable[[str], Awaitable[None]], interval: float = 5.0,
                 resolver: Resolver = resolve) -> None:
    """Poll the worker at ADDRESS; for a DNS name, poll each address it resolves to, re-resolving every
    INTERVAL seconds and starting or stopping pollers as the set changes."""
    host, port = split_address(address)
    if is_literal(host):
        await poll(address)
        return
    pollers: dict[str, asyncio.Task] = {}
    try:
        while True:
            current = await resolver(host, port)
            for gone in pollers.keys() - current:
                log.info("worker %s left %s in DNS", gone, host)
                pollers.pop(gone).cancel()
            for new in current - pollers.keys():
                log.info("worker %s found through %s", new, host)
                pollers[new] = asyncio.ensure_future(poll(new))
            await asyncio.sleep(interval)
    finally:
        for task in pollers.values():
            task.cancel()
        await asyncio.gather(*pollers.values(), return_exceptions=True)
