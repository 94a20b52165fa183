"""RemoteEngineClient: the EngineClient behind the router's OpenAI app, over prefill and decode
workers. The app cannot tell it from a local engine: token ids in, cumulative outputs out.

One request's life: pick a decode worker (plugins) -> decide where its prompt is prefilled
(remote when enough of it is uncached on that worker and a compatible prefill worker lives,
else on decode) -> open decode's token stream; for a remote prefill, decode's first event is the
lease to fill, a prefill worker fills it (another one if that fails, decode itself if all fail)
-> relay decode's updates as cumulative outputs until one is finished.
Failures: a decode worker that dies, hangs (its heartbeats stop) or leaves mid-request is
replaced by another, which prefills the prompt plus every token already produced and goes on
from there (one sequence; `n > 1` cannot be resumed). A lease that expires is retried with a
local prefill. Leaving the stream early (client gone) cancels the calls, so both workers drop
the request and free its blocks.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import grpc
from opentelemetry import trace

from tandem.engine import loader
from tandem.engine.structured import GrammarBook
from tandem.inputs import InputChecker
from tandem.outputs import RequestOutput
from tandem.proto import common_pb2, decode_pb2, decode_pb2_grpc, router_pb2
from tandem.router.config import RouterConfig
from tandem.router.metrics import RouterMetrics
from tandem.router.plugins import Profile, RoutingRequest
from tandem.router.pool import Worker, WorkerPool
from tandem.router.remote_prefill import DecodeLost, RemotePrefill, cancelled_by_pool
from tandem.router.store_index import StoreIndex
from tandem.rpc.convert import params_to_proto
from tandem.rpc.grpc_util import ChannelPool
from tandem.rpc.token_stream import OutputAssembler
from tandem.sampling_params import SamplingParams
from tandem.server.engine_client import EngineDeadError, EngineError, EngineStats
from tandem.telemetry import outgoing_metadata, tracer
from tandem.tokenizer import eos_token_ids, load_tokenizer, sampling_defaults

log = logging.getLogger("tandem.router")
Code = grpc.StatusCode


class RetryLocal(Exception):
    """The request's lease expired before its KV arrived: prefill it on decode instead."""


@dataclass
class RequestRecord:
    """What the router's per-request log line reports."""

    request_id: str
    prompt_tokens: int
    arrival: float = field(default_factory=time.monotonic)
    decision: str = ""
    decode: list[str] = field(default_factory=list)
    prefill: str = ""
    prefill_s: float = 0.0  # the prefill worker's compute time (PrefillReply.compute_s)
    prefill_cached: int = 0  # prompt tokens the prefill worker found in its prefix cache (PrefillReply)
    cached_tokens: int = 0  # the request's prefix-cache hit, as its usage reports it
    transfer: common_pb2.TransferStats | None = None
    prefill_failures: list[str] = field(default_factory=list)
    failovers: int = 0
    error: str = ""

    def line(self, asm: OutputAssembler) -> str:
        m = asm.metrics
        out_tokens = sum(len(s.token_ids) for s in asm.seqs.values())
        ttft = f"{(m.first_token_time - self.arrival) * 1e3:.1f}" if m.first_token_time else "-"
        t = self.transfer
        transfer = (f"transport={t.transport} bytes={t.bytes} gbps={t.gbps:.3f} handshake_ms={t.handshake_s * 1e3:.2f} "
                    f"queue_ms={t.queue_s * 1e3:.2f} wire_ms={t.wire_s * 1e3:.2f} chunks={t.chunks} "
                    f"retransmits={t.retransmits} failure_class={t.failure_class or 'none'}") if t else "none"
        return (f"request {self.request_id}: prompt_tokens={self.prompt_tokens} cached_tokens={self.cached_tokens} "
                f"output_tokens={out_tokens} "
                f"decision={self.decision} decode={','.join(self.decode) or '-'} prefill={self.prefill or '-'} "
                f"prefill_ms={self.prefill_s * 1e3:.1f} transfer=[{transfer}] "
                f"prefill_failures={len(self.prefill_failures)} failovers={self.failovers} "
                f"ttft_ms={ttft} e2e_ms={(time.monotonic() - self.arrival) * 1e3:.1f}"
                + (f" error={self.error!r}" if self.error else ""))


class RemoteEngineClient:
    def __init__(self, model: str | None, model_name: str, pool: WorkerPool, config: RouterConfig | None = None,
                 max_model_len: int | None = None, generation_config: str = "auto") -> None:
        self.config = config or RouterConfig()
        self.model_path = loader.resolve_model(model)
        hf = loader.load_config(self.model_path)
        self.model_name = model_name
        self.tokenizer = load_tokenizer(self.model_path)
        self.generation_defaults = sampling_defaults(self.model_path, generation_config)
        self._max_model_len = max_model_len or hf.get("max_position_embeddings", 4096)
        self.inputs = InputChecker(self.tokenizer, hf["vocab_size"], self._max_model_len)
        self.pool = pool
        self.metrics: RouterMetrics | None = None  # set by the router once the app's registry exists
        self.channels = ChannelPool()
        self.decode_profile = Profile(self.config.decode_filters, self.config.decode_scorers)
        self.prefill_profile = Profile(self.config.prefill_filters, self.config.prefill_scorers)
        self.prefills = RemotePrefill(self)
        self.store = StoreIndex(self.config.kv_store) if self.config.kv_store else None  # followed by the router
        vocab = self.inputs.vocab_size  # structured outputs compile here as on the decode workers
        self.grammars = GrammarBook(self.tokenizer, vocab, eos_token_ids(self.model_path, self.tokenizer, vocab))

    # ---- the EngineClient protocol --------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        """The configured context, or less when every live decode worker's KV cache is smaller."""
        decodes = self.pool.live(router_pb2.DECODE)
        return min([self._max_model_len] + ([max(w.info.max_model_len for w in decodes)] if decodes else []))

    @property
    def loras(self) -> dict[str, str]:
        """The LoRA adapters live decode workers serve (name -> folder): each is a model of its own name."""
        return {name: path for w in self.pool.live(router_pb2.DECODE) for name, path in w.info.loras.items()}

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 priority: int = 0) -> AsyncIterator[RequestOutput]:
        ids = self.inputs.request(prompt_token_ids, params, self.max_model_len)
        if not self.pool.live(router_pb2.DECODE):
            raise EngineDeadError("no decode worker is available")
        return self._generate(request_id, ids, params, priority)

    def check_structured(self, params: SamplingParams) -> None:
        """Compiles the params' output constraint as the decode workers will (ValueError when it cannot be), so
        a bad schema is the client's 400 before any worker sees it; any thread."""
        self.grammars.compile(params.structured_outputs)

    def abort(self, request_id: str) -> None:
        """Requests end when their stream is closed (that cancels their calls); nothing to do."""

    def stats(self) -> EngineStats:
        s = EngineStats()
        decodes = self.pool.live(router_pb2.DECODE)
        for w in decodes:
            load = w.load
            s.num_running += load.num_running
            s.num_waiting += load.num_waiting + load.num_leases
            s.num_free_blocks += load.num_free_blocks
            s.num_blocks += load.num_blocks
        totals = self.pool.totals
        s.prefix_cache_queries = totals.get((router_pb2.DECODE, "prefix_cache_queries"), 0)
        s.prefix_cache_hits = totals.get((router_pb2.DECODE, "prefix_cache_hits"), 0)
        s.num_preemptions = totals.get((router_pb2.DECODE, "num_preemptions"), 0)
        s.kv_usage = 1.0 - s.num_free_blocks / s.num_blocks if s.num_blocks else 0.0
        return s

    def is_healthy(self) -> bool:
        return bool(self.pool.live(router_pb2.DECODE))

    async def close(self) -> None:
        await self.channels.close()

    # ---- one request --------------------------------------------------------------------------

    async def _generate(self, rid: str, ids: list[int], params: SamplingParams,
                        priority: int) -> AsyncIterator[RequestOutput]:
        rec = RequestRecord(rid, len(ids))
        asm = OutputAssembler(rid, ids, rec.arrival, params.logprobs is not None)
        span = tracer().start_span("router.request", attributes={"tandem.request_id": rid,
                                                                 "tandem.prompt_tokens": len(ids)})
        ctx = trace.set_span_in_context(span)
        excluded: set[str] = set()
        force_local = False
        try:
            while True:
                decode = self._pick(self.decode_profile, self.routing(ids, params, max_tokens=params.max_tokens or 0),
                                    self.pool.live(router_pb2.DECODE), excluded)
                if decode is None:
                    raise EngineError("no decode worker is available" + (
                        f" to continue this request (failed: {', '.join(rec.decode)})" if excluded else ""))
                resume = []
                if asm.seqs:
                    if params.best_of > 1:
                        raise EngineError(f"decode worker {rec.decode[-1]} failed; a request with n > 1 cannot be "
                                          "resumed on another worker")
                    resume = asm.resume_point()
                try:
                    async for out in self._attempt(decode, rid, ids, params, priority, asm, resume, rec, ctx,
                                                   force_local):
                        yield out
                    return
                except RetryLocal as exc:
                    log.warning("request %s: %s; prefilling on decode", rid, exc)
                    force_local = True
                except DecodeLost as exc:
                    excluded.add(decode.info.instance_id)
                    self.pool.mark_failed(decode, f"request {rid}: {exc}")
                    rec.failovers += 1
                    self.metrics.failovers.inc()
                    span.add_event("decode failover", {"tandem.worker": decode.worker_id, "tandem.reason": str(exc)})
                    if len(excluded) >= self.config.decode_attempts:
                        raise EngineError(f"request failed on {len(excluded)} decode workers; last: {exc}") from exc
                    log.warning("request %s: decode worker %s lost (%s); resuming after %d tokens", rid,
                                decode.worker_id, exc, len(resume) + sum(len(s.token_ids) for s in asm.seqs.values())
                                - len(resume))
        except BaseException as exc:
            rec.error = rec.error or (str(exc) or type(exc).__name__)
            if not isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR, str(exc))
            raise
        finally:
            span.set_attribute("tandem.decision", rec.decision)
            span.set_attribute("tandem.failovers", rec.failovers)
            span.end()
            log.info(rec.line(asm))

    def routing(self, tokens: list[int], params: SamplingParams | common_pb2.SamplingParams, **more) -> RoutingRequest:
        """What the routing plugins see of a request (`params`: the API's, or as sent to workers)."""
        lora = params.lora if not isinstance(params, common_pb2.SamplingParams) or params.HasField("lora") else None
        return RoutingRequest(tokens, lora=lora, store=self.store, **more)

    def _pick(self, profile: Profile, req: RoutingRequest, workers: list[Worker], excluded: set[str]) -> Worker | None:
        """`excluded`: worker instances that failed this request (a restarted worker is a new one)."""
        started = time.perf_counter()
        chosen = profile.pick(req, [w for w in workers if w.info.instance_id not in excluded])
        self.metrics.scoring.observe(time.perf_counter() - started)
        return chosen

    def _decide(self, tokens: list[int], params: SamplingParams, decode: Worker, force_local: bool) -> tuple[str, str]:
        """(remote | local | fallback, reason) for this prompt on this decode worker."""
        if force_local:
            return "fallback", "lease_expired"
        if params.prompt_logprobs is not None:
            return "local", "prompt_logprobs"
        uncached = len(tokens) - self.routing(tokens, params).reusable_tokens(decode)
        if uncached < max(2, self.config.local_prefill_threshold):
            return "local", "below_threshold"
        if not self.prefill_profile.scores(self.routing(tokens, params, decode=decode),
                                           self.pool.live(router_pb2.PREFILL)):
            return "fallback", "no_compatible_prefill"
        return "remote", "uncached_above_threshold"

    async def _attempt(self, decode: Worker, rid: str, ids: list[int], params: SamplingParams, priority: int,
                       asm: OutputAssembler, resume: list[int], rec: RequestRecord, ctx: Any,
                       force_local: bool) -> AsyncIterator[RequestOutput]:
        tokens = ids + resume
        decision, reason = self._decide(tokens, params, decode, force_local)
        request = decode_pb2.GenerateRequest(
            request_id=rid, prompt_token_ids=ids, params=params_to_proto(params), priority=priority,
            prefill=decode_pb2.REMOTE if decision == "remote" else decode_pb2.LOCAL,
            lease_seconds=self.config.lease_seconds, resume_token_ids=resume)
        call = decode_pb2_grpc.DecodeStub(self.channels.get(decode.address)).Generate(
            request, metadata=outgoing_metadata(ctx=ctx))
        decode.calls.add(call)
        decode.sent(params.best_of, -(-len(tokens) // (decode.info.layout.block_size or 16)))
        rec.decode.append(decode.worker_id)
        try:
            if decision == "remote":
                event = await self._read(call, decode, self.config.ticket_timeout)
                if event is grpc.aio.EOF or not event.HasField("ticket"):
                    raise DecodeLost("decode answered a remote-prefill request without a lease")
                if not event.ticket.lease_id:
                    decision, reason = "fallback", "decode_full"
                elif not await self.prefills.fill(event.ticket, tokens, request.params, decode, rec, ctx):
                    decision, reason = "fallback", "prefill_failed"
            rec.decision = f"{decision}({reason})"
            self.metrics.decisions.labels(decision, reason).inc()
            while True:
                event = await self._read(call, decode)
                if event is grpc.aio.EOF:
                    raise DecodeLost("the token stream ended before the request finished")
                if event.HasField("update"):
                    out = asm.apply(event.update)
                    if decision == "remote":  # the prompt's KV was made on prefill: its cache hit is the request's
                        out.num_cached_tokens = rec.prefill_cached
                    rec.cached_tokens = out.num_cached_tokens
                    yield out
                    if out.finished:
                        return
        except grpc.aio.AioRpcError as exc:
            raise self._classify(exc, decode) from exc
        finally:
            decode.calls.discard(call)
            decode.ended(params.best_of)
            if not call.done():
                call.cancel()  # decode drops the request and frees its blocks

    @staticmethod
    async def _read(call, decode: Worker, timeout: float | None = None):
        try:
            if timeout is None:
                return await call.read()
            return await asyncio.wait_for(call.read(), timeout)
        except asyncio.TimeoutError:
            raise DecodeLost(f"no answer from decode worker {decode.worker_id} in {timeout:.1f}s") from None
        except asyncio.CancelledError:
            if cancelled_by_pool(call):
                raise DecodeLost(f"decode worker {decode.worker_id} left the pool") from None
            raise

    @staticmethod
    def _classify(exc: grpc.aio.AioRpcError, decode: Worker) -> Exception:
        code, details = exc.code(), exc.details() or ""
        if code == Code.INVALID_ARGUMENT:
            return ValueError(details)
        if code == Code.DEADLINE_EXCEEDED and "lease" in details:
            return RetryLocal(details)
        if code == Code.INTERNAL:
            return EngineError(f"decode worker {decode.worker_id} failed: {details}")
        return DecodeLost(f"{code.name}: {details}")
