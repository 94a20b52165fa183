"""Tensor- and pipeline-parallel workers in the disaggregated stack (in-process router, workers on real gRPC,
each worker's other ranks real processes): KV travels with every layer and KV head whatever the sizes on either
side, gathered from a prefill group's ranks and scattered over a decode group's, and the KV store's blocks too.
So a TP=2 prefill pairs with a TP=1 decode and the other way round, and the answer is the one a single process
gives."""
from __future__ import annotations

from tandem import LLM, SamplingParams
from tests.disagg.test_kv_store import BLOCKS, PROMPT, Stack, wait_for
from tests.disagg.test_lora import _transfers


def _reference(model: str) -> list[int]:
    llm = LLM(model, dtype="float32")
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)
    return out[0].outputs[0].token_ids


def test_kv_moves_between_tensor_parallel_sizes(tiny_model_dirs):
    from tandem.proto import router_pb2

    model = tiny_model_dirs["llama"]
    stack = Stack(model, decode_tp=2)
    try:
        text = stack.router.app.state.ctx.token_text
        assert stack.decode.host.engine.peers.size == 2
        want = [text(t) for t in _reference(model)]
        # prefill TP=2 -> decode TP=2: gathered from both prefill ranks, scattered over both decode ranks;
        # and saved to the store from both ranks
        stack.start(router_pb2.PREFILL, "prefill-tp2", tp=2)
        assert stack.complete() == want
        assert _transfers(stack, "prefill-tp2") == 1
        wait_for(lambda: stack.counter("prefill-tp2", "tandem:kv_store_blocks", "save") == BLOCKS,
                 "the TP=2 prefill to save the prompt's blocks")
        stack.stop("prefill-tp2")
        # a TP=1 prefill loads those blocks from the store (whole heads, as any worker of the model reads them)
        stack.start(router_pb2.PREFILL, "prefill-tp1")
        stack.forget_decode_cache()
        assert stack.complete() == want
        assert stack.counter("prefill-tp1", "tandem:kv_store_blocks", "load") == BLOCKS
        assert _transfers(stack, "prefill-tp1") == 1  # into the TP=2 decode
        stack.stop("prefill-tp1")
        # and a TP=2 prefill loads them too, scattering each block's heads over its ranks
        stack.start(router_pb2.PREFILL, "prefill-tp2-b", tp=2)
        stack.forget_decode_cache()
        assert stack.complete() == want
        assert stack.counter("prefill-tp2-b", "tandem:kv_store_blocks", "load") == BLOCKS
        assert stack.workers["prefill-tp2-b"].host.engine.kv.prefix_hits == BLOCKS * 16
        assert _transfers(stack, "prefill-tp2-b") == 1 and stack.decisions("fallback") == 0
    finally:
        stack.close()


def test_kv_moves_between_pipeline_stages(tiny_model_dirs):
    """A decode worker of two pipeline stages takes KV from two-stage prefills (each layer read from, or
    written to, the stage that holds it), the second of them loading the first's blocks from the store."""
    from tandem.proto import router_pb2

    model = tiny_model_dirs["llama"]
    stack = Stack(model, decode_pp=2)
    try:
        text = stack.router.app.state.ctx.token_text
        want = [text(t) for t in _reference(model)]
        assert stack.decode.host.engine.peers.pp == 2
        stack.start(router_pb2.PREFILL, "prefill-pp2", pp=2)
        assert stack.complete() == want and _transfers(stack, "prefill-pp2") == 1
        wait_for(lambda: stack.counter("prefill-pp2", "tandem:kv_store_blocks", "save") == BLOCKS,
                 "the two-stage prefill to save the prompt's blocks")
        stack.stop("prefill-pp2")
        # a second two-stage prefill loads them, each stage writing its layers (a 2 x 2 group is the colocated
        # tests': four more processes here would outlast the lease on two loaded cores)
        stack.start(router_pb2.PREFILL, "prefill-pp2-b", pp=2)
        stack.forget_decode_cache()
        assert stack.complete() == want
        assert stack.counter("prefill-pp2-b", "tandem:kv_store_blocks", "load") == BLOCKS
        assert _transfers(stack, "prefill-pp2-b") == 1
    finally:
        stack.close()
