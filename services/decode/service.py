"""The decode worker's gRPC API: the request token stream (Generate), lease resolution, cancel,
and the KV transfer prefill workers write into leases (TransferKV)."""
from __future__ import annotations

import logging
from typing import AsyncIterator

import grpc

from tandem import faults
from tandem.decode.engine import DecodeEngine, LeaseExpired, LeaseGranted, PrefillingLocally
from tandem.engine.kv_transfer.codec import KVChunkData
from tandem.engine.kv_transfer.consumer import LeaseError
from tandem.proto import common_pb2, decode_pb2, decode_pb2_grpc
from tandem.rpc.convert import layout_from_proto, layout_to_proto, params_from_proto
from tandem.rpc.token_stream import DeltaEncoder
from tandem.server.engine_client import EngineDeadError, EngineError
from tandem.telemetry import incoming_context, tracer
from tandem.tokenizer import IncrementalDetokenizer
from tandem.worker.metrics import TransferMetrics

log = logging.getLogger("tandem.decode")
Ack = decode_pb2.TransferAck


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str:
    for item in context.invocation_metadata() or ():
        if item.key == key:
            return item.value
    return ""


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, host: DecodeEngine, address: str, transfers: TransferMetrics) -> None:
        self.host = host
        self.address = address
        self.transfers = transfers
        self.layout = layout_to_proto(host.engine.layout)

    # ---- the request's token stream ----------------------------------------------------------

    async def Generate(self, request: decode_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[decode_pb2.GenerateEvent]:
        remote = request.prefill == decode_pb2.REMOTE
        with tracer().start_as_current_span(
                "decode.generate", context=incoming_context(context.invocation_metadata()),
                attributes={"tandem.request_id": request.request_id, "tandem.prefill": "remote" if remote else "local",
                            "tandem.prompt_tokens": len(request.prompt_token_ids)}) as span:
            resume = list(request.resume_token_ids)
            try:
                params = params_from_proto(request.params)
                ids, args = list(request.prompt_token_ids), (request.request_id,)
                kwargs = dict(resume_token_ids=resume, seed_index=request.seed_index)
                if remote:
                    stream = self.host.generate_remote(*args, ids, params, request.priority,
                                                       lease_seconds=request.lease_seconds or 30.0, **kwargs)
                else:
                    stream = self.host.generate(*args, ids, params, request.priority, **kwargs)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except EngineDeadError as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            encoder = DeltaEncoder(resume, self._text_of(ids, resume, params.skip_special_tokens))
            kill_after = faults.number("decode.kill_after_tokens")
            try:
                async for item in stream:
                    if isinstance(item, LeaseGranted):
                        span.add_event("lease granted", {"tandem.lease_id": item.lease_id,
                                                         "tandem.skip_tokens": item.skip_tokens})
                        yield decode_pb2.GenerateEvent(ticket=self._ticket(request.request_id, item))
                    elif isinstance(item, PrefillingLocally):
                        span.add_event("prefilling locally", {"tandem.reason": item.reason})
                        yield decode_pb2.GenerateEvent(ticket=common_pb2.Ticket(request_id=request.request_id))
                    else:
                        update = encoder.encode(item)
                        yield decode_pb2.GenerateEvent(update=update)
                        if kill_after is not None and item.outputs and \
                                len(item.outputs[0].token_ids) - len(resume) >= kill_after:
                            faults.kill_self()
            except LeaseExpired as exc:
                span.add_event("lease expired")
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except EngineDeadError as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            except EngineError as exc:
                await context.abort(grpc.StatusCode.INTERNAL, str(exc))

    def _text_of(self, prompt: list[int], resume: list[int], skip_special_tokens: bool) -> str:
        """The text a sequence resumed after `resume` has already shown (as the engine replays it)."""
        if not resume:
            return ""
        detok = IncrementalDetokenizer(self.host.tokenizer, prompt, skip_special_tokens)
        for tok in resume:
            detok.add(tok)
        return detok.text

    def _ticket(self, request_id: str, lease: LeaseGranted) -> common_pb2.Ticket:
        return common_pb2.Ticket(request_id=request_id, lease_id=lease.lease_id, endpoint=self.address,
                                 layout=self.layout, skip_tokens=lease.skip_tokens, num_tokens=lease.num_tokens,
                                 block_ids=list(lease.block_ids), lease_seconds=lease.lease_seconds)

    async def ResolveLease(self, request: decode_pb2.ResolveLeaseRequest, context) -> decode_pb2.ResolveLeaseReply:
        lease = self.host.engine.consumer.leases.get(request.lease_id)
        if lease is None:
            return decode_pb2.ResolveLeaseReply(found=False)
        rid = lease.request.group.request_id
        log.info("lease %s: %s (%s)", request.lease_id, decode_pb2.LeaseAction.Name(request.action), request.reason)
        if request.action == decode_pb2.PREFILL_LOCALLY:
            self.host.prefill_locally(rid)
        else:
            self.host.abort(rid)
        return decode_pb2.ResolveLeaseReply(found=True)

    async def Cancel(self, request: decode_pb2.CancelRequest, context) -> decode_pb2.CancelReply:
        found = self.host.has_request(request.request_id)
        self.host.abort(request.request_id)
        return decode_pb2.CancelReply(found=found)

    # ---- KV transfer, the receiving side -------------------------------------------------------

    async def TransferKV(self, request_iterator, context: grpc.aio.ServicerContext) -> AsyncIterator[Ack]:
        consumer = self.host.engine.consumer
        peer = metadata_value(context, "tandem-worker-id") or context.peer()
        stats = common_pb2.TransferStats(transport="grpc", peer=peer)
        lease_id = transfer_id = None
        complete = False
        span = tracer().start_span("decode.kv_receive", context=incoming_context(context.invocation_metadata()))
        try:
            async for msg in request_iterator:
                kind = msg.WhichOneof("body")
                if kind == "open":
                    lease_id, transfer_id = msg.open.lease_id, msg.open.transfer_id
                    span.set_attribute("tandem.lease_id", lease_id)
                    try:
                        consumer.open(lease_id, transfer_id, layout_from_proto(msg.open.layout))
                    except LeaseError as exc:
                        stats.failure_class = "incompatible" if "incompatible" in str(exc) else "lease_refused"
                        yield Ack(seq=0, status=Ack.REFUSED, error=str(exc))
                        return
                    yield Ack(seq=0)
                elif kind == "chunk":
                    c = msg.chunk
                    chunk = KVChunkData(c.layer, c.token_start, c.num_tokens, c.data, c.crc32)
                    if lease_id is None:
                        stats.failure_class = "protocol"
                        yield Ack(seq=c.seq, status=Ack.REFUSED, error="a chunk before the transfer was opened")
                        return
                    if not chunk.intact():
                        stats.retransmits += 1
                        yield Ack(seq=c.seq, status=Ack.CHECKSUM_MISMATCH,
                                  error=f"chunk {c.seq}: CRC-32 mismatch (layer {c.layer}, tokens {c.token_start}+"
                                        f"{c.num_tokens}); send it again")
                        continue
                    try:
                        consumer.write(lease_id, transfer_id, chunk)
                    except LeaseError as exc:
                        stats.failure_class = "lease_refused"
                        yield Ack(seq=c.seq, status=Ack.REFUSED, error=str(exc))
                        return
                    stats.bytes += len(c.data)
                    stats.chunks += 1
                    yield Ack(seq=c.seq)
                elif kind == "close":
                    try:
                        consumer.close(lease_id or "", transfer_id or "")
                    except LeaseError as exc:
                        stats.failure_class = "lease_refused"
                        yield Ack(status=Ack.REFUSED, error=str(exc))
                        return
                    complete = True  # wire time and GB/s are the sender's to measure: it knows send times
                    yield Ack(complete=True)
                    return
            stats.failure_class = stats.failure_class or "sender_gone"
        finally:
            if lease_id is not None or stats.failure_class:
                if not stats.failure_class and not complete:
                    stats.failure_class = "cancelled"
                self.transfers.record(stats)
            span.set_attribute("tandem.bytes", stats.bytes)
            if stats.failure_class:
                span.set_attribute("tandem.failure_class", stats.failure_class)
            span.end()
