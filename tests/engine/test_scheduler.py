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
    assert out.prompt.startswith("<|im_start|>system") and out.prompt.endswith("<|im_start|>assistant\n")
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].token_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_lof_policy_runs_longest_output_first(tiny_model_dirs, make_llm):
    llm = make_llm(tiny_model_dirs["llama"], max_num_seqs=1, scheduling_policy="lof")
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 9, 5, 7)]
    outs = llm.generate(_prompts(4, 10), params, use_tqdm=False)
    order = sorted(range(4), key=lambda i: outs[i].metrics.first_token_time)
    assert order == [1, 3, 2, 0]


def _prompt_tokens_per_step(llm, prompts, params) -> tuple[list[int], dict[str, list[int]], list[str]]:
    """Runs the requests step by step: prompt tokens computed in each step, each request's tokens, and
    the order in which requests finished."""
    eng = llm.engine
    per_step: list[int] = []
    schedule = eng.scheduler.schedule

    def counting():
        out = schedule()
        decodes = sum(1 for s in out.scheduled if s.num_new_tokens == 1 and s.request.output_token_ids)
        per_step.append(out.num_tokens - decodes)
        return out
    eng.scheduler.schedule = counting
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        eng.add_request(f"r{i}", prompt, p)
    tokens, finished = {}, []
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
                finished.append(out.request_id)
    return per_step, tokens, finished


def test_lof_paces_prompts_into_the_longest_requests_decode(tiny_model_dirs, make_llm):
    """One long request and four short ones with long prompts, 64 tokens a step: FCFS computes every
    prompt in the first steps; lof spreads them so that each short request still ends before the long
    one, at a few prompt tokens a step, and the tokens are the same."""
    prompts = [_prompts(1, 20, seed=1)[0]] + _prompts(4, 40, seed=2)
    params = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)]
    params += [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)] * 4
    runs = {}
    for policy in ("fcfs", "lof"):
        llm = make_llm(tiny_model_dirs["llama"], max_num_seqs=8, max_num_batched_tokens=64,
                       enable_prefix_caching=False, scheduling_policy=policy)
        runs[policy] = _prompt_tokens_per_step(llm, prompts, params)
    fcfs, lof = runs["fcfs"], runs["lof"]
    assert lof[1] == fcfs[1]
    assert max(fcfs[0][1:]) > 30 and sum(1 for n in fcfs[0] if n) <= 4
    assert lof[0][0] == 20  # nothing runs yet: the long request's prompt alone, then the others paced
    assert 0 < max(lof[0][1:]) <= 8 and sum(1 for n in lof[0] if n) >= 15
    assert lof[2][-1] == "r0" and len(lof[0]) <= len(fcfs[0]) + 1  # the long request ends the batch, no later


def test_pacing_allowance():
    """Prompt tokens a step may compute under lof: the steepest rate at which the unfinished prompts,
    in admission order, still end with the longest request; at once when one has no slack."""
    from tandem.engine.pacing import prompt_allowance
    from tandem.engine.request import Request

    def request(prompt: int, max_tokens: int, generated: int = 0, kv_only: bool = False) -> Request:
        r = Request(f"r{prompt}-{max_tokens}", list(range(prompt)), SamplingParams(max_tokens=max_tokens), None,
                    kv_only=kv_only)
        r.output_token_ids = [7] * generated
        r.all_token_ids += r.output_token_ids
        r.num_computed_tokens = r.num_tokens - 1 if generated else 0
        return r

    longest = request(10, 100, generated=1)  # 99 tokens to go
    waiting = [request(50, 10), request(100, 20)]  # 50 tokens within 89 steps, then 150 within 79
    assert prompt_allowance([longest], waiting, 64) == 2
    assert prompt_allowance([longest, request(30, 40)], waiting, 64) == 3  # 30 more before them
    assert prompt_allowance([longest], waiting + [request(5, 99)], 64) == 64  # no slack: all of it, capped
    assert prompt_allowance([longest], waiting + [request(5, 99)], 256) == 155  # 50 + 100 + 5 at once
    assert prompt_allowance([longest], [request(50, 10, kv_only=True)], 64) == 64  # decodes elsewhere
    # nothing runs yet: the longest waiting request sets the horizon; its prompt (first under lof) is
    # computed at once, the others' spread after it (150 within 10 steps)
    assert prompt_allowance([], waiting[::-1], 256) == 100


def test_max_num_seqs_counts_the_samples_of_n(tiny_model_dirs, make_llm):
    """n = 3 requests under max_num_seqs = 4: each one's samples fork beside it at its first token, so one
    runs at a time (vLLM counts sequences); a request wider than the limit still runs, alone."""
    llm = make_llm(tiny_model_dirs["llama"], max_num_seqs=4)
    eng = llm.engine
    three = SamplingParams(temperature=0.8, n=3, seed=1, max_tokens=6, ignore_eos=True)
    for i, p in enumerate(_prompts(3, 12)):
        eng.add_request(f"r{i}", p, three)
    eng.add_request("wide", _prompts(1, 12, seed=1)[0], SamplingParams(temperature=0.8, n=6, max_tokens=3))
    assert eng.stats().num_waiting == 3 * 3 + 6  # sequences, as running counts them
    most, outs = 0, {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            outs[out.request_id] = out
        most = max(most, len(eng.scheduler.running))
        assert len(eng.scheduler.running) <= 4 or {r.group.request_id for r in eng.scheduler.running} == {"wide"}
    assert most >= 3
    assert [len(outs[f"r{i}"].outputs) for i in range(3)] == [3, 3, 3] and len(outs["wide"].outputs) == 6
    assert eng.kv.pool.num_free == eng.kv.pool.num_blocks
