"""Tensor and pipeline parallelism on CPUs: real worker processes joined by gloo, each holding its share of the
heads, the MLP, the layers and the KV cache. What one process computes, a group computes too, and a rank's death
is loud."""
from __future__ import annotations

import os
import signal
import time

import pytest

from tandem import LLM, SamplingParams
from tests.conftest import skip_unless_ranks_fit

PROMPTS = ["The quick brown fox jumps over the lazy dog and then", "1 2 3 4 5 6 7 8 9 10 11 12 13",
           "The quick brown fox jumps over the lazy dog and keeps", "Hello"]


def assert_same_choices(ref, out) -> None:
    """Token for token equal, except where the two picked different near-ties: there each one's token must be
    among the other's top logprobs, and the rest (different contexts after it) is not compared (vLLM's
    check_logprobs_close). Float32 sums in another order can flip such a tie on another CPU."""
    for a, b in zip(ref, out):
        a, b = a.outputs[0], b.outputs[0]
        assert len(a.token_ids) == len(b.token_ids)
        for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:
                assert x in b.logprobs[i] and y in a.logprobs[i], f"diverged at {i}: {x} vs {y}"
                break


def _run(llm: LLM):
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=5)
    outs = llm.generate(PROMPTS, greedy, use_tqdm=False)
    # n=2 forks share the prompt's blocks, copy-on-write (the ranks copy their shards too); seeded sampling
    forks = llm.generate(PROMPTS[1], SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True),
                         use_tqdm=False)[0]
    return outs, sorted(tuple(o.token_ids) for o in forks.outputs)


@pytest.mark.parametrize("arch, tp, pp", [("llama", 2, 1), ("mistral", 2, 1), ("llama", 1, 2), ("llama", 2, 2)])
def test_a_group_computes_what_one_process_does(make_llm, tiny_model_dirs, arch, tp, pp):
    """Tensor parallelism: llama's ranks hold 2 of 4 query heads and 1 of 2 KV heads each, mistral's its one KV
    head on both. Pipeline parallelism: each stage one of the 2 layers, hidden states sent on between them.
    A small token budget makes chunked prompts share steps with decode rows; two prompts share a cached prefix."""
    from tandem.engine.pipeline import Elsewhere

    skip_unless_ranks_fit(tp * pp)
    kw = dict(max_num_batched_tokens=24, max_model_len=128)
    ref, ref_forks = _run(make_llm(tiny_model_dirs[arch], **kw))
    llm = make_llm(tiny_model_dirs[arch], tensor_parallel_size=tp, pipeline_parallel_size=pp, **kw)
    shape, caches = llm.engine.model.shape, llm.engine.runner.kv_caches
    assert (shape.num_heads, shape.num_kv_heads, shape.intermediate) == ((2, 1, 64) if tp == 2 else (4, 2, 128))
    assert caches[0].shape[3] == shape.num_kv_heads  # this rank's share of the cache
    if pp == 2:  # rank 0 holds layer 0 alone: layer 1's weights and cache are on the other stage
        assert isinstance(llm.engine.model.layers[1], Elsewhere) and caches[1].shape[1] == 1
    out, forks = _run(llm)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    assert forks == ref_forks
    assert llm.engine.kv.prefix_hits > 0
    llm.engine.close()
    assert all(p.exitcode == 0 for p in llm.engine.peers.procs.values())  # told to stop, they stopped


def test_the_embedded_model_over_three_ranks(make_llm, smollm_dir):
    """SmolLM2-135M: 9 query heads and 3 KV heads, 3 and 1 a rank."""
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=5)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    ref = make_llm(smollm_dir, max_model_len=256).generate(prompts, params, use_tqdm=False)
    skip_unless_ranks_fit(3)
    llm = make_llm(smollm_dir, max_model_len=256, tensor_parallel_size=3)
    assert llm.engine.model.shape.num_heads == 3
    out = llm.generate(prompts, params, use_tqdm=False)
    assert_same_choices(ref, out)
    assert "Paris" in out[0].outputs[0].text
    llm.engine.close()


@pytest.mark.parametrize("kwargs, words", [
    (dict(tensor_parallel_size=3), "4 attention heads"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size and pipeline_parallel_size must be >= 1"),
    (dict(pipeline_parallel_size=3), "more stages than the model's 2 layers"),
])
def test_a_model_that_does_not_split_is_refused(tiny_model_dirs, kwargs, words):
    with pytest.raises(ValueError, match=words):
        LLM(tiny_model_dirs["llama"], dtype="float32", **kwargs)


def test_a_killed_rank_fails_the_engine_loudly(make_llm, tiny_model_dirs):
    skip_unless_ranks_fit(2)
    llm = make_llm(tiny_model_dirs["llama"], tensor_parallel_size=2)
    llm.generate("warm up", SamplingParams(max_tokens=2), use_tqdm=False)
    rank1 = llm.engine.peers.procs[1]
    os.kill(rank1.pid, signal.SIGKILL)
    rank1.join(10)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 of the parallel group \(pid \d+\) was killed by signal 9") as err:
        llm.generate(PROMPTS, SamplingParams(max_tokens=4), use_tqdm=False)
    assert getattr(err.value, "fatal", False) and time.monotonic() - start < 10
    llm.engine.abort_request(list(llm.engine.groups))  # the fixture's leak check: nothing left holding blocks
