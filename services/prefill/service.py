"""The prefill worker's gRPC API: Prefill (compute a prompt, write its KV, and the first output
token when the lease wants it, into a decode worker's lease, answer with the transfer's statistics)
and Cancel."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

import grpc

from tandem.engine.kv_transfer.layout import incompatibility
from tandem.engine.kv_transfer import nixl_staging
from tandem.engine.kv_transfer.shm import host_id
from tandem.prefill.engine import PrefillEngine
from tandem.prefill.sender import GrpcKVSender, TransferFailed
from tandem.proto import common_pb2, prefill_pb2, prefill_pb2_grpc
from tandem.rpc.convert import layout_from_proto, layout_to_proto, params_from_proto
from tandem.rpc.grpc_util import SyncChannelPool
from tandem.server.engine_client import EngineDeadError
from tandem.telemetry import incoming_context, outgoing_metadata, tracer
from tandem.worker.metrics import TransferMetrics
from tandem.worker.store_link import StoreLink

log = logging.getLogger("tandem.prefill")

_STATUS = {"incompatible": grpc.StatusCode.FAILED_PRECONDITION, "lease_refused": grpc.StatusCode.FAILED_PRECONDITION,
           "checksum": grpc.StatusCode.DATA_LOSS, "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
           "cancelled": grpc.StatusCode.CANCELLED}


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, host: PrefillEngine, worker_id: str, transfers: TransferMetrics,
                 chunk_window: int = 16, kv_transport: str = "auto", store: StoreLink | None = None) -> None:
        self.host = host
        self.worker_id = worker_id
        self.transfers = transfers
        self.chunk_window = chunk_window
        self.kv_transport = kv_transport  # auto / shm: shared memory when decode offers it on this host
        self.host_id = host_id()
        self.layout = host.engine.layout
        self.channels = SyncChannelPool()
        self.senders = concurrent.futures.ThreadPoolExecutor(64, thread_name_prefix="kv-send")
        self.store = store  # the prefix KV store, when the worker has one

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> prefill_pb2.PrefillReply:
        ticket = request.ticket
        with tracer().start_as_current_span(
                "prefill", context=incoming_context(context.invocation_metadata()),
                attributes={"tandem.request_id": request.request_id, "tandem.decode": ticket.endpoint,
                            "tandem.prompt_tokens": len(request.prompt_token_ids),
                            "tandem.skip_tokens": ticket.skip_tokens}) as span:
            problem = incompatibility(self.layout, layout_from_proto(ticket.layout), f"decode {ticket.endpoint}")
            if problem:
                self.transfers.record(_failed(ticket.worker_id or ticket.endpoint, "incompatible"))
                span.set_attribute("tandem.failure_class", "incompatible")
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
            rid = f"prefill-{request.request_id}"
            started = time.monotonic()
            with tracer().start_as_current_span("kv.transfer") as tspan:
                sender = GrpcKVSender(self.channels.get(ticket.endpoint), ticket, layout_to_proto(self.layout),
                                      self.worker_id, outgoing_metadata(), window=self.chunk_window,
                                      shm=self._shm(ticket), token_bytes=self.layout.token_bytes)
                try:
                    ids = list(request.prompt_token_ids)
                    params = None  # the ticket wants all but the last token: decode samples
                    if ticket.num_tokens == len(ids):  # every token: prefill samples the first output token
                        if not request.HasField("params"):
                            raise ValueError("the ticket wants the first output token but the request has no "
                                             "sampling parameters")
                        params = params_from_proto(request.params)
                    elif ticket.num_tokens != len(ids) - 1:
                        raise ValueError(f"the ticket wants the KV of {ticket.num_tokens} tokens of a "
                                         f"{len(ids)}-token prompt")
                    lora = request.params.lora if request.params.HasField("lora") else None
                    kv_ids = self.host.kv_token_ids(ids, ticket.skip_tokens, params, lora)
                    if self.store is not None:
                        span.set_attribute("tandem.kv_store_blocks_loaded", await self.store.load(kv_ids, lora))
                    stream = self.host.prefill(rid, kv_ids, sender, ticket.skip_tokens, params, lora)
                except ValueError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                except EngineDeadError as exc:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
                send = asyncio.get_running_loop().run_in_executor(self.senders, sender.run)
                compute = asyncio.ensure_future(self._compute(stream))
                try:
                    done, _ = await asyncio.wait({send, compute}, return_when=asyncio.FIRST_EXCEPTION)
                    for task in done:
                        task.result()  # the first failure, if any
                    cached = (await compute)
                    compute_s = time.monotonic() - started
                    stats = await send
                except TransferFailed as exc:
                    self.transfers.record(sender.stats)
                    tspan.set_attribute("tandem.failure_class", exc.failure_class)
                    log.warning("request %s: %s", request.request_id, exc)
                    await context.abort(_STATUS.get(exc.failure_class, grpc.StatusCode.UNAVAILABLE),
                                        f"[{exc.failure_class}] {exc}")
                finally:
                    sender.cancel()  # a no-op once it finished; else its thread ends now
                    compute.cancel()
                    await asyncio.gather(send, compute, return_exceptions=True)
                    tspan.set_attribute("tandem.transport", sender.transport)
                if self.kv_transport in ("shm", "nixl") and sender.transport != self.kv_transport:
                    log.warning("request %s: --kv-transport %s, but decode offered no staging area of that kind "
                                "this worker can use: KV went over %s", request.request_id, self.kv_transport,
                                sender.transport)
                for name in ("bytes", "handshake_s", "queue_s", "wire_s", "gbps", "retransmits"):
                    tspan.set_attribute(f"tandem.{name}", getattr(stats, name))
            self.transfers.record(stats)
            if self.store is not None:
                self.store.save_later(kv_ids, lora)
            return prefill_pb2.PrefillReply(transfer=stats, num_cached_tokens=cached, compute_s=compute_s)

    def _shm(self, ticket) -> bool:
        """Try decode's staging area: allowed, offered, and decode runs on this host (same boot), or it is in
        memory registered with NIXL, which reaches it from anywhere."""
        nixl = ticket.shm_path.startswith(nixl_staging.PREFIX)
        return self.kv_transport != "grpc" and bool(ticket.shm_path) and (nixl or ticket.host_id == self.host_id)

    @staticmethod
    async def _compute(stream) -> int:
        """Run the prefill to its end; the prompt tokens prefill found in its own prefix cache."""
        async for out in stream:
            if out.finished:
                return out.num_cached_tokens
        return 0

    async def Cancel(self, request: prefill_pb2.PrefillCancelRequest, context) -> prefill_pb2.PrefillCancelReply:
        rid = f"prefill-{request.request_id}"
        found = self.host.has_request(rid)
        self.host.abort(rid)
        return prefill_pb2.PrefillCancelReply(found=found)


def _failed(peer: str, failure_class: str) -> common_pb2.TransferStats:
    return common_pb2.TransferStats(transport="grpc", peer=peer, failure_class=failure_class)
