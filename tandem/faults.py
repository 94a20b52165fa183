"""Fault injection for tests of the disaggregated path: named points the code checks, switched on
per process by the TANDEM_FAULTS environment variable ("name=value,name2"). Off in production:
an unset variable makes every check a dictionary miss.

Points: kv.corrupt_chunk=K (flip a byte of the K-th KV chunk once), kv.corrupt_all (every chunk,
every time; with shm the flipped byte is staged), kv.shm_open_fails (prefill cannot map decode's
staging area: the transfer goes over gRPC), kv.delay_close=S (sleep S seconds before closing a
transfer), prefill.kill_after_chunks=K (SIGKILL this prefill worker after it sent K chunks),
decode.kill_after_tokens=N (SIGKILL this decode worker once a request streamed N tokens),
decode.stop_after_tokens=N (SIGSTOP it then: a worker that hangs mid-stream). Both spare requests the worker
resumed, so with the fault on every decode worker the one that takes the request over goes on.
"""
from __future__ import annotations

import asyncio
import os
import signal


def _parse(spec: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        out[name] = value or "1"
    return out


ACTIVE = _parse(os.environ.get("TANDEM_FAULTS", ""))


def value(name: str) -> str | None:
    return ACTIVE.get(name)


def number(name: str) -> float | None:
    v = ACTIVE.get(name)
    return None if v is None else float(v)


async def flushed(seconds: float = 0.25) -> None:
    """Time for what this worker has streamed to leave it: gRPC may still hold the last messages when the
    generator resumes, and a kill then loses them; the router, having seen no token, would resume the request
    as a new one on a worker that the fault does not spare (a clean-clone run failed so)."""
    await asyncio.sleep(seconds)


def kill_self() -> None:
    """A real kill -9 of this process (as if the node died)."""
    os.kill(os.getpid(), signal.SIGKILL)


def stop_self() -> None:
    """SIGSTOP this process (as if it hung): it answers nothing until sent SIGCONT."""
    os.kill(os.getpid(), signal.SIGSTOP)
