"""Sampling through the real engine: seeds, n / best_of, forks with copy-on-write, stop conditions,
bad words, penalties, logprobs against transformers, and the filters (top-k, top-p, min-p).

Most tests use the tiny random-weight Llama (its distributions are nearly flat, so a broken filter or
seed shows at once); stop strings use the embedded SmolLM2, where the text is real."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from tandem import SamplingParams

PROMPT = list(range(1000, 1021))  # 21 tokens: not a multiple of the block size
REPEATING = [500] * 20  # the tiny Llama's greedy answer to this repeats a token three times


def _tiny(make_llm, tiny_model_dirs, arch="llama", **kw):
    kw.setdefault("max_model_len", 256)
    kw.setdefault("num_gpu_blocks_override", 128)
    kw.setdefault("block_size", 16)
    return make_llm(tiny_model_dirs[arch], **kw)


def _gen(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def _ids(out, i=0):
    return out.outputs[i].token_ids


@pytest.fixture(scope="module")
def hf_llama(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32).eval()


def _hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of ids (row j predicts ids[j + 1])."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(-1)


def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


# ---- seeds ------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(make_llm, tiny_model_dirs):
    llm = _tiny(make_llm, tiny_model_dirs)
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    a = _ids(_gen(llm, [PROMPT], seeded)[0])
    assert _ids(_gen(llm, [PROMPT], seeded)[0]) == a
    # batched with unseeded requests (before and after it, other prompts, other lengths)
    batch = _gen(llm, [list(range(2000, 2040)), PROMPT, PROMPT, [7, 8, 9]],
                 [unseeded, seeded, unseeded, SamplingParams(temperature=1.0, max_tokens=3)])
    assert _ids(batch[1]) == a
    assert _ids(batch[2]) != a  # the unseeded twin did not borrow the seeded generator
    # a different seed, and the same seed on another prompt, differ
    assert _ids(_gen(llm, [PROMPT], seeded.clone(seed=1235))[0]) != a
    assert _ids(_gen(llm, [PROMPT[:-1]], seeded)[0]) != a
    # the seed makes sampling reproducible, not greedy
    assert a != _ids(_gen(llm, [PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0])


def test_seeded_n_samples_are_reproducible_and_distinct(make_llm, tiny_model_dirs):
    llm = _tiny(make_llm, tiny_model_dirs)
    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    first = [o.token_ids for o in _gen(llm, [PROMPT], sp)[0].outputs]
    second = [o.token_ids for o in _gen(llm, [[3, 4], PROMPT], sp)[1].outputs]
    assert first == second
    assert len({tuple(t) for t in first}) == 3


# ---- n and best_of ----------------------------------------------------------------------------------


def test_n_samples(make_llm, tiny_model_dirs):
    llm = _tiny(make_llm, tiny_model_dirs)
    (out,) = _gen(llm, [PROMPT], SamplingParams(n=4, temperature=1.0, max_tokens=8, ignore_eos=True,
                                                 logprobs=0))
    assert len(out.outputs) == 4 and [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 8 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert len({o.token_ids[0] for o in out.outputs}) > 1  # the forks drew their own first tokens
    for o in out.outputs:
        assert o.cumulative_logprob == pytest.approx(sum(lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)),
                                                     abs=1e-4)


def test_best_of_returns_the_best_n_by_cumulative_logprob(make_llm, tiny_model_dirs):
    llm = _tiny(make_llm, tiny_model_dirs)
    every = _gen(llm, [PROMPT], SamplingParams(n=5, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True,
                                               logprobs=0))[0]  # logprobs=0: cumulative logprobs, no top-k
    (best,) = _gen(llm, [PROMPT], SamplingParams(n=2, best_of=5, temperature=1.0, seed=11, max_tokens=6,
                                                  ignore_eos=True))
    assert len(best.outputs) == 2
    scores = [o.cumulative_logprob for o in best.outputs]
    assert scores[0] >= scores[1]
    ranked = sorted(every.outputs, key=lambda o: o.cumulative_logprob, reverse=True)
    assert [o.token_ids for o in best.outputs] == [o.token_ids for o in ranked[:2]]
    assert scores == pytest.approx([o.cumulative_logprob for o in ranked[:2]], abs=1e-5)
    assert [o.index for o in best.outputs] == [0, 1]


def test_cumulative_logprob_only_where_wanted(make_llm, tiny_model_dirs):
    """Without logprobs (or best_of > n) a request's cumulative_logprob is None, as in vLLM: plain greedy
    rows take the argmax of the model's own logits, no log_softmax. Tokens are the same either way, and
    a batch mixing both kinds keeps each one's report."""
    llm = _tiny(make_llm, tiny_model_dirs, dtype="bfloat16")
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    wanted = plain.clone(logprobs=0)
    alone = _gen(llm, [PROMPT], plain)[0].outputs[0]
    mixed = _gen(llm, [PROMPT, PROMPT], [plain, wanted])
    assert alone.cumulative_logprob is None and mixed[0].outputs[0].cumulative_logprob is None
    got = mixed[1].outputs[0]
    assert got.cumulative_logprob == pytest.approx(sum(lp[t].logprob for lp, t in zip(got.logprobs, got.token_ids)),
                                                   abs=1e-4)
    assert alone.token_ids == mixed[0].outputs[0].token_ids == got.token_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_n_greedy_forks_copy_the_shared_partial_block(make_llm, tiny_model_dirs, arch):
    llm = _tiny(make_llm, tiny_model_dirs, arch, enable_prefix_caching=False)
    assert len(PROMPT) % 16 != 0
    greedy = _ids(_gen(llm, [PROMPT], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0])

    runner, copies = llm.engine.runner, []
    original = runner._copy_blocks

    def checked_copy(pairs):
        original(pairs)
        for src, dst in pairs:
            for cache in runner.kv_caches:  # the data really moved, before the forward pass wrote
                assert torch.equal(cache[:, dst], cache[:, src])
        copies.extend(pairs)

    runner._copy_blocks = checked_copy
    try:
        (out,) = _gen(llm, [PROMPT], SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True))
    finally:
        runner._copy_blocks = original
    assert [o.token_ids for o in out.outputs] == [greedy] * 3
    # the three sequences shared the block holding prompt tokens 16..20; the first two writers copied it
    assert len(copies) == 2
    assert copies[0][0] == copies[1][0] and copies[0][1] != copies[1][1]


def test_n_sampled_forks_with_chunked_prefill_and_small_blocks(make_llm, tiny_model_dirs):
    """Forks of a prompt prefilled in chunks, with blocks of 4: every seeded sample matches the same
    seeded request run unchunked."""
    sp = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=9, ignore_eos=True)
    want = [o.token_ids for o in _gen(_tiny(make_llm, tiny_model_dirs), [PROMPT], sp)[0].outputs]
    llm = _tiny(make_llm, tiny_model_dirs, block_size=4, max_num_batched_tokens=6)
    assert [o.token_ids for o in _gen(llm, [PROMPT], sp)[0].outputs] == want


# ---- stop conditions ---------------------------------------------------------------------------------


def test_stop_strings_cut_exactly(make_llm, smollm_dir):
    llm = make_llm(None, max_model_len=512, num_gpu_blocks_override=64)
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "Describe the sun in one sentence."}],
                                   tokenize=False, add_generation_prompt=True)
    prompt = tok.encode(text, add_special_tokens=False)
    (full,) = _gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=30))
    full_text, full_ids = full.outputs[0].text, full.outputs[0].token_ids
    assert len(full_ids) >= 12 and len(full_text) >= 40, full_text

    mid = len(full_text) // 2
    middle = full_text[mid:mid + 7]  # likely starts and ends inside tokens
    early = full_text[8:12]
    cases = [
        (dict(stop=middle), middle, False),
        (dict(stop=middle, include_stop_str_in_output=True), middle, True),
        (dict(stop=["never-there", middle, early]), early, False),  # the earliest match wins
        (dict(stop=[middle[-3:]], include_stop_str_in_output=True), middle[-3:], True),
    ]
    params = [SamplingParams(temperature=0, max_tokens=30, **kw) for kw, _, _ in cases]
    params.append(SamplingParams(temperature=0, max_tokens=30, stop=["Describe", "user"]))  # prompt only
    outs = _gen(llm, [prompt] * len(params), params)
    for (kw, stop, include), out in zip(cases, outs):
        o = out.outputs[0]
        cut = full_text.find(stop)
        assert cut >= 0
        assert o.text == full_text[:cut + (len(stop) if include else 0)], (kw, o.text)
        assert o.finish_reason == "stop" and o.stop_reason == stop
        # generation stopped at the first token that completed the stop string
        k = next(k for k in range(1, len(full_ids) + 1) if stop in tok.decode(full_ids[:k]))
        assert o.token_ids == full_ids[:k]
    last = outs[-1].outputs[0]
    assert last.text == full_text and last.token_ids == full_ids
    assert last.finish_reason == full.outputs[0].finish_reason and last.stop_reason is None


def test_stop_token_ids_and_max_tokens(make_llm, tiny_model_dirs):
    llm = _tiny(make_llm, tiny_model_dirs)
    (full,) = _gen(llm, [PROMPT], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    ids = _ids(full)
    assert full.outputs[0].finish_reason == "length" and len(ids) == 16
    k = next(i for i in range(2, 16) if ids[i] not in ids[:i])
    stop_tok = ids[k]
    outs = _gen(llm, [PROMPT] * 4, [
        SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_tok, 3]),
        SamplingParams(temperature=0, max_tokens=k),  # the same prefix, cut by length
        SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_tok], min_tokens=k + 2),
        SamplingParams(temperature=0, max_tokens=1),
    ])
    stopped, by_length, late, one = (o.outputs[0] for o in outs)
    assert stopped.token_ids == ids[:k + 1]  # the stop token is in the ids...
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_tok
    assert stopped.text == by_length.text and by_length.token_ids == ids[:k]  # ...but not in the text
    assert by_length.finish_reason == "length" and by_length.stop_reason is None
    # min_tokens: the stop token is banned until k + 2 tokens exist
    assert stop_tok not in late.token_ids[:k + 2] and late.token_ids[:k] == ids[:k]
    assert late.finish_reason == "length" or (late.token_ids[-1] == stop_tok and late.finish_reason == "stop")
    assert one.token_ids == ids[:1] and one.finish_reason == "length"


def test_max_tokens_none_runs_to_max_model_len_without_mutating_params(make_llm, tiny_model_dirs):
    llm = _tiny(make_llm, tiny_model_dirs, max_model_len=32)
    sp = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True, bad_words=["the"])
    first, short = _gen(llm, [PROMPT, PROMPT[:10]], sp)
    assert len(first.outputs[0].token_ids) == 32 - len(PROMPT) and first.outputs[0].finish_reason == "length"
    assert len(short.outputs[0].token_ids) == 22  # max_tokens is per request, not from the first one
    assert sp.max_tokens is None and sp._eos_token_ids == () and sp._bad_words_token_ids == []
    assert _gen(llm, [PROMPT], sp)[0].outputs[0].token_ids == first.outputs[0].token_ids


def test_stop_token_text_with_include_stop_str_in_output(make_llm, tiny_model_dirs):
    llm = _tiny(make_llm, tiny_model_dirs)
    ids = _ids(_gen(llm, [PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0])
    k = next(i for i in range(2, 8) if ids[i] not in ids[:i])
    with_stop, without = _gen(llm, [PROMPT] * 2, [
        SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[ids[k]], include_stop_str_in_output=True),
        SamplingParams(temperature=0, max_tokens=k + 1)])
    assert with_stop.outputs[0].token_ids == ids[:k + 1]
    assert with_stop.outputs[0].text == without.outputs[0].text


def test_eos_min_tokens_and_ignore_eos(make_llm, tiny_model_dirs, tmp_path):
    base = _tiny(make_llm, tiny_model_dirs)
    ids = _ids(_gen(base, [PROMPT], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0])
    k = next(i for i in range(3, 16) if ids[i] not in ids[:i])
    eos = ids[k]
    # the same weights, with the k-th greedy token declared an end-of-sequence token
    model = tmp_path / "tiny-llama-eos"
    shutil.copytree(tiny_model_dirs["llama"], model)
    gen = json.loads((model / "generation_config.json").read_text())
    # and one id past the vocabulary (random-weight configs carry Llama-3's 128001): never sampled, and
    # banning it before min_tokens would index past the logits
    gen["eos_token_id"] = [eos, 2, 10**6]
    (model / "generation_config.json").write_text(json.dumps(gen))
    llm = _tiny(make_llm, {"llama": str(model)})
    assert eos in llm.engine.eos_token_ids and 10**6 not in llm.engine.eos_token_ids
    plain, short, min_tok, ignored, both = (o.outputs[0] for o in _gen(llm, [PROMPT] * 5, [
        SamplingParams(temperature=0, max_tokens=16),
        SamplingParams(temperature=0, max_tokens=k),
        SamplingParams(temperature=0, max_tokens=16, min_tokens=k + 3),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=16, min_tokens=k + 3, ignore_eos=True),
    ]))
    assert plain.token_ids == ids[:k + 1] and plain.finish_reason == "stop" and plain.stop_reason is None
    assert plain.text == short.text  # EOS is not text
    assert eos not in min_tok.token_ids[:k + 3] and len(min_tok.token_ids) >= k + 3
    assert min_tok.token_ids[:k] == ids[:k]
    assert min_tok.finish_reason == "length" or (min_tok.token_ids[-1] == eos and min_tok.finish_reason == "stop")
    assert ignored.token_ids == ids and ignored.finish_reason == "length"
    # ignore_eos does not lift min_tokens' ban on EOS (vLLM, transformers' min_new_tokens): the benchmarks'
    # min_tokens = max_tokens runs never emit it
    assert eos not in both.token_ids[:k + 3] and both.token_ids[:k] == ids[:k]
    assert len(both.token_ids) == 16 and both.finish_reason == "length"


def test_bad_words(make_llm, tiny_model_dirs):
    llm = _tiny(make_llm, tiny_model_dirs)
    tok = llm.get_tokenizer()
    ids = _ids(_gen(llm, [PROMPT], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0])

    def enc(s):
        return tok.encode(s, add_special_tokens=False)

    # a one-token word (" word"), first seen at position i
    i, word = next((i, tok.decode([t])[1:]) for i, t in enumerate(ids) if i > 0 and t not in ids[:i]
                   and re.fullmatch(r" [A-Za-z]{3,}", tok.decode([t])) and enc(tok.decode([t])) == [t])
    # a two-token word (" xxyy" encoding to exactly those two tokens), at positions j, j + 1
    j, pair = next((j, tok.decode(ids[j:j + 2])[1:]) for j in range(1, 22)
                   if re.fullmatch(r" [A-Za-z]{4,}", tok.decode(ids[j:j + 2]) or "")
                   and enc(tok.decode(ids[j:j + 2])) == ids[j:j + 2] and len(enc(tok.decode(ids[j:j + 2])[1:])) > 1
                   and ids[j + 1] not in ids[:j + 1])
    one, two = (o.outputs[0] for o in _gen(llm, [PROMPT] * 2, [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=[word]),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=[pair]),
    ]))
    assert one.token_ids[:i] == ids[:i] and ids[i] not in one.token_ids
    assert " " + word not in one.text
    assert two.token_ids[:j + 1] == ids[:j + 1] and two.token_ids[j + 1] != ids[j + 1]
    assert " " + pair not in two.text


# ---- penalties ---------------------------------------------------------------------------------------


def _penalized(logits: torch.Tensor, prompt: list[int], out: list[int], sp: SamplingParams) -> torch.Tensor:
    """vLLM's penalties, written out: repetition on prompt + output tokens, presence / frequency on
    output tokens."""
    logits = logits.clone()
    if sp.repetition_penalty != 1.0:
        for t in set(prompt) | set(out):
            v = logits[t]
            logits[t] = v / sp.repetition_penalty if v > 0 else v * sp.repetition_penalty
    for t in set(out):
        logits[t] -= sp.frequency_penalty * out.count(t) + sp.presence_penalty
    return logits


@pytest.mark.parametrize("penalty", [
    dict(repetition_penalty=1.5), dict(repetition_penalty=0.6), dict(presence_penalty=1.0),
    dict(frequency_penalty=0.7), dict(presence_penalty=-2.0), dict(frequency_penalty=-1.5),
    dict(repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.4)])
def test_penalties_change_greedy_output_as_specified(make_llm, tiny_model_dirs, hf_llama, penalty):
    llm = _tiny(make_llm, tiny_model_dirs)
    base = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    sp = base.clone(**penalty)
    plain, penalized = (_ids(o) for o in _gen(llm, [REPEATING] * 2, [base, sp]))
    assert len(set(plain)) < len(plain)  # the unpenalized answer repeats itself
    assert penalized != plain
    logits = _hf_logits(hf_llama, REPEATING + penalized)
    for i, tok in enumerate(penalized):
        ref = _penalized(logits[len(REPEATING) - 1 + i], REPEATING, penalized[:i], sp)
        assert tok == int(ref.argmax()), f"step {i}"


# ---- logprobs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 7])  # whole prefill, and chunks of 7
def test_logprobs_match_transformers(make_llm, tiny_model_dirs, hf_llama, max_num_batched_tokens):
    llm = _tiny(make_llm, tiny_model_dirs, max_num_batched_tokens=max_num_batched_tokens)
    greedy, sampled = _gen(llm, [PROMPT] * 2, [
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5, prompt_logprobs=5),
        SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, logprobs=2)])

    ref = _hf_logprobs(hf_llama, PROMPT + _ids(greedy))

    def check(entry, row, actual, k):
        top_vals, top_ids = row.topk(k)
        assert [t for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank) if lp.rank <= k] == top_ids.tolist()
        assert set(entry) == set(top_ids.tolist()) | {actual}
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(row[t].item(), abs=1e-4)
            assert lp.rank == int((row > row[t]).sum()) + 1
        return entry[actual].logprob

    # prompt logprobs: position j is the logprob of prompt[j] given prompt[:j]
    plp = greedy.prompt_logprobs
    assert len(plp) == len(PROMPT) and plp[0] is None
    for j in range(1, len(PROMPT)):
        check(plp[j], ref[j - 1], PROMPT[j], 5)
    # sample logprobs
    o = greedy.outputs[0]
    assert len(o.logprobs) == len(o.token_ids) == 8
    total = 0.0
    for i, (entry, t) in enumerate(zip(o.logprobs, o.token_ids)):
        row = ref[len(PROMPT) - 1 + i]
        assert t == int(row.argmax()) and entry[t].rank == 1
        total += check(entry, row, t, 5)
    assert o.cumulative_logprob == pytest.approx(total, abs=1e-4)
    tok = llm.get_tokenizer()  # every entry names its token as text, as vLLM's offline outputs do
    assert all(lp.decoded_token == tok.decode([t]) for e in o.logprobs + plp[1:] for t, lp in e.items())

    # sampled tokens are mostly outside the top 2: their own entry carries their true rank
    s = sampled.outputs[0]
    assert sampled.prompt_logprobs is None
    ref = _hf_logprobs(hf_llama, PROMPT + s.token_ids)
    total = 0.0
    for i, (entry, t) in enumerate(zip(s.logprobs, s.token_ids)):
        total += check(entry, ref[len(PROMPT) - 1 + i], t, 2)
    assert any(entry[t].rank > 2 for entry, t in zip(s.logprobs, s.token_ids))
    assert s.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_prompt_logprobs_survive_preemption(make_llm, tiny_model_dirs):
    """Two requests that cannot both grow in a 14-block cache: one is preempted and recomputed. Its
    prompt logprobs must still have one entry per prompt token."""
    want = _gen(_tiny(make_llm, tiny_model_dirs), [PROMPT, PROMPT[::-1]],
                SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=1))
    llm = _tiny(make_llm, tiny_model_dirs, block_size=4, num_gpu_blocks_override=14)
    got = _gen(llm, [PROMPT, PROMPT[::-1]],
               SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=1))
    assert llm.stats().num_preemptions > 0
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert len(g.prompt_logprobs) == len(PROMPT)
        assert [e and {t: round(lp.logprob, 4) for t, lp in e.items()} for e in g.prompt_logprobs] == \
               [e and {t: round(lp.logprob, 4) for t, lp in e.items()} for e in w.prompt_logprobs]


# ---- filters ------------------------------------------------------------------------------------------


def test_degenerate_filters_equal_greedy(make_llm, tiny_model_dirs):
    llm = _tiny(make_llm, tiny_model_dirs)
    prompts = [PROMPT, REPEATING, [9, 99, 999]]
    common = dict(max_tokens=10, ignore_eos=True)
    greedy = [_ids(o) for o in _gen(llm, prompts, SamplingParams(temperature=0, **common))]
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(top_k=1, temperature=5.0)):
        sp = SamplingParams(**{"temperature": 1.0, **common, **kw})
        assert [_ids(o) for o in _gen(llm, prompts, sp)] == greedy, kw


def test_filters_keep_only_allowed_tokens(make_llm, tiny_model_dirs, hf_llama):
    """Every sampled token is checked against transformers' distribution: top-k keeps ranks <= k,
    top-p keeps tokens whose better-ranked mass is <= p, min-p keeps tokens with p >= min_p * p_max.
    Without the filter the nearly flat distribution would break each rule most of the time."""
    llm = _tiny(make_llm, tiny_model_dirs)
    cases = [dict(top_k=3), dict(top_p=0.3, temperature=0.5), dict(min_p=0.3, temperature=0.3),
             dict(top_k=20, top_p=0.9, temperature=0.7)]
    outs = _gen(llm, [PROMPT] * len(cases),
                [SamplingParams(n=3, max_tokens=8, ignore_eos=True, **{"temperature": 1.0, **kw}) for kw in cases])
    for kw, out in zip(cases, outs):
        temperature = kw.get("temperature", 1.0)
        for o in out.outputs:
            logits = _hf_logits(hf_llama, PROMPT + o.token_ids)
            for i, t in enumerate(o.token_ids):
                probs = (logits[len(PROMPT) - 1 + i] / temperature).softmax(-1)
                better = probs > probs[t]
                if "top_k" in kw:
                    assert int(better.sum()) < kw["top_k"], (kw, i)
                if "top_p" in kw:
                    assert float(probs[better].sum()) <= kw["top_p"] + 1e-5, (kw, i)
                if "min_p" in kw:
                    assert float(probs[t]) >= kw["min_p"] * float(probs.max()) - 1e-6, (kw, i)
        assert len({tuple(o.token_ids) for o in out.outputs}) > 1, kw  # still sampling
