"""Scheduling behaviour seen from outside: policies, limits, freeing at finish, config defaults."""
from __future__ import annotations

import json
import shutil

import torch

from tandem import SamplingParams


def _prompts(n: int, length: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(3, 49000, (length,), generator=g).tolist()} for _ in range(n)]


def test_priority_policy_runs_lower_values_first(tiny_model_dirs, make_llm):
    llm = make_llm(tiny_model_dirs["llama"], max_num_seqs=1, scheduling_policy="priority")
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outs = llm.generate(_prompts(4, 10), params, use_tqdm=False, priority=[3, 0, 2, 1])
    order = sorted(range(4), key=lambda i: outs[i].metrics.first_token_time)
    assert order == [1, 3, 2, 0]


def test_fcfs_policy_runs_in_arrival_order(tiny_model_dirs, make_llm):
    llm = make_llm(tiny_model_dirs["llama"], max_num_seqs=1)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outs = llm.generate(_prompts(4, 10), params, use_tqdm=False, priority=[3, 0, 2, 1])
    order = sorted(range(4), key=lambda i: outs[i].metrics.first_token_time)
    assert order == [0, 1, 2, 3]


def test_batch_limits_and_blocks_freed_at_finish(tiny_model_dirs, make_llm):
    llm = make_llm(tiny_model_dirs["qwen2"], max_num_seqs=3, max_num_batched_tokens=64,
                   enable_prefix_caching=False)
    eng = llm.engine
    short = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    long = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    prompts = _prompts(5, 40)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, short if i == 0 else long)
    seen_short_done = False
    while eng.has_unfinished_requests():
        outs = eng.step()
        assert len(eng.scheduler.running) <= 3
        for out in outs:
            if out.request_id == "r0" and out.finished:
                seen_short_done = True
                assert "r0" not in eng.kv.tables  # its blocks went back at once
    assert seen_short_done
    assert eng.kv.pool.num_free == eng.kv.pool.num_blocks


def test_generation_config_supplies_defaults(tiny_model_dirs, make_llm, tmp_path):
    path = tmp_path / "with-gen-config"
    shutil.copytree(tiny_model_dirs["llama"], path)
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    gen.update({"temperature": 0.0, "max_new_tokens": 7, "top_k": 5})
    gen_file.write_text(json.dumps(gen))
    llm = make_llm(str(path))
    defaults = llm.get_default_sampling_params()
    assert (defaults.max_tokens, defaults.top_k, defaults.temperature) == (7, 0, 0.0)  # greedy drops top_k
    out = llm.generate(_prompts(1, 8), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 7 or out.outputs[0].finish_reason == "stop"
    ignored = make_llm(str(path), generation_config="vllm")
    assert ignored.get_default_sampling_params().max_tokens == 16


def test_chat_applies_template_and_reports_metrics(make_llm):
    llm = make_llm(None)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    assert tok.decode(out.prompt_token_ids).startswith("<|im_start|>system")
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].token_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
