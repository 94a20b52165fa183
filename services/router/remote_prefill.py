"""Filling a decode worker's lease from prefill workers (the router's side of a remote prefill).

`fill` picks a compatible prefill worker, asks it to compute the prompt and write the KV (and the
first output token, when the lease wants it) into the lease, and tries another one if that fails
(dead, hung, refused); when none is left it tells decode to prefill the prompt itself. A failure
that means the lease itself is gone (refused, decode unreachable) stops the retries: the decode
stream then says what happened.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any

import grpc

from tandem.proto import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc, router_pb2
from tandem.router.pool import Worker
from tandem.telemetry import outgoing_metadata

if TYPE_CHECKING:
    from tandem.router.client import RemoteEngineClient, RequestRecord

log = logging.getLogger("tandem.router")
Code = grpc.StatusCode


class DecodeLost(Exception):
    """The decode worker serving a request died, hung or left: resume elsewhere."""


def cancelled_by_pool(call: Any) -> bool:
    """A CancelledError from a call the pool cancelled (a worker it involves left), not from our own task.
    Asked of the call, not of the worker: a worker that left may be back by the time the call is read."""
    task = asyncio.current_task()
    return call.cancelled() and (task is None or task.cancelling() == 0)


class RemotePrefill:
    def __init__(self, client: "RemoteEngineClient") -> None:
        self.client = client

    async def fill(self, ticket: common_pb2.Ticket, tokens: list[int], params: common_pb2.SamplingParams,
                   decode: Worker, rec: "RequestRecord", ctx: Any) -> bool:
        """Fill decode's lease from a prefill worker (trying another if one fails); False when all
        failed and decode was told to prefill the prompt itself."""
        tried: set[str] = set()
        request = prefill_pb2.PrefillRequest(request_id=ticket.request_id, prompt_token_ids=tokens, ticket=ticket,
                                             params=params)
        for attempt in range(self.client.config.prefill_attempts):
            prefill = self.client._pick(self.client.prefill_profile, self.client.routing(tokens, params, decode=decode),
                                        self.client.pool.live(router_pb2.PREFILL), tried)
            if prefill is None:
                break
            tried.add(prefill.info.instance_id)
            if attempt:
                self.client.metrics.prefill_retries.inc()
            outcome = await self._once(prefill, request, decode, rec, ctx)
            if outcome == "ok":
                return True
            if outcome == "stop":
                break
        try:
            await decode_pb2_grpc.DecodeStub(self.client.channels.get(decode.address)).ResolveLease(
                decode_pb2.ResolveLeaseRequest(lease_id=ticket.lease_id, action=decode_pb2.PREFILL_LOCALLY,
                                               reason="; ".join(rec.prefill_failures) or "no prefill worker"),
                timeout=self.client.config.ticket_timeout, metadata=outgoing_metadata(ctx=ctx))
        except grpc.aio.AioRpcError as exc:
            raise DecodeLost(f"cannot reach decode worker {decode.worker_id}: {exc.code().name}") from exc
        return False

    async def _once(self, prefill: Worker, request: prefill_pb2.PrefillRequest, decode: Worker,
                    rec: "RequestRecord", ctx: Any) -> str:
        """ok, retry (try another prefill worker) or stop (the lease itself is gone)."""
        call = prefill_pb2_grpc.PrefillStub(self.client.channels.get(prefill.address)).Prefill(
            request, timeout=self.client.config.prefill_timeout, metadata=outgoing_metadata(ctx=ctx))
        prefill.calls.add(call)
        decode.calls.add(call)  # it writes into decode's lease: if decode leaves, waiting for it is pointless
        prefill.sent()
        started, decode_leaves = time.monotonic(), decode.leaves
        try:
            reply = await call
        except asyncio.CancelledError:
            if not cancelled_by_pool(call):
                raise
            if decode.leaves != decode_leaves:  # decode left (it may be back already: its lease is not)
                raise DecodeLost(f"decode worker {decode.worker_id} left the pool during the prefill") from None
            return self._failed(prefill, decode, rec, "prefill_lost", "the prefill worker left the pool")
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            found = re.match(r"\[(\w+)\]", details)
            cls = found.group(1) if found else {Code.DEADLINE_EXCEEDED: "timeout", Code.UNAVAILABLE: "prefill_lost",
                                                Code.FAILED_PRECONDITION: "incompatible"}.get(exc.code(), "internal")
            if cls in ("timeout", "prefill_lost"):
                self.client.pool.mark_failed(prefill, f"prefill call failed: {exc.code().name}")
            outcome = self._failed(prefill, decode, rec, cls, f"{exc.code().name} {details}")
            return "stop" if cls in ("lease_refused", "decode_unavailable") else outcome
        finally:
            prefill.calls.discard(call)
            decode.calls.discard(call)
            prefill.ended()
            if not call.done():
                call.cancel()  # prefill drops the request and its transfer
        rec.prefill, rec.prefill_s, rec.transfer = prefill.worker_id, reply.compute_s, reply.transfer
        rec.prefill_cached = reply.num_cached_tokens
        self.client.metrics.transfers.record(reply.transfer, prefill.worker_id, decode.worker_id)
        self.client.metrics.prefill_time.labels(prefill.worker_id, decode.worker_id).observe(time.monotonic() - started)
        return "ok"

    def _failed(self, prefill: Worker, decode: Worker, rec: "RequestRecord", cls: str, detail: str) -> str:
        rec.prefill_failures.append(f"{prefill.worker_id}: {detail}")
        self.client.metrics.transfers.record(common_pb2.TransferStats(transport="grpc", failure_class=cls),
                                             prefill.worker_id, decode.worker_id)
        log.warning("request %s: remote prefill on %s failed (%s): %s", rec.request_id, prefill.worker_id, cls, detail)
        return "retry"
