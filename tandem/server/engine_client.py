"""What the API layer needs from an engine (`EngineClient`), and its colocated implementation.

`AsyncEngine` owns one `LLMEngine` and runs its step loop in a background thread. The event loop
never touches the engine: requests and aborts go to the thread through a command queue, outputs
come back through `loop.call_soon_threadsafe`. The router will implement the same protocol over
remote prefill/decode workers, so the HTTP layer does not change.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol, runtime_checkable

from tandem.config import EngineConfig
from tandem.outputs import EngineStats, RequestOutput
from tandem.sampling_params import SamplingParams

log = logging.getLogger("tandem.server.engine")


class EngineError(RuntimeError):
    """The engine failed while this request was in flight (a server fault, not the client's)."""


class EngineDeadError(EngineError):
    """The engine loop is gone; no request can run until the server restarts."""


@runtime_checkable
class EngineClient(Protocol):
    """An engine as the OpenAI layer sees it: token ids in, cumulative RequestOutputs out."""

    model_name: str  # the model's own name (the served name defaults to it)
    model_path: str
    max_model_len: int  # prompt plus output never exceeds this
    tokenizer: Any  # a transformers tokenizer
    generation_defaults: dict[str, Any]  # SamplingParams defaults from generation_config.json
    loras: dict[str, str]  # LoRA adapter name -> its folder: served as models of their own

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Validates now (ValueError for bad input), then streams cumulative outputs until one is
        finished. Leaving the iteration early (disconnect, cancel) aborts the request."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (fire and forget; unknown ids are ignored)."""
        ...

    def stats(self) -> EngineStats: ...

    def is_healthy(self) -> bool: ...


@dataclass(eq=False)
class _Stream:
    """The consumer side of one request: the newest output (outputs are cumulative, so a slow
    reader skips intermediate ones instead of queueing them), events in order (anything else a
    worker role reports, such as a lease), or the error that ended it."""

    loop: asyncio.AbstractEventLoop
    event: asyncio.Event = field(default_factory=asyncio.Event)
    latest: RequestOutput | None = None
    events: collections.deque = field(default_factory=collections.deque)
    error: BaseException | None = None

    def put(self, item: Any) -> None:
        if isinstance(item, BaseException):
            self.error = item
        elif isinstance(item, RequestOutput):
            self.latest = item
        else:
            self.events.append(item)
        self.event.set()


class AsyncEngine:
    """The colocated EngineClient: an LLMEngine stepped by one background thread."""

    def __init__(self, config: EngineConfig, model_name: str | None = None, *, engine: Any = None) -> None:
        from tandem.engine.engine import LLMEngine  # heavy: torch and transformers

        self.engine = engine if engine is not None else LLMEngine(config)
        self.model_path = self.engine.model_path
        self.model_name = model_name or self.model_path
        self.tokenizer = self.engine.tokenizer
        capacity = self.engine.kv.pool.num_blocks * self.engine.kv.block_size
        # a request alone must always fit in the KV cache, or the scheduler could never run it
        self.max_model_len = min(self.engine.max_model_len, capacity)
        self.generation_defaults = dict(self.engine.generation_defaults)
        self._streams: dict[str, _Stream] = {}
        self._calls: set[asyncio.Future] = set()  # `call`s not yet answered
        self._commands: collections.deque[tuple] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._dead: BaseException | None = None
        self._stats = self._snapshot()
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
        self._thread.start()

    # ---- the EngineClient protocol (event-loop side) ---------------------------------------------

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 priority: int = 0, *, resume_token_ids: list[int] = (),
                 seed_index: int = 0) -> AsyncIterator[RequestOutput]:
        """`resume_token_ids` continue a sequence another worker started (see LLMEngine)."""
        ids = self.check(request_id, prompt_token_ids, params, resume_token_ids)
        return self.open_stream(request_id, ("add", request_id, ids, params, priority, time.monotonic(),
                                             tuple(resume_token_ids), seed_index))

    def check(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
              resume_token_ids: list[int] = ()) -> list[int]:
        """Read-only checks (tokenizer, model shape), safe beside the engine thread."""
        self._check_alive()
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        ids = self.engine.inputs.request(prompt_token_ids, params, self.max_model_len, resume_token_ids)
        self.engine.grammars.compile(params.structured_outputs)  # one that cannot compile: this request's error
        return ids

    async def open_stream(self, request_id: str, command: tuple) -> AsyncIterator[Any]:
        """Submit `command` for a new request and yield what the engine thread reports for it:
        events in order, then cumulative outputs until one is finished."""
        self._check_alive()
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        self._submit(command)
        finished = False
        try:
            while not finished:
                await stream.event.wait()
                stream.event.clear()
                while stream.events:
                    yield stream.events.popleft()
                if stream.error is not None:
                    raise stream.error
                out, stream.latest = stream.latest, None
                if out is not None:
                    finished = out.finished
                    yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the consumer left early (disconnect, cancel, error): free its blocks now
                self._submit(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def check_structured(self, params: SamplingParams) -> None:
        """Compiles the params' output constraint (ValueError when it cannot be); any thread."""
        self.engine.grammars.compile(params.structured_outputs)

    @property
    def loras(self) -> dict[str, str]:
        return self.engine.lora_paths  # the engine thread replaces its adapter set whole: safe to read here

    async def load_lora(self, name: str, path: str) -> None:
        """Load an adapter while serving (vLLM's /v1/load_lora_adapter); ValueError for a bad one."""
        if name in self.loras:
            raise ValueError(f"LoRA adapter {name!r} is already loaded")
        await self.call(self.engine.add_lora, name, path)

    async def unload_lora(self, name: str) -> None:
        await self.call(self.engine.remove_lora, name)

    async def call(self, fn: Any, *args: Any) -> Any:
        """fn(*args) run on the engine thread between steps (it may touch the engine's state); its result."""
        self._check_alive()
        future = asyncio.get_running_loop().create_future()
        self._calls.add(future)
        try:
            self._check_alive()  # again: a death between the first check and the add settles nothing
            self._submit(("call", future, fn, args))
            return await future
        finally:
            self._calls.discard(future)

    def has_request(self, request_id: str) -> bool:
        """A stream for this request is open (read on the event loop)."""
        return request_id in self._streams

    def stats(self) -> EngineStats:
        return self._stats

    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if hasattr(self.engine, "close"):
            self.engine.close()

    def _check_alive(self) -> None:
        if not self.is_healthy():
            raise EngineDeadError(f"the engine is not running: {self._dead!r}")

    def _submit(self, command: tuple) -> None:
        self._commands.append(command)
        self._wake.set()

    # ---- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands()
                self._tick()
                if not self.engine.has_work():
                    self._stats = self._snapshot()
                    self._wake.wait(self._idle_timeout())
                    self._wake.clear()  # commands queued before this are drained next iteration
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # noqa: BLE001 - any step failure fails the batch, not the server
                    if getattr(exc, "fatal", False):  # e.g. a tensor-parallel rank died: the engine cannot go on
                        raise
                    self._fail_in_flight(exc)
                    continue
                self._stats = self._snapshot()
                self._dispatch(outputs)
        except BaseException as exc:  # the loop itself broke: every request must hear about it
            log.exception("engine loop died")
            self._dead = exc
            self._deliver_all(EngineDeadError(f"the engine loop died: {exc!r}"))
            raise
        finally:
            if self._dead is None and self._stopping:
                self._dead = EngineDeadError("the engine was shut down")
                self._deliver_all(self._dead)

    def _apply_commands(self) -> None:
        """Commands are (name, request_id or a call's future, ...); `_cmd_<name>` runs each on the engine thread."""
        while self._commands:
            cmd = self._commands.popleft()
            try:
                getattr(self, f"_cmd_{cmd[0]}")(*cmd[1:])
            except Exception as exc:  # noqa: BLE001 - input checks run before; this is defensive
                self._deliver(cmd[1], exc if isinstance(exc, ValueError) else EngineError(str(exc)))

    def _cmd_add(self, rid: str, ids: list[int], params: SamplingParams, priority: int, arrival: float,
                 resume: tuple[int, ...], seed_index: int) -> None:
        if rid in self._streams:  # else it was aborted before it was added
            self.engine.add_request(rid, ids, params, priority=priority, arrival_time=arrival,
                                    resume_token_ids=list(resume), seed_index=seed_index)

    def _cmd_abort(self, rid: str) -> None:
        self.engine.abort_request(rid)

    def _cmd_call(self, future: asyncio.Future, fn: Any, args: tuple) -> None:
        try:
            result, error = fn(*args), None
        except Exception as exc:  # noqa: BLE001 - the caller hears of it
            result, error = None, exc
        _call_soon(future.get_loop(), _settle, future, result, error)

    def _tick(self) -> None:
        """Each loop iteration, before stepping: room for a role's timers (lease expiry)."""

    def _idle_timeout(self) -> float | None:
        """How long the idle loop may sleep without a command (None: until woken)."""
        return None

    def _fail_in_flight(self, exc: Exception) -> None:
        """A failed step: fail (and drop) every request in the engine, keep serving new ones."""
        log.exception("engine step failed; failing %d requests in flight", len(self.engine.groups))
        failed = list(self.engine.groups)
        self.engine.abort_request(failed)  # if this raises too, the loop dies loudly
        self._stats = self._snapshot()
        err = EngineError(f"the engine failed while running this request: {exc!r}")
        for rid in failed:
            self._deliver(rid, err)

    def _snapshot(self) -> EngineStats:
        return self.engine.stats()  # a new object each time: safe to read from the serving loop

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        # one wake-up per event loop and step, not one per request
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            _call_soon(loop, _put_all, items)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            _call_soon(stream.loop, stream.put, item)

    def _deliver_all(self, item: BaseException) -> None:
        for stream in list(self._streams.values()):
            _call_soon(stream.loop, stream.put, item)
        for future in list(self._calls):
            _call_soon(future.get_loop(), _settle, future, None, item)


def _put_all(items: list[tuple[_Stream, Any]]) -> None:
    for stream, item in items:
        stream.put(item)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if not future.done():
        future.set_result(result) if error is None else future.set_exception(error)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that loop is closed: nobody is listening any more
        pass
