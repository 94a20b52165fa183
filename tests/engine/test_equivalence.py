"""Greedy output token-identical to transformers' `generate` (float32, CPU), for the embedded
SmolLM2 (loaded by transformers straight from its GGUF file: an independent path) and for tiny
random-weight Llama, Qwen2 and Mistral folders — plain, with prefix caching, with chunked prefill
under a tiny token budget, and with so few KV blocks that preemption happens."""
from __future__ import annotations

import os

import pytest
import torch

from tandem import SamplingParams

TINY_NEW_TOKENS = 24
SMOL_NEW_TOKENS = 40
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain in one sentence why the sky is blue, then give an example of another blue thing.",
    "Hi",
]


def _tiny_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 49000, (40,), generator=g).tolist()  # a 2.5-block common prefix
    lengths = [3, 17, 33, 64, 90]
    prompts = [torch.randint(3, 49000, (n,), generator=g).tolist() for n in lengths]
    prompts += [shared + torch.randint(3, 49000, (n,), generator=g).tolist() for n in (5, 16, 29)]
    return prompts


def _hf_greedy(model, prompts: list[list[int]], new_tokens: int, force_length: bool) -> list[list[int]]:
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        kwargs = dict(min_new_tokens=new_tokens) if force_length else {}
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=2, **kwargs)
        out.append(y[0, len(ids):].tolist())
    return out


class _References(dict):
    """(model path, prompts, params, transformers' greedy outputs), computed on first use per model."""

    def __init__(self, tiny_model_dirs: dict, smollm_dir: str) -> None:
        super().__init__()
        self.tiny, self.smollm_dir = tiny_model_dirs, smollm_dir

    def __missing__(self, arch: str):
        self[arch] = _smollm_reference(self.smollm_dir) if arch == "smollm2" else _tiny_reference(self.tiny[arch])
        return self[arch]


@pytest.fixture(scope="module")
def references(tiny_model_dirs, smollm_dir):
    return _References(tiny_model_dirs, smollm_dir)


def _tiny_reference(path: str):
    from transformers import AutoModelForCausalLM

    prompts = _tiny_prompts()
    params = SamplingParams(temperature=0.0, max_tokens=TINY_NEW_TOKENS, min_tokens=TINY_NEW_TOKENS)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, prompts, params, _hf_greedy(model, prompts, TINY_NEW_TOKENS, True)


def _smollm_reference(smollm_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from tandem.engine.loader import default_model_path

    gguf = default_model_path()
    folder, name = os.path.split(gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True)).eval()
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    chats = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                                add_generation_prompt=True), add_special_tokens=False)
             for c in CHATS]
    return (None, chats, SamplingParams(temperature=0.0, max_tokens=SMOL_NEW_TOKENS),
            _hf_greedy(model, chats, SMOL_NEW_TOKENS, False))


def _generate(llm, prompts, params) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


MODELS = ["smollm2", "llama", "qwen2", "mistral"]


@pytest.mark.parametrize("arch", MODELS)
def test_plain_batch(arch, references, make_llm):
    path, prompts, params, expected = references[arch]
    llm = make_llm(path, enable_prefix_caching=False)
    assert _generate(llm, prompts, params) == expected
    assert llm.stats().prefix_cache_hits == 0


@pytest.mark.parametrize("arch", MODELS)
def test_prefix_caching(arch, references, make_llm):
    path, prompts, params, expected = references[arch]
    llm = make_llm(path, enable_prefix_caching=True)
    assert _generate(llm, prompts, params) == expected
    first_hits = llm.stats().prefix_cache_hits
    assert _generate(llm, prompts, params) == expected  # now mostly from the cache
    assert llm.stats().prefix_cache_hits > first_hits + sum(len(p) for p in prompts) // 2
    if arch != "smollm2":
        assert first_hits > 0  # the shared 40-token prefix was reused within the first batch


@pytest.mark.parametrize("arch", MODELS)
def test_chunked_prefill(arch, references, make_llm):
    path, prompts, params, expected = references[arch]
    llm = make_llm(path, max_num_batched_tokens=12, enable_prefix_caching=False)
    assert _generate(llm, prompts, params) == expected


@pytest.mark.parametrize("arch", MODELS)
def test_preemption(arch, references, make_llm):
    path, prompts, params, expected = references[arch]
    longest = max(len(p) for p in prompts) + params.max_tokens
    blocks = -(-longest // 16) + 2  # room for the longest request, not for the whole batch
    llm = make_llm(path, num_gpu_blocks_override=blocks, enable_prefix_caching=arch != "qwen2")
    assert _generate(llm, prompts, params) == expected
    assert llm.stats().num_preemptions > 0


@pytest.mark.parametrize("budget", [2048, 12])  # whole prompts in one step, and chunks beside decode rows
def test_last_layer_projects_only_sampled_rows(budget, references, make_llm):
    """A prompt's rows sample nothing but their last: past the last layer's attention (which still
    writes every row's K/V) only the sampled rows go on through its projection and MLP. Output is
    still transformers', and the last layer's MLP sees exactly one row per sampled token."""
    path, prompts, params, expected = references["llama"]
    # eager, one step a round trip: forward hooks see every pass (a CUDA graph's replay runs none of them)
    llm = make_llm(path, enable_prefix_caching=False, max_num_batched_tokens=budget, enforce_eager=True,
                   num_scheduler_steps=1)
    layers, rows = llm.engine.runner.model.layers, {"first": 0, "last": 0}
    hooks = [layers[i].down_proj.register_forward_hook(
        lambda mod, args, out, key=key: rows.__setitem__(key, rows[key] + args[0].shape[0]))
        for i, key in ((0, "first"), (-1, "last"))]
    try:
        assert _generate(llm, prompts, params) == expected
    finally:
        for h in hooks:
            h.remove()
    sampled = len(prompts) * params.max_tokens
    assert rows["last"] == sampled
    assert rows["first"] == sum(len(p) for p in prompts) + sampled - len(prompts)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_large_mixed_batch(backend, tiny_model_dirs, make_llm, monkeypatch):
    """More sequences than one decode group, with contexts spread across many block counts. With the
    Triton backend on 8 SMs they are spread enough that decode steps replay the bucket's graph that
    splits them (cuda_graphs.py: SPREAD_SPLITS)."""
    from transformers import AutoModelForCausalLM

    from tandem.engine import cuda_graphs

    replay, keys = cuda_graphs.DecodeGraphs._replay, []
    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "_replay", lambda self, key: replay(self, keys.append(key) or key))
    if backend == "triton":
        monkeypatch.setenv("TANDEM_ATTENTION_BACKEND", "triton")
        monkeypatch.setattr(cuda_graphs, "sm_count", lambda device: 8)
    path = tiny_model_dirs["mistral"]
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 49000, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 150, (40,), generator=g)]
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = _hf_greedy(model, prompts, 12, True)
    if backend == "triton":  # the interpreter is slow: 17 rows (a 32-row bucket) and 4 tokens show it
        prompts, expected, params = prompts[:17], [e[:4] for e in expected[:17]], SamplingParams(
            temperature=0.0, max_tokens=4, min_tokens=4)
    llm = make_llm(path, enable_prefix_caching=False)
    assert _generate(llm, prompts, params) == expected
    if backend == "triton":  # (on a GPU the torch backend replays graphs too: which ones is not the point)
        assert {kind for _, kind in keys} == {"spread"}


@pytest.mark.parametrize("arch", ["llama"])  # mistral's one KV head runs this backend in test_large_mixed_batch
def test_triton_attention_backend(arch, references, make_llm, monkeypatch):
    """The CUDA attention backend (paged prefill + split-K decode kernels through block tables), run
    by Triton's interpreter on CPUs: the engine's metadata for both kernels, with a cached prefix
    (second pass) and prompt chunks beside decode rows (tiny token budget), matches transformers."""
    monkeypatch.setenv("TANDEM_ATTENTION_BACKEND", "triton")
    path, prompts, params, expected = references[arch]
    llm = make_llm(path, enable_prefix_caching=True, max_num_batched_tokens=40, num_scheduler_steps=1)
    assert _generate(llm, prompts[:6], params) == expected[:6]
    hits = llm.stats().prefix_cache_hits
    assert _generate(llm, prompts[5:], params) == expected[5:]
    assert llm.stats().prefix_cache_hits > hits
    assert llm.stats().num_lookahead_steps == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])  # TANDEM_ATTENTION_BACKEND's two choices
def test_prompt_kernels_compile_without_writing(backend, references, make_llm, monkeypatch):
    """The start-up pass that compiles a prompt step's kernels on GPUs (ModelRunner.compile_prompt_kernels):
    it reads block 0 and writes nothing to the KV cache, and the engine's output after it is still
    transformers'."""
    monkeypatch.setenv("TANDEM_ATTENTION_BACKEND", backend)
    path, prompts, params, expected = references["llama"]
    llm = make_llm(path, num_scheduler_steps=1)
    runner = llm.engine.runner
    for cache in runner.kv_caches:
        cache[:, 0].normal_()
    before = [c.clone() for c in runner.kv_caches]
    runner.compile_prompt_kernels((5, 40))
    assert all(torch.equal(a, b) for a, b in zip(before, runner.kv_caches))
    assert _generate(llm, prompts[:2], params) == expected[:2]


@pytest.mark.parametrize("path_,steps", [("triton", 1), ("triton", 8), ("torch", 1), ("sdpa", 1)])
def test_stale_kv_slots_are_never_read(path_, steps, references, make_llm, monkeypatch):
    """Every KV slot starts as NaN, as a block's tail or a padding block may hold whatever an earlier
    request left: each attention path (the Triton kernels, one step a time or in lookaheads over padded
    decode buffers; the C++ kernel; the torch fallback's SDPA over gathered blocks) reads only the slots
    its own request wrote, so the output is still transformers'."""
    from tandem.kernels import cpu

    monkeypatch.setenv("TANDEM_ATTENTION_BACKEND", "triton" if path_ == "triton" else "torch")
    if path_ == "sdpa":
        monkeypatch.setitem(cpu._state, "ok", False)  # as where no compiler is found
    path, prompts, params, expected = references["llama"]
    llm = make_llm(path, num_scheduler_steps=steps, max_num_batched_tokens=40)
    for cache in llm.engine.runner.kv_caches:
        cache.fill_(float("nan"))
    assert _generate(llm, prompts[:4], params) == expected[:4]
    assert (llm.stats().num_lookahead_steps > 0) == (steps > 1)


def test_multi_step_decoding(references, make_llm, monkeypatch):
    """Greedy decode steps run ahead on the device (multi_step.py) through the Triton backend's static
    decode buffers, here replayed eagerly under Triton's interpreter: EOS banned on the device until
    min_tokens, requests stopping in the middle of a lookahead, and prefix caching of the blocks the
    lookahead filled, all token-identical to transformers."""
    monkeypatch.setenv("TANDEM_ATTENTION_BACKEND", "triton")
    path, prompts, params, expected = references["llama"]
    llm = make_llm(path, enable_prefix_caching=True, num_scheduler_steps=8)
    # 24, 21, 18, ...: rows stop mid-lookahead, and a lookahead launched before the last one's tokens are read
    # leaves out the rows reaching their length; the first request stops on a token while the next lookahead
    # is in flight, and that one's rows for it are dropped
    lengths = [TINY_NEW_TOKENS - 3 * (i % 5) for i in range(len(prompts))]
    stop_at = next(i for i in range(12, TINY_NEW_TOKENS) if expected[0][i] not in expected[0][:i])
    each = [SamplingParams(temperature=0.0, max_tokens=TINY_NEW_TOKENS, stop_token_ids=[expected[0][stop_at]])]
    each += [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n) for n in lengths[1:]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], each, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == expected[0][:stop_at + 1]
    assert outs[0].outputs[0].finish_reason == "stop"
    assert [o.outputs[0].token_ids for o in outs[1:]] == [e[:n] for e, n in zip(expected[1:], lengths[1:])]
    assert [o.outputs[0].finish_reason for o in outs[1:]] == ["length"] * (len(prompts) - 1)
    assert llm.stats().num_lookahead_steps >= TINY_NEW_TOKENS // 2
    assert llm.stats().num_chained_lookaheads >= 1  # launched before the previous one's tokens were read
    # a prompt that extends one generated sequence finds the blocks its lookahead steps filled
    hits = llm.stats().prefix_cache_hits
    longer = prompts[1] + expected[1][:lengths[1]]
    llm.generate([{"prompt_token_ids": longer}], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    assert llm.stats().prefix_cache_hits - hits >= (len(longer) - 1) // 16 * 16


def test_prompt_lanes_in_lookaheads(references, make_llm, monkeypatch):
    """Prompt chunks computed inside multi-step lookaheads, one prompt token per row beside the decode
    rows (multi_step.py), as lof's pacing schedules them: token-identical to transformers, and the
    blocks the lanes filled serve prefix hits afterwards."""
    monkeypatch.setenv("TANDEM_ATTENTION_BACKEND", "triton")
    path, prompts, params, expected = references["llama"]
    llm = make_llm(path, enable_prefix_caching=True, num_scheduler_steps=8, max_num_batched_tokens=64,
                   scheduling_policy="lof")
    lengths = [TINY_NEW_TOKENS // 2 - (i % 6) for i in range(len(prompts))]  # 12 down to 7: rows end in different lookaheads
    each = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n) for n in lengths]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], each, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [e[:n] for e, n in zip(expected, lengths)]
    assert llm.stats().num_lookahead_prompt_tokens >= sum(len(p) for p in prompts) // 2
    graphs = llm.engine.runner.graphs  # decode-only graphs hold any batch, and stop there: no graph past it
    most = llm.engine.config.scheduler.max_num_seqs
    assert graphs.decode_buckets[-1] >= most > graphs.decode_buckets[-2] and graphs.buckets[-1] > most
    assert max(b for b, kind in graphs.graphs if kind != "lanes") == graphs.decode_buckets[-1]
    hits = llm.stats().prefix_cache_hits
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=2),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [e[:2] for e in expected]
    assert llm.stats().prefix_cache_hits - hits >= sum((len(p) - 1) // 16 for p in prompts)


def test_rows_past_the_decode_graphs_run_as_ordinary_steps(references, make_llm, monkeypatch):
    """Under lof the graphs run past max_num_seqs only with prompt lanes: a decode-only step with more rows
    (a greedy request whose n samples outnumber max_num_seqs, admitted alone) is not a lookahead but
    ordinary steps, token-identical to transformers (a lookahead planned for it had no graph to run on)."""
    monkeypatch.setenv("TANDEM_ATTENTION_BACKEND", "triton")
    path, prompts, params, expected = references["llama"]
    llm = make_llm(path, num_scheduler_steps=8, max_num_seqs=4, scheduling_policy="lof")
    assert llm.engine.runner.graphs.max_decode_rows < 6 <= llm.engine.runner.graphs.max_mixed_rows
    out = llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0.0, n=6, max_tokens=8),
                       use_tqdm=False)[0]
    assert [o.token_ids for o in out.outputs] == [expected[0][:8]] * 6


def test_lookaheads_planned_on_their_outcome(references, make_llm, monkeypatch):
    """The step after a lookahead is planned before its tokens are read (lookaheads.py), on so few KV
    blocks that this plan preempts requests still holding placeholder tokens, with prompts paced into
    lanes and one request asking for logprobs (never in a lookahead: its steps are ordinary ones, planned
    on a lookahead's outcome and run once its tokens are in): token-identical to transformers."""
    from tandem.engine.scheduler import Scheduler

    monkeypatch.setenv("TANDEM_ATTENTION_BACKEND", "triton")
    held = []  # placeholder tokens of each preempted request, when it was preempted
    preempt = Scheduler._preempt
    monkeypatch.setattr(Scheduler, "_preempt",
                        lambda self, req, out: (held.append(req.num_ahead), preempt(self, req, out)))
    path, prompts, params, expected = references["llama"]
    new = 12
    prompts, expected = prompts[3:], [e[:new] for e in expected[3:]]
    longest = max(len(p) for p in prompts) + new
    llm = make_llm(path, enable_prefix_caching=True, num_scheduler_steps=8, max_num_batched_tokens=64,
                   scheduling_policy="lof", num_gpu_blocks_override=-(-longest // 16) + 2)
    each = [SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new) for _ in prompts]
    each[-1] = SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], each, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert len(outs[-1].outputs[0].logprobs) == new
    assert held and max(held) > 0  # a plan made on a lookahead's outcome preempted a request ahead of its tokens
