"""The KV transport, receiving side (gRPC; shared memory on the same host): a synchronous gRPC
server of its own, next to the decode worker's asyncio one, serving TransferKV alone.

Each transfer stream runs on a thread of the server's pool, so checksums and the copies into the
KV cache stay off the event loop that streams tokens, and gRPC's synchronous API moves bulk bytes
about twice as fast as its asyncio API on a couple of cores. The consumer role is built for this:
leases are checked and written under their locks (tandem.engine.kv_transfer.consumer). Those
threads run torch single-threaded (a per-thread setting): a 1 MB copy into the cache split over
OpenMP threads that the engine's forward pass keeps busy waits milliseconds at the barrier, 40x
slower than one thread's memcpy.

One stream: open (the lease, the sender's layout) -> chunks, each verified (XXH3-64 checksum), written and
acknowledged -> close (every (layer, token) arrived, and the first output token when the lease wants
it: the request joins decode's batch).
With transport "shm" in the open message, a chunk carries no bytes but an offset into the lease's
staging area (tandem.engine.kv_transfer.shm): its bytes are copied from there into the blocks and
verified on the staged bytes (KVConsumer.write_staged); a mismatch is sent again as from the wire.
The metrics' transport label says which transport a transfer used.
"""
from __future__ import annotations

import logging
from concurrent import futures
from typing import Iterator

import grpc
import torch

from tandem.engine.kv_transfer.codec import KVChunkData
from tandem.engine.kv_transfer.consumer import KVConsumer, LeaseError
from tandem.proto import common_pb2, decode_pb2
from tandem.rpc import kv_wire
from tandem.rpc.convert import first_token_from_proto, layout_from_proto
from tandem.rpc.grpc_util import SERVER_OPTIONS, bind
from tandem.telemetry import incoming_context, tracer
from tandem.worker.metrics import TransferMetrics

log = logging.getLogger("tandem.decode")
Ack = decode_pb2.TransferAck


def metadata_value(context: grpc.ServicerContext, key: str) -> str:
    for key_, value in context.invocation_metadata() or ():
        if key_ == key:
            return value
    return ""


class KVReceiver:
    def __init__(self, consumer: KVConsumer, transfers: TransferMetrics) -> None:
        self.consumer = consumer
        self.transfers = transfers

    def TransferKV(self, request_iterator, context: grpc.ServicerContext) -> Iterator[Ack]:
        consumer = self.consumer
        peer = metadata_value(context, "tandem-worker-id") or context.peer()
        stats = common_pb2.TransferStats(transport="grpc", peer=peer)
        lease_id = transfer_id = None
        complete = False
        span = tracer().start_span("decode.kv_receive", context=incoming_context(context.invocation_metadata()))
        try:
            for incoming in request_iterator:  # kv_wire.IncomingMessage: chunk data is not copied
                msg = incoming.message
                kind = msg.WhichOneof("body")
                if kind == "open":
                    lease_id, transfer_id = msg.open.lease_id, msg.open.transfer_id
                    stats.transport = msg.open.transport or "grpc"
                    span.set_attribute("tandem.lease_id", lease_id)
                    span.set_attribute("tandem.transport", stats.transport)
                    try:
                        consumer.open(lease_id, transfer_id, layout_from_proto(msg.open.layout))
                    except LeaseError as exc:
                        stats.failure_class = "incompatible" if "incompatible" in str(exc) else "lease_refused"
                        yield Ack(seq=0, status=Ack.REFUSED, error=str(exc))
                        return
                    yield Ack(seq=0)
                elif kind == "chunk":
                    c = msg.chunk
                    if lease_id is None:
                        stats.failure_class = "protocol"
                        yield Ack(seq=c.seq, status=Ack.REFUSED, error="a chunk before the transfer was opened")
                        return
                    try:
                        if c.staged:  # copied from the staging area, then checked
                            intact, size = consumer.write_staged(lease_id, transfer_id, c.layer, c.token_start,
                                                                 c.num_tokens, c.num_layers or 1, c.shm_offset,
                                                                 c.shm_length, c.checksum), c.shm_length
                        else:  # checked, then copied
                            chunk = KVChunkData(c.layer, c.token_start, c.num_tokens, incoming.data, c.checksum,
                                                c.num_layers or 1)
                            intact, size = chunk.intact(), len(chunk.data)
                            if intact:
                                consumer.write(lease_id, transfer_id, chunk)
                    except LeaseError as exc:
                        stats.failure_class = "lease_refused"
                        yield Ack(seq=c.seq, status=Ack.REFUSED, error=str(exc))
                        return
                    if not intact:
                        stats.retransmits += 1
                        yield Ack(seq=c.seq, status=Ack.CHECKSUM_MISMATCH,
                                  error=f"chunk {c.seq}: checksum mismatch (layer {c.layer}, tokens {c.token_start}+"
                                        f"{c.num_tokens}); send it again")
                        continue
                    stats.bytes += size
                    stats.chunks += 1
                    yield Ack(seq=c.seq)
                elif kind == "close":
                    try:
                        consumer.close(lease_id or "", transfer_id or "", first_token_from_proto(msg.close))
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


def start_kv_server(consumer: KVConsumer, transfers: TransferMetrics, host: str, port: int,
                    max_streams: int = 16) -> tuple[grpc.Server, int]:
    """The TransferKV server on host:port (0: any free port); returns it and the bound port."""
    pool = futures.ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="kv-receive",
                                      initializer=torch.set_num_threads, initargs=(1,))
    server = grpc.server(pool,
                         options=SERVER_OPTIONS, maximum_concurrent_rpcs=max_streams)
    handler = grpc.stream_stream_rpc_method_handler(KVReceiver(consumer, transfers).TransferKV,
                                                    request_deserializer=kv_wire.deserialize,
                                                    response_serializer=Ack.SerializeToString)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("tandem.v1.Decode",
                                                                          {"TransferKV": handler})])
    bound = bind(server, host, port)
    server.start()
    return server, bound
