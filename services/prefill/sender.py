"""The KV transport, sending side: one bidirectional TransferKV stream per request, driven
by a thread of its own with gRPC's synchronous API (on a couple of cores it moves bytes about
twice as fast as the asyncio API, and it keeps the bulk copies off the worker's event loop).

Chunks come from the engine thread (`put`, the producer's sink) and are written in order once the
stream is open and the lease accepted; `finish` ends them, with the first output token when
prefill sampled one, which the close message carries. At most `window` chunks are unacknowledged
at a time (flow control on top of HTTP/2's); a chunk decode reports as corrupted is sent again, at most
`max_retransmits` times. `run` (blocking) returns the transfer's statistics or raises
`TransferFailed` with a failure class: incompatible, lease_refused, checksum, decode_unavailable,
timeout, cancelled.

Same host (`shm`, and the ticket names a staging area this process can map: the lease's
shared-memory area, tandem.engine.kv_transfer.shm; else the bytes go over gRPC): each chunk's bytes
are written at their place in the staging area and the stream carries only the control (layer,
tokens, offset, length, checksum); chunks of one layer queued together travel as one. Everything
else (window, acks, retransmits of a chunk decode found corrupted, which rewrite its staged bytes,
failure classes) is the same. The statistics' transport says "shm" or "grpc".

Wire time is the time at least one chunk was in flight (sent, not yet acknowledged): while the
forward pass is slower than the wire the stream idles between layers, and that is compute, not
transfer. GB/s = bytes / wire time.
"""
from __future__ import annotations

import collections
import queue
import secrets
import threading
import time
from typing import Iterator

import grpc

from tandem import faults
from tandem.engine.kv_transfer import nixl_staging, shm
from tandem.engine.kv_transfer.codec import KVChunkData
from tandem.engine.kv_transfer.shm import StagingArea
from tandem.engine.sampler import Sample
from tandem.proto import common_pb2, decode_pb2
from tandem.rpc import kv_wire
from tandem.rpc.convert import first_token_to_proto

Ack = decode_pb2.TransferAck
Msg = decode_pb2.TransferMessage
TRANSFER_KV = "/tandem.v1.Decode/TransferKV"  # with kv_wire's serializer: chunk bytes are not copied by protobuf
SHM_MERGE_BYTES = 64 << 20  # staged chunks of one layer are merged up to this size
_NONE = object()


class TransferFailed(Exception):
    def __init__(self, failure_class: str, message: str) -> None:
        super().__init__(message)
        self.failure_class = failure_class


class GrpcKVSender:
    def __init__(self, channel: grpc.Channel, ticket: common_pb2.Ticket, layout: common_pb2.LayoutDescriptor,
                 sender_id: str, metadata: list[tuple[str, str]] = (), window: int = 16,
                 max_retransmits: int = 3, timeout: float = 60.0, shm: bool = False, token_bytes: int = 0) -> None:
        self._transfer_kv = channel.stream_stream(TRANSFER_KV, request_serializer=kv_wire.serialize,
                                                  response_deserializer=Ack.FromString)
        self.ticket = ticket
        self.layout = layout
        self.metadata = [*metadata, ("tandem-worker-id", sender_id)]
        self.window = window
        self.max_retransmits = max_retransmits
        self.timeout = timeout
        self.shm = shm  # try the ticket's staging area (same host)
        self.staging: StagingArea | None = None  # mapped by run: chunk bytes go here, the stream carries offsets
        self.token_bytes = token_bytes  # bytes of one token of one layer
        self._staging_lock = threading.Lock()  # writes vs the unmap at the end
        # labelled by decode's worker id: its address may change with every restart (a new series each)
        self.stats = common_pb2.TransferStats(transport="grpc", peer=ticket.worker_id or ticket.endpoint)
        self._chunks: queue.Queue = queue.Queue()  # (produced at, chunk); None: no more
        self._resend: collections.deque[int] = collections.deque()
        self._unacked: dict[int, KVChunkData] = {}
        self._sent_at: dict[int, float] = {}
        self._tries: dict[int, int] = {}
        self._cond = threading.Condition()
        self._opened = False
        self._ending = False  # every chunk acknowledged, or the transfer failed
        self._call = None
        self._cancelled = False
        self._busy_until = 0.0
        self._held = _NONE  # an item taken from the queue but not merged into the previous chunk
        self._pieces = 0  # chunks the producer made that went out (merged ones count one each)
        self._first: Sample | None = None  # the first output token, when prefill sampled one

    @property
    def transport(self) -> str:
        return self.stats.transport

    # ---- the producer's sink (engine thread) -------------------------------------------------

    def put(self, chunk: KVChunkData) -> None:
        self._chunks.put((time.monotonic(), chunk))

    def finish(self, first: Sample | None = None) -> None:
        self._first = first  # read by the stream thread after it takes the None below
        self._chunks.put(None)

    def cancel(self) -> None:
        """From any thread: end the transfer now (the request was cancelled)."""
        self._cancelled = True
        with self._cond:
            self._ending = True
            self._cond.notify_all()
        if self._call is not None:
            self._call.cancel()

    # ---- the stream (its own thread) ----------------------------------------------------------

    def run(self) -> common_pb2.TransferStats:
        opened = time.monotonic()
        if self.shm:
            self._attach_staging()
        try:
            self._call = self._transfer_kv(self._requests(), metadata=self.metadata, timeout=self.timeout)
            if self._cancelled:
                self._call.cancel()
            for ack in self._call:
                if ack.seq == 0 and not self._opened and not ack.complete:
                    if ack.status != Ack.OK:
                        raise TransferFailed("incompatible" if "incompatible" in ack.error else "lease_refused",
                                             f"decode refused the transfer: {ack.error}")
                    self.stats.handshake_s = time.monotonic() - opened
                    with self._cond:
                        self._opened = True
                        self._cond.notify_all()
                elif ack.complete:
                    self.stats.gbps = self.stats.bytes / self.stats.wire_s / 1e9 if self.stats.wire_s > 0 else 0.0
                    return self.stats
                else:
                    self._on_ack(ack)
            raise TransferFailed("decode_unavailable", "the decode worker ended the transfer stream early")
        except grpc.RpcError as exc:
            if self._cancelled:
                raise self._fail(TransferFailed("cancelled", "KV transfer cancelled")) from None
            cls = {grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
                   grpc.StatusCode.CANCELLED: "cancelled"}.get(exc.code(), "decode_unavailable")
            raise self._fail(TransferFailed(cls, f"KV transfer to {self.ticket.endpoint} failed: {exc.code().name} "
                                                 f"{exc.details()}")) from None
        except TransferFailed as exc:
            raise self._fail(exc) from None
        finally:
            self.cancel()  # stops the request iterator; a no-op on a finished call
            if self.staging is not None:
                with self._staging_lock:
                    self.staging.close()

    def _attach_staging(self) -> None:
        """Map the ticket's staging area; when it cannot be (size, path, permissions), use gRPC."""
        t = self.ticket
        if t.shm_bytes != self.token_bytes * self.layout.num_layers * (t.num_tokens - t.skip_tokens) or \
                faults.value("kv.shm_open_fails"):
            return
        nixl = t.shm_path.startswith(nixl_staging.PREFIX)
        self.staging = (nixl_staging.NixlRemoteArea if nixl else StagingArea).attach(t.shm_path, t.shm_bytes)
        if self.staging is not None:
            self.stats.transport = "nixl" if nixl else "shm"

    def _fail(self, error: TransferFailed) -> TransferFailed:
        self.stats.failure_class = error.failure_class
        return error

    def _on_ack(self, ack) -> None:
        if ack.status == Ack.CHECKSUM_MISMATCH:
            tries = self._tries[ack.seq] = self._tries.get(ack.seq, 0) + 1
            if tries > self.max_retransmits:
                raise TransferFailed("checksum", f"chunk {ack.seq} arrived corrupted {tries} times: {ack.error}")
            self.stats.retransmits += 1
            with self._cond:
                self._resend.append(ack.seq)
                self._cond.notify_all()
            return
        if ack.status != Ack.OK:
            raise TransferFailed("lease_refused", f"decode refused chunk {ack.seq}: {ack.error}")
        now = time.monotonic()
        with self._cond:
            chunk = self._unacked.pop(ack.seq, None)
            if chunk is not None:
                self.stats.wire_s += now - max(self._sent_at.pop(ack.seq), self._busy_until)
                self._busy_until = now
                self.stats.bytes += len(chunk.data)
            self._cond.notify_all()

    def _requests(self) -> Iterator[Msg | kv_wire.OutgoingChunk]:
        """What gRPC sends, pulled from its own thread: open, chunks (window permitting), close."""
        yield Msg(open=decode_pb2.TransferOpen(lease_id=self.ticket.lease_id, request_id=self.ticket.request_id,
                                               layout=self.layout, transfer_id=secrets.token_hex(8),
                                               transport=self.transport))
        with self._cond:
            self._cond.wait_for(lambda: self._opened or self._ending)
        corrupt_at, kill_after = faults.number("kv.corrupt_chunk"), faults.number("prefill.kill_after_chunks")
        seq, producing = 0, True
        while True:
            resend = None
            with self._cond:  # decide under the lock, yield outside it: the ack reader needs it
                self._cond.wait_for(lambda: self._ending or self._resend or (
                    producing and len(self._unacked) < self.window) or (not producing and not self._unacked),
                    timeout=0.05)
                if self._ending:
                    return
                if self._resend:
                    resend = self._resend.popleft()
                    self._sent_at[resend] = time.monotonic()
                    chunk = self._unacked[resend]
                elif not producing and not self._unacked:
                    break
                elif not producing or len(self._unacked) >= self.window:
                    continue
            if resend is not None:
                yield self._chunk_msg(resend, chunk)
                continue
            pieces_before = self._pieces
            item = self._next_chunk()
            if item is False:
                continue
            if item is None:
                producing = False
                continue
            produced, chunk = item
            seq += 1
            chunk.seal()
            now = time.monotonic()
            self.stats.queue_s += now - produced
            self.stats.chunks = seq
            with self._cond:
                self._unacked[seq] = chunk
                self._sent_at[seq] = now
            # the fault counts the producer's chunks, whatever merging made of them
            hit = corrupt_at is not None and pieces_before < corrupt_at <= self._pieces
            yield self._chunk_msg(seq, chunk, corrupt=hit)
            if kill_after is not None and self._pieces >= kill_after:  # chunks, merged or not
                faults.kill_self()
        delay = faults.number("kv.delay_close")
        if delay:
            time.sleep(delay)
        yield Msg(close=decode_pb2.TransferClose(num_chunks=seq, num_bytes=self.stats.bytes,
                                                 first_token=first_token_to_proto(self._first)))
        with self._cond:  # keep the stream open until decode's final answer
            self._cond.wait_for(lambda: self._ending)

    def _next_chunk(self):
        """The next (produced at, chunk), None at the end, False when none is ready yet. Staged
        chunks that continue each other in one layer are merged (they are adjacent in the staging
        area): the cost per chunk is the control round trip, not the bytes."""
        item, self._held = self._held, _NONE
        if item is _NONE:
            try:
                item = self._chunks.get(timeout=0.05)
            except queue.Empty:
                return False
        if item is None:
            return item
        self._pieces += 1
        if self.staging is None:
            return item
        produced, chunk = item
        if chunk.num_layers > 1:  # a step's layers together already
            return item
        merged, size = [chunk.data], len(chunk.data)
        end = chunk.token_start + chunk.num_tokens
        while size < SHM_MERGE_BYTES:
            try:
                nxt = self._chunks.get_nowait()
            except queue.Empty:
                break
            if nxt is None or nxt[1].layer != chunk.layer or nxt[1].token_start != end or nxt[1].num_layers > 1:
                self._held = nxt
                break
            self._pieces += 1
            merged.append(nxt[1].data)
            size += len(nxt[1].data)
            end += nxt[1].num_tokens
        if len(merged) == 1:
            return item
        halves = [(memoryview(d)[:len(d) // 2], memoryview(d)[len(d) // 2:]) for d in merged]  # K, then V
        data = b"".join(k for k, _ in halves) + b"".join(v for _, v in halves)
        return produced, KVChunkData(chunk.layer, chunk.token_start, end - chunk.token_start, data)

    def _chunk_msg(self, seq: int, chunk: KVChunkData, corrupt: bool = False) -> Msg | kv_wire.OutgoingChunk:
        data = chunk.data
        if corrupt or faults.value("kv.corrupt_all"):
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        header = decode_pb2.KVChunk(seq=seq, layer=chunk.layer, token_start=chunk.token_start,
                                    num_tokens=chunk.num_tokens, checksum=chunk.checksum, num_layers=chunk.num_layers)
        if self.staging is None:
            return kv_wire.OutgoingChunk(header, data)
        t = self.ticket
        data, per_layer = memoryview(data), len(data) // chunk.num_layers
        places = [shm.offset(chunk.layer + i, chunk.token_start, t.skip_tokens, t.num_tokens, self.token_bytes)
                  for i in range(chunk.num_layers)]  # each layer at its own place
        with self._staging_lock:
            try:
                for i, at in enumerate(places):
                    self.staging.write(at, data[i * per_layer:(i + 1) * per_layer])
            except ValueError as exc:  # unmapped: the transfer already ended
                raise TransferFailed("cancelled", str(exc)) from None
        header.staged, header.shm_offset, header.shm_length = True, places[0], len(data)
        return Msg(chunk=header)
