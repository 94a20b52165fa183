"""The decode worker's gRPC API: the request token stream (Generate), lease resolution and cancel.
The KV transfer prefill workers write into leases (TransferKV) has a server of its own:
kv_receiver.py."""
from __future__ import annotations

import logging
from typing import AsyncIterator

import grpc

from tandem import faults
from tandem.decode.engine import DecodeEngine, LeaseExpired, LeaseGranted, PrefillingLocally
from tandem.engine.kv_transfer.shm import host_id
from tandem.proto import common_pb2, decode_pb2, decode_pb2_grpc
from tandem.rpc.convert import layout_to_proto, params_from_proto
from tandem.rpc.token_stream import DeltaEncoder
from tandem.server.engine_client import EngineDeadError, EngineError
from tandem.telemetry import incoming_context, tracer
from tandem.tokenizer import IncrementalDetokenizer
from tandem.worker.store_link import StoreLink

log = logging.getLogger("tandem.decode")
class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, host: DecodeEngine, kv_endpoint: str, worker_id: str = "", store: StoreLink | None = None) -> None:
        self.host = host
        self.store = store  # the prefix KV store, when the worker has one
        self.kv_endpoint = kv_endpoint  # where prefill workers send KV (kv_receiver.py's server)
        self.worker_id = worker_id
        self.layout = layout_to_proto(host.engine.layout)
        self.host_id = host_id()

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
                if self.store is not None:  # what the store holds is not computed here, nor sent by prefill
                    span.set_attribute("tandem.kv_store_blocks_loaded", await self.store.load(ids + resume,
                                                                                                   params.lora))
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
            # a worker that takes a request over (resume) is spared: it goes on where this one died or froze
            kill_after = None if resume else faults.number("decode.kill_after_tokens")
            stop_after = None if resume else faults.number("decode.stop_after_tokens")
            save = self.store is not None and not remote  # a prompt computed here goes to the store for the others
            try:
                async for item in stream:
                    if isinstance(item, LeaseGranted):
                        span.add_event("lease granted", {"tandem.lease_id": item.lease_id,
                                                         "tandem.skip_tokens": item.skip_tokens})
                        yield decode_pb2.GenerateEvent(ticket=self._ticket(request.request_id, item))
                    elif isinstance(item, PrefillingLocally):
                        save = self.store is not None
                        span.add_event("prefilling locally", {"tandem.reason": item.reason})
                        yield decode_pb2.GenerateEvent(ticket=common_pb2.Ticket(request_id=request.request_id))
                    else:
                        update = encoder.encode(item)
                        if save:  # its first token: the prompt's KV is all computed
                            self.store.save_later(ids + resume, params.lora)
                            save = False
                        yield decode_pb2.GenerateEvent(update=update)
                        streamed = len(item.outputs[0].token_ids) if item.outputs else 0
                        if kill_after is not None and streamed >= kill_after:
                            await faults.flushed()
                            faults.kill_self()
                        if stop_after is not None and streamed >= stop_after:
                            await faults.flushed()
                            faults.stop_self()
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
        return common_pb2.Ticket(request_id=request_id, lease_id=lease.lease_id, endpoint=self.kv_endpoint,
                                 layout=self.layout, skip_tokens=lease.skip_tokens, num_tokens=lease.num_tokens,
                                 block_ids=list(lease.block_ids), lease_seconds=lease.lease_seconds,
                                 shm_path=lease.shm_path, shm_bytes=lease.shm_bytes,
                                 host_id=self.host_id if lease.shm_path else "", worker_id=self.worker_id)

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
