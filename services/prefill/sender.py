"""The gRPC KV transport, sending side: one bidirectional TransferKV stream per request.

Chunks come from the engine thread (`put`, the producer's sink) and are written in order once the
stream is open and the lease accepted. At most `window` chunks are unacknowledged at a time (flow
control on top of HTTP/2's); a chunk decode reports as corrupted is sent again, at most
`max_retransmits` times. `run` returns the transfer's statistics or raises `TransferFailed` with a
failure class: incompatible, lease_refused, checksum, decode_unavailable, timeout, cancelled.

Wire time is the time at least one chunk was in flight (sent, not yet acknowledged): while the
forward pass is slower than the wire the stream idles between layers, and that is compute, not
transfer. GB/s = bytes / wire time.
"""
from __future__ import annotations

import asyncio
import secrets
import time

import grpc

from tandem import faults
from tandem.engine.kv_transfer.codec import KVChunkData
from tandem.proto import common_pb2, decode_pb2, decode_pb2_grpc
from tandem.telemetry import outgoing_metadata

Ack = decode_pb2.TransferAck


class TransferFailed(Exception):
    def __init__(self, failure_class: str, message: str) -> None:
        super().__init__(message)
        self.failure_class = failure_class


class GrpcKVSender:
    def __init__(self, loop: asyncio.AbstractEventLoop, channel: grpc.aio.Channel, ticket: common_pb2.Ticket,
                 layout: common_pb2.LayoutDescriptor, sender_id: str, window: int = 16,
                 max_retransmits: int = 3, timeout: float = 60.0) -> None:
        self.loop = loop
        self.stub = decode_pb2_grpc.DecodeStub(channel)
        self.ticket = ticket
        self.layout = layout
        self.sender_id = sender_id
        self.max_retransmits = max_retransmits
        self.timeout = timeout
        self.stats = common_pb2.TransferStats(transport="grpc", peer=ticket.endpoint)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._window = asyncio.Semaphore(window)
        self._unacked: dict[int, KVChunkData] = {}
        self._tries: dict[int, int] = {}
        self._write_lock = asyncio.Lock()
        self._drained = asyncio.Event()
        self._complete = asyncio.Event()
        self._error: TransferFailed | None = None
        self._sent_at: dict[int, float] = {}
        self._busy_until = 0.0  # end of the last in-flight interval counted into wire time
        self._corrupt_at = faults.number("kv.corrupt_chunk")
        self._kill_after = faults.number("prefill.kill_after_chunks")

    # ---- the producer's sink (engine thread) -------------------------------------------------

    def put(self, chunk: KVChunkData) -> None:
        self.loop.call_soon_threadsafe(self._queue.put_nowait, (time.monotonic(), chunk))

    def finish(self) -> None:
        self.loop.call_soon_threadsafe(self._queue.put_nowait, None)

    # ---- the stream (event loop) --------------------------------------------------------------

    async def run(self) -> common_pb2.TransferStats:
        call = self.stub.TransferKV(metadata=outgoing_metadata([("tandem-worker-id", self.sender_id)]),
                                    timeout=self.timeout)
        reader = None
        try:
            opened = time.monotonic()
            await call.write(decode_pb2.TransferMessage(open=decode_pb2.TransferOpen(
                lease_id=self.ticket.lease_id, request_id=self.ticket.request_id, layout=self.layout,
                transfer_id=secrets.token_hex(8))))
            first = await call.read()
            if first is grpc.aio.EOF or first.status != Ack.OK:
                error = "" if first is grpc.aio.EOF else first.error
                raise TransferFailed("incompatible" if "incompatible" in error else "lease_refused",
                                     f"decode refused the transfer: {error or 'stream closed'}")
            self.stats.handshake_s = time.monotonic() - opened
            reader = asyncio.ensure_future(self._read_acks(call))
            seq = 0
            while True:
                item = await self._next(reader)
                if item is None:
                    break
                produced, chunk = item
                await self._wait(self._window.acquire(), reader)
                now = time.monotonic()
                self.stats.queue_s += now - produced
                seq += 1
                chunk.seal()
                self._unacked[seq] = chunk
                self._sent_at[seq] = time.monotonic()
                await self._write(call, seq, chunk, corrupt=self._corrupt_at == seq)
                if self._kill_after is not None and seq >= self._kill_after:
                    faults.kill_self()
            await self._wait(self._drained_or_empty(), reader)
            if faults.number("kv.delay_close"):
                await asyncio.sleep(faults.number("kv.delay_close"))
            async with self._write_lock:
                await call.write(decode_pb2.TransferMessage(close=decode_pb2.TransferClose(
                    num_chunks=seq, num_bytes=self.stats.bytes)))
            await self._wait(self._complete.wait(), reader)
            await call.done_writing()
            self.stats.chunks = seq
            self.stats.gbps = self.stats.bytes / self.stats.wire_s / 1e9 if self.stats.wire_s > 0 else 0.0
            return self.stats
        except grpc.aio.AioRpcError as exc:
            cls = {grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
                   grpc.StatusCode.CANCELLED: "cancelled"}.get(exc.code(), "decode_unavailable")
            self._fail(TransferFailed(cls, f"KV transfer to {self.ticket.endpoint} failed: {exc.code().name} "
                                           f"{exc.details()}"))
            raise self._error from exc
        except TransferFailed as exc:
            self._fail(exc)
            raise
        except asyncio.CancelledError:
            self._fail(TransferFailed("cancelled", "KV transfer cancelled"))
            raise
        finally:
            if reader is not None:
                reader.cancel()
            call.cancel()

    async def _next(self, reader: asyncio.Future):
        """The next chunk, unless the ack reader failed first."""
        return await self._wait(self._queue.get(), reader)

    @staticmethod
    async def _wait(awaitable, reader: asyncio.Future):
        """`awaitable`'s result, or the ack reader's failure if that comes first."""
        waiter = asyncio.ensure_future(awaitable)
        await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            return waiter.result()
        waiter.cancel()
        if reader.exception() is not None:
            raise reader.exception()
        raise TransferFailed("decode_unavailable", "the decode worker closed the transfer early")

    async def _drained_or_empty(self) -> None:
        if self._unacked:
            self._drained.clear()
            await self._drained.wait()

    async def _write(self, call, seq: int, chunk: KVChunkData, corrupt: bool = False) -> None:
        data = chunk.data
        if corrupt or faults.value("kv.corrupt_all"):
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        async with self._write_lock:
            await call.write(decode_pb2.TransferMessage(chunk=decode_pb2.KVChunk(
                seq=seq, layer=chunk.layer, token_start=chunk.token_start, num_tokens=chunk.num_tokens,
                data=data, crc32=chunk.crc32)))

    async def _read_acks(self, call) -> None:
        while True:
            ack = await call.read()
            if ack is grpc.aio.EOF:
                raise TransferFailed("decode_unavailable", "the decode worker ended the transfer stream")
            if ack.complete:
                self._complete.set()
                return
            if ack.status == Ack.CHECKSUM_MISMATCH:
                tries = self._tries[ack.seq] = self._tries.get(ack.seq, 0) + 1
                if tries > self.max_retransmits:
                    raise TransferFailed("checksum", f"chunk {ack.seq} arrived corrupted {tries} times: {ack.error}")
                self.stats.retransmits += 1
                await self._write(call, ack.seq, self._unacked[ack.seq])
                continue
            if ack.status != Ack.OK:
                raise TransferFailed("lease_refused", f"decode refused chunk {ack.seq}: {ack.error}")
            chunk = self._unacked.pop(ack.seq, None)
            if chunk is not None:
                now = time.monotonic()
                self.stats.wire_s += now - max(self._sent_at.pop(ack.seq), self._busy_until)
                self._busy_until = now
                self.stats.bytes += len(chunk.data)
                self._window.release()
            if not self._unacked:
                self._drained.set()

    def _fail(self, error: TransferFailed) -> None:
        if self._error is None:
            self._error = error
        self.stats.failure_class = self._error.failure_class
