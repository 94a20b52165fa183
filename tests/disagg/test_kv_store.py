"""Workers share prompt prefixes through the KV store (`--kv-store`): one prefill worker computes a prompt
and saves its blocks; another, which never saw the prompt, loads them and computes only the rest; a
decode worker that has to prefill locally loads them too; the output does not change. A store that is down costs recomputation, never the request. Router,
workers and store run in-process on real gRPC (127.0.0.1), the request through the `openai` client."""
from __future__ import annotations

import asyncio
import threading
import time

import openai
import torch

PROMPT = torch.randint(3, 49000, (200,), generator=torch.Generator().manual_seed(33)).tolist()
BLOCKS = (len(PROMPT) - 1) // 16  # prefill computes every prompt token; a request hits at most this many


def wait_for(check, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Stack:
    """A KV store, a router, a decode worker and prefill workers started on demand, all on one loop."""

    def __init__(self, model: str, store_address: str | None = None, decode_loras: dict | None = None,
                 decode_tp: int = 1, decode_pp: int = 1, router_follows_store: bool = False, store_replicas: int = 1,
                 **store_options) -> None:
        from tandem.decode.engine import DecodeEngine
        from tandem.kvstore.main import KVStoreServer
        from tandem.kvstore.store import KVStore
        from tandem.proto import router_pb2
        from tandem.router.config import RouterConfig
        from tandem.router.main import Router
        from tandem.server.config import ServerConfig

        self.model, self.hosts, self.workers = model, [], {}
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.stores = []
        if store_address is None:
            for _ in range(store_replicas):
                self.stores.append(KVStoreServer(KVStore(64 << 20, **store_options)))
                self.run(self.stores[-1].start())
            store_address = ",".join(f"127.0.0.1:{store.port}" for store in self.stores)
        self.store = self.stores[0] if self.stores else None
        self.store_address = store_address
        self.router = Router(model, "tiny", RouterConfig(local_prefill_threshold=8, heartbeat_interval=0.2,
                                                         kv_store=store_address if router_follows_store else ""),
                             ServerConfig())
        self.port, self.grpc_port = self.run(self.router.start("127.0.0.1", 0, "127.0.0.1", 0))
        self.decode = self.start(router_pb2.DECODE, "decode-0", DecodeEngine, decode_loras, decode_tp, decode_pp)

    def config(self, role: str, loras: dict | None = None, tp: int = 1, pp: int = 1):
        from tandem.config import CacheConfig, EngineConfig

        return EngineConfig(model=self.model, dtype="float32", kv_role=role, cache=CacheConfig(num_gpu_blocks=128),
                            lora_modules=loras or {}, tensor_parallel_size=tp, pipeline_parallel_size=pp)

    def start(self, role: int, name: str, engine_class=None, loras: dict | None = None, tp: int = 1, pp: int = 1):
        from tandem.prefill.engine import PrefillEngine
        from tandem.proto import router_pb2
        from tandem.worker.process import WorkerServer

        engine_class = engine_class or PrefillEngine
        host = engine_class(self.config("consumer" if role == router_pb2.DECODE else "producer", loras, tp, pp), "tiny")
        self.hosts.append(host)
        worker = WorkerServer(role, host, router=f"127.0.0.1:{self.grpc_port}", heartbeat_interval=0.2,
                              worker_id=name, kv_store=self.store_address)
        self.run(worker.start())
        self.workers[name] = worker
        wait_for(lambda: name in self.router.pool.workers, f"{name} to register")
        return worker

    def stop(self, name: str) -> None:
        self.run(self.workers.pop(name).stop())
        wait_for(lambda: name not in self.router.pool.workers, f"{name} to leave")

    def complete(self, prompt: list[int] = PROMPT, model: str = "tiny") -> list[str]:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", max_retries=0)
        out = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                        logprobs=0, extra_body={"ignore_eos": True})
        return out.choices[0].logprobs.tokens

    def saved_by_prefill_a(self) -> list[int]:
        """PROMPT computed by a prefill worker "prefill-a" and its blocks saved to the store; the answer."""
        from tandem.proto import router_pb2

        self.start(router_pb2.PREFILL, "prefill-a")
        answer = self.complete()
        wait_for(lambda: self.counter("prefill-a", "tandem:kv_store_blocks", "save") == len(PROMPT) // 16,
                 "prefill-a to save the prompt's blocks")
        return answer

    def forget_decode_cache(self) -> None:
        """Decode's prefix cache emptied (so the router sends the prompt to prefill again)."""
        host = self.decode.host
        assert self.run(host.call(host.engine.kv.pool.reset_prefix_cache))
        wait_for(lambda: not self.router.pool.workers["decode-0"].cached, "the router to see decode's cache empty")

    def counter(self, name: str, metric: str, direction: str) -> float:
        return self.workers[name].metrics.registry.get_sample_value(f"{metric}_total", {"direction": direction}) or 0

    def decisions(self, decision: str) -> float:
        registry = self.router.app.state.ctx.metrics.registry
        return sum(x.value for m in registry.collect() if m.name == "tandem:router_prefill_decisions"
                   for x in m.samples if x.name.endswith("_total") and x.labels["decision"] == decision)

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        for name in list(self.workers):
            self.run(self.workers.pop(name).stop())
        self.run(self.router.stop())
        for store in self.stores:
            self.run(store.stop())
        for host in self.hosts:
            host.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_a_prefix_one_prefill_worker_computed_is_loaded_by_another(tiny_model_dirs):
    from tandem.proto import router_pb2

    stack = Stack(tiny_model_dirs["llama"])
    try:
        first = stack.saved_by_prefill_a()
        assert stack.store.store.stats().blocks["dram"] == len(PROMPT) // 16
        stack.stop("prefill-a")
        stack.start(router_pb2.PREFILL, "prefill-b")
        stack.forget_decode_cache()
        second = stack.complete()
        assert stack.counter("prefill-b", "tandem:kv_store_blocks", "load") == BLOCKS
        assert stack.counter("prefill-b", "tandem:kv_store_failures", "load") == 0
        assert second == first
        assert stack.workers["prefill-b"].host.engine.kv.prefix_hits == BLOCKS * 16
    finally:
        stack.close()


def test_a_store_that_is_down_costs_only_recomputation(tiny_model_dirs):
    from tandem.proto import router_pb2
    from tandem.worker.process import free_port

    stack = Stack(tiny_model_dirs["llama"], store_address=f"127.0.0.1:{free_port('127.0.0.1')}")
    try:
        stack.start(router_pb2.PREFILL, "prefill-a")
        assert len(stack.complete()) == 6  # the request is served all the same
        assert stack.counter("prefill-a", "tandem:kv_store_failures", "load") == 1
        assert stack.counter("prefill-a", "tandem:kv_store_blocks", "load") == 0
        # the unreachable store was set aside after its first failure: not saved to, nor asked about
        # another prompt
        assert len(stack.complete(PROMPT[::-1])) == 6
        stack.run(stack.workers["prefill-a"].store.settled())
        assert stack.counter("prefill-a", "tandem:kv_store_failures", "load") == 1
        assert stack.counter("prefill-a", "tandem:kv_store_failures", "save") == 0
    finally:
        stack.close()


def test_a_store_that_refuses_our_blocks_is_not_sent_more(tiny_model_dirs):
    """Blocks over the store's size limit are refused for good: the worker stops saving after the first."""
    from tandem.proto import router_pb2

    stack = Stack(tiny_model_dirs["llama"], max_block_bytes=4096)  # this model's blocks are 8 KiB
    try:
        stack.start(router_pb2.PREFILL, "prefill-a")
        stack.complete()
        wait_for(lambda: stack.counter("prefill-a", "tandem:kv_store_failures", "save") == 1, "the refused save")
        stack.complete(PROMPT[::-1])
        stack.run(stack.workers["prefill-a"].store.settled())
        assert stack.counter("prefill-a", "tandem:kv_store_failures", "save") == 1
        assert stack.counter("prefill-a", "tandem:kv_store_blocks", "save") == 0
        assert stack.store.store.stats().blocks["dram"] == 0
    finally:
        stack.close()


def test_a_decode_worker_prefilling_locally_loads_from_the_store(tiny_model_dirs):
    """With no prefill worker left the router falls back to decode's own prefill, which loads the prefix a
    prefill worker saved; and what decode computes itself it saves for the others."""
    stack = Stack(tiny_model_dirs["llama"])
    try:
        first = stack.saved_by_prefill_a()
        stack.stop("prefill-a")
        stack.forget_decode_cache()
        assert stack.complete() == first
        assert stack.decisions("fallback") == 1  # no prefill worker: decode prefilled it
        assert stack.counter("decode-0", "tandem:kv_store_blocks", "load") == BLOCKS
        other = PROMPT[::-1]  # computed by decode alone, then saved by it
        stack.complete(other)
        wait_for(lambda: stack.counter("decode-0", "tandem:kv_store_blocks", "save") == len(other) // 16,
                 "decode to save what it prefilled")
    finally:
        stack.close()


def test_the_router_counts_what_the_store_holds(tiny_model_dirs):
    """The router follows the store's events: a prompt whose prefix the store holds and whose new part is under
    the local-prefill threshold is prefilled by decode, which loads the prefix, instead of going to a prefill
    worker as it would for a router blind to the store."""
    stack = Stack(tiny_model_dirs["llama"], router_follows_store=True)
    registry = stack.router.app.state.ctx.metrics.registry
    try:
        stack.saved_by_prefill_a()
        assert stack.decisions("remote") == 1
        wait_for(lambda: registry.get_sample_value("tandem:router_kv_store_blocks") == len(PROMPT) // 16,
                 "the router to see the store's blocks")
        stack.forget_decode_cache()
        near = PROMPT[:192] + [5, 6, 7, 8, 9]  # 12 blocks the store holds, 5 new tokens
        assert len(stack.complete(near)) == 6
        assert stack.decisions("local") == 1 and stack.decisions("remote") == 1
        assert stack.counter("decode-0", "tandem:kv_store_blocks", "load") == 12
        assert stack.counter("prefill-a", "tandem:kv_store_blocks", "load") == 0
        assert registry.get_sample_value("tandem:router_kv_store_resubscriptions_total") == 0
    finally:
        stack.close()


def test_a_store_of_two_replicas_holds_each_block_once(tiny_model_dirs):
    """With `--kv-store A,B` each block lives on one replica, the one every worker and the router pick for it:
    what one prefill worker saved over both, another loads whole, and the router counts it."""
    from tandem.proto import router_pb2

    stack = Stack(tiny_model_dirs["llama"], router_follows_store=True, store_replicas=2)
    registry = stack.router.app.state.ctx.metrics.registry
    try:
        first = stack.saved_by_prefill_a()
        held = [store.store.stats().blocks["dram"] for store in stack.stores]
        assert sum(held) == len(PROMPT) // 16 and min(held) >= 1, held  # 12 blocks, each on one replica
        wait_for(lambda: registry.get_sample_value("tandem:router_kv_store_blocks") == len(PROMPT) // 16,
                 "the router to see both replicas' blocks")
        stack.stop("prefill-a")
        stack.start(router_pb2.PREFILL, "prefill-b")
        stack.forget_decode_cache()
        assert stack.complete(PROMPT[:192] + [5, 6, 7, 8, 9]) and stack.decisions("local") == 1
        assert stack.counter("decode-0", "tandem:kv_store_blocks", "load") == 12  # from both replicas
        stack.forget_decode_cache()
        assert stack.complete() == first  # 8 new tokens: at the threshold, so prefill-b computes them
        assert stack.counter("prefill-b", "tandem:kv_store_blocks", "load") == 12
    finally:
        stack.close()


def test_a_replica_that_is_down_costs_only_its_share(tiny_model_dirs):
    """One of two replicas stops: its blocks are recomputed, the other's still load, and only the dead one is
    set aside (asked once, then left alone), so the live replica keeps serving the next prompts."""
    from tandem.proto import router_pb2

    stack = Stack(tiny_model_dirs["llama"], store_replicas=2)
    try:
        first = stack.saved_by_prefill_a()
        owners = stack.workers["prefill-a"].store.replicas
        hashes = stack.workers["prefill-a"].host.engine.block_hashes(PROMPT)[:BLOCKS]
        live = next(s for s in stack.stores if owners.owner(hashes[0]) == f"127.0.0.1:{s.port}")
        gone = next(s for s in stack.stores if s is not live)  # the prompt's first blocks stay loadable
        stack.run(gone.stop())
        stack.stop("prefill-a")
        stack.start(router_pb2.PREFILL, "prefill-b")
        stack.forget_decode_cache()
        assert stack.complete() == first
        leading_live = next((i for i, h in enumerate(hashes) if owners.owner(h) != f"127.0.0.1:{live.port}"), BLOCKS)
        assert stack.counter("prefill-b", "tandem:kv_store_blocks", "load") == leading_live
        assert stack.counter("prefill-b", "tandem:kv_store_failures", "load") == 1  # the dead replica, once
        assert 0 < leading_live < BLOCKS  # (this prompt's blocks lie on both replicas)
        assert len(stack.complete(PROMPT[::-1])) == 6  # the dead replica set aside: not asked about this one
        assert stack.counter("prefill-b", "tandem:kv_store_failures", "load") == 1
        stack.run(stack.workers["prefill-b"].store.settled())
        assert stack.counter("prefill-b", "tandem:kv_store_failures", "save") == 0
    finally:
        stack.stores.remove(gone)
        stack.close()
