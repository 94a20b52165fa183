"""Bad input is a ValueError naming the field and its limit, raised before any work starts, and it
never costs the other requests anything: they finish with the right output and every block returns."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tandem import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [list(range(500, 521)), list(range(700, 705)), "Hello there, how are"]


@pytest.fixture
def llm(make_llm, tiny_model_dirs):
    return make_llm(tiny_model_dirs["llama"], max_model_len=64, num_gpu_blocks_override=48, block_size=8)


def _token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def _assert_idle(llm):
    pool = llm.engine.kv.pool
    assert not llm.engine.has_unfinished_requests()
    assert not llm.engine.scheduler.waiting and not llm.engine.scheduler.running
    assert pool.num_free == pool.num_blocks


# ---- sampling parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), r"temperature must be a finite number >= 0, got -0\.1"),
    (dict(temperature=float("nan")), r"temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\], got 0\.0"),
    (dict(top_p=1.5), r"top_p must be a number in \(0, 1\], got 1\.5"),
    (dict(n=0), r"n must be an integer >= 1, got 0"),
    (dict(n=-2), r"n must be an integer >= 1, got -2"),
    (dict(n=1.5), r"n must be an integer >= 1"),
    (dict(max_tokens=0), r"max_tokens must be an integer >= 1, got 0"),
    (dict(max_tokens=-5), r"max_tokens must be an integer >= 1, got -5"),
    (dict(stop=5), r"stop must be a string or a list of strings, got 5"),
    (dict(stop=[1]), r"stop must be a string or a list of strings, got \[1\]"),
    (dict(stop=["ok", None]), r"stop must be a string or a list of strings"),
    (dict(stop=[""]), r"stop must be non-empty strings"),
    (dict(top_k=-2), r"top_k must be -1, 0 \(off\) or a positive integer, got -2"),
    (dict(min_p=1.5), r"min_p must be a number in \[0, 1\], got 1\.5"),
    (dict(presence_penalty=2.5), r"presence_penalty must be a number in \[-2, 2\], got 2\.5"),
    (dict(frequency_penalty=-3.0), r"frequency_penalty must be a number in \[-2, 2\], got -3\.0"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be a finite number > 0, got 0\.0"),
    (dict(n=3, best_of=2), r"best_of must be an integer >= n \(3\), got 2"),
    (dict(max_tokens=4, min_tokens=5), r"min_tokens must be <= max_tokens \(4\), got 5"),
    (dict(min_tokens=-1), r"min_tokens must be an integer >= 0, got -1"),
    (dict(logprobs=-1), r"logprobs must be None or an integer >= 0, got -1"),
    (dict(prompt_logprobs=-1), r"prompt_logprobs must be None or an integer >= 0, got -1"),
    (dict(stop_token_ids=[-1]), r"stop_token_ids must be a list of non-negative integers"),
    # types: a value of the wrong type fails here, not in the middle of a batch's step
    (dict(temperature=float("inf")), r"temperature must be a finite number >= 0, got inf"),
    (dict(temperature="1"), r"temperature must be a finite number >= 0, got '1'"),
    (dict(logprobs=1.5), r"logprobs must be None or an integer >= 0, got 1\.5"),
    (dict(prompt_logprobs=2.5), r"prompt_logprobs must be None or an integer >= 0, got 2\.5"),
    (dict(seed=1.5), r"seed must be None or an integer"),
    (dict(seed="7"), r"seed must be None or an integer"),
    (dict(n=True), r"n must be an integer >= 1, got True"),
    (dict(presence_penalty="0"), r"presence_penalty must be a number in \[-2, 2\], got '0'"),
    (dict(bad_words=["ok", ""]), r"bad_words must be a list of non-empty strings"),
])
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_valid_edge_sampling_params():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_p=1.0, min_p=1.0, temperature=0.0, max_tokens=1).greedy
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(n=2).best_of == 2
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(bad_words="foo").bad_words == ["foo"]  # one word, as stop takes one string
    assert SamplingParams(seed=np.int64(3), max_tokens=np.int64(5), temperature=np.float32(0.5)).seed == 3


# ---- prompts ------------------------------------------------------------------------------------------


def test_empty_prompt(llm):
    for prompt in ("", [[]], {"prompt_token_ids": []}, {"prompt": ""}, [PROMPTS[0], []]):
        with pytest.raises(ValueError, match="prompt must not be empty"):
            llm.generate(prompt, GREEDY, use_tqdm=False)
    _assert_idle(llm)


def test_prompt_length_limit(llm):
    with pytest.raises(ValueError, match=r"prompt is 64 tokens, but max_model_len is 64"):
        llm.generate([list(range(100, 164))], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompt is 200 tokens, but max_model_len is 64"):
        llm.generate([list(range(100, 300))], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"max_model_len is 64"):
        llm.generate(["word " * 100], GREEDY, use_tqdm=False)
    # the longest prompt that fits leaves room for exactly one token
    (out,) = llm.generate([list(range(100, 163))], GREEDY, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    _assert_idle(llm)


def test_max_model_len_beyond_the_model(make_llm, tiny_model_dirs):
    with pytest.raises(ValueError, match=r"max_model_len \(1024\) exceeds the model's max_position_embeddings \(512\)"):
        make_llm(tiny_model_dirs["llama"], max_model_len=1024)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_model_len=0), r"max_model_len must be >= 1"),
    (dict(block_size=0), r"block_size and num_gpu_blocks must be >= 1"),
    (dict(gpu_memory_utilization=0), r"gpu_memory_utilization must be in \(0, 1\]"),
    (dict(enable_chunked_prefill=False, max_num_batched_tokens=64),
     r"max_num_batched_tokens \(64\) must be >= max_model_len \(512\)"),
    # sized from memory, the cache must hold one sequence of max_model_len (as vLLM checks at start-up)
    (dict(cpu_kv_cache_gib=2**-20), r"the KV cache holds \d+ tokens, less than max_model_len \(512\)"),
])
def test_engine_settings_fail_at_start_up(make_llm, tiny_model_dirs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_llm(tiny_model_dirs["llama"], **kwargs)


@pytest.mark.parametrize("ids", [[1, 2, 49152], [5, -1, 6], [10**12]])
def test_token_ids_out_of_vocab(llm, ids):
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 49152\)"):
        llm.generate([ids], GREEDY, use_tqdm=False)
    _assert_idle(llm)


@pytest.mark.parametrize("prompt", [[1.5], [[1, "a"]], [None], [{"neither": 1}]])
def test_prompt_of_the_wrong_type(llm, prompt):
    with pytest.raises(ValueError, match="prompt must be a string or a list of token ids"):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    _assert_idle(llm)


def test_sampling_params_count_mismatch(llm):
    with pytest.raises(ValueError, match="got 2 sampling_params for 3 prompts"):
        llm.generate(PROMPTS, [GREEDY, GREEDY], use_tqdm=False)
    _assert_idle(llm)


def test_unsupported_architecture(make_llm, tiny_model_dirs, tmp_path):
    with open(f"{tiny_model_dirs['llama']}/config.json") as f:
        config = json.load(f)
    config["architectures"] = ["GPT2LMHeadModel"]
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported model architecture \['GPT2LMHeadModel'\]; "
                                         r"Tandem supports: .*LlamaForCausalLM.*Qwen2ForCausalLM"):
        make_llm(str(tmp_path))


def test_not_a_model_folder(make_llm, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        make_llm(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        make_llm(str(tmp_path / "missing"))


# ---- nothing else is lost -----------------------------------------------------------------------------


def test_bad_prompt_in_a_batch_loses_nothing(llm):
    want = _token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    for bad in ("", [1, 49152], list(range(100, 200))):
        with pytest.raises(ValueError):
            llm.generate([PROMPTS[0], bad, PROMPTS[1]], GREEDY, use_tqdm=False)
        _assert_idle(llm)  # nothing was queued
    assert _token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == want
    _assert_idle(llm)


def test_bad_request_while_others_are_in_flight(llm):
    engine = llm.engine
    want = _token_ids(llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False))
    engine.add_request("a", PROMPTS[0], GREEDY)
    engine.add_request("b", PROMPTS[1], GREEDY)
    done = {}
    for _ in range(3):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert not done and set(engine.groups) == {"a", "b"}
    for bad in ("", [49152], list(range(100, 200))):
        with pytest.raises(ValueError):
            engine.add_request("bad", bad, GREEDY)
    with pytest.raises(ValueError, match="request_id 'a' is already in use"):
        engine.add_request("a", PROMPTS[2], GREEDY)
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate([PROMPTS[2], ""], GREEDY, use_tqdm=False)  # the offline API, same engine
    assert set(engine.groups) == {"a", "b"}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert [done["a"].outputs[0].token_ids, done["b"].outputs[0].token_ids] == want
    assert all(done[r].outputs[0].finish_reason == "length" for r in "ab")
    _assert_idle(llm)


def test_request_that_cannot_fit_the_kv_cache(make_llm, tiny_model_dirs):
    llm = make_llm(tiny_model_dirs["llama"], max_model_len=256, num_gpu_blocks_override=4, block_size=8)
    want = _token_ids(llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False))
    with pytest.raises(RuntimeError, match="cannot fit in the KV cache"):
        llm.generate([PROMPTS[1], list(range(100, 200))], GREEDY, use_tqdm=False)
    _assert_idle(llm)
    assert _token_ids(llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)) == want


def test_priority_list_of_the_wrong_length(llm):
    try:
        with pytest.raises(ValueError, match="priorit"):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False, priority=[0])
        _assert_idle(llm)
    finally:
        llm.engine.abort_request(list(llm.engine.groups))


def test_large_seed(llm):
    try:
        sp = SamplingParams(temperature=1.0, seed=2**50, max_tokens=4)
        a = llm.generate([PROMPTS[0]], sp, use_tqdm=False)[0].outputs[0].token_ids
        assert a == llm.generate([PROMPTS[0]], sp, use_tqdm=False)[0].outputs[0].token_ids
    finally:
        llm.engine.abort_request(list(llm.engine.groups))


def test_too_many_logprobs_is_rejected_up_front(llm):
    llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)
    for bad in (SamplingParams(max_tokens=2, logprobs=60000), SamplingParams(max_tokens=2, prompt_logprobs=60000)):
        with pytest.raises(ValueError, match="logprobs"):
            llm.generate(PROMPTS[:2], [GREEDY, bad], use_tqdm=False)


def test_stop_token_id_out_of_vocab_is_rejected_up_front(llm):
    bad = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[10**9])
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate(PROMPTS[:2], [GREEDY, bad], use_tqdm=False)


@pytest.mark.parametrize("field", ["stop", "bad_words"])
def test_text_matching_needs_a_tokenizer(make_llm, tiny_model_dirs, field):
    """Stop strings and bad words are text: an engine without a tokenizer refuses them up front (as vLLM
    does) rather than ignoring them."""
    llm = make_llm(tiny_model_dirs["llama"], skip_tokenizer_init=True)
    with pytest.raises(ValueError, match=f"{field} needs a tokenizer"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, **{field: ["x"]}), use_tqdm=False)
    _assert_idle(llm)
