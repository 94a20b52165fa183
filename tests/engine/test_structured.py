"""Structured outputs in the engine (tandem/engine/structured.py) on a random-weight model, whose
free choices are noise: every output still follows its constraint; a sequence continued on another
worker (resume tokens) keeps its grammar's state; what breaks the grammar is refused."""
from __future__ import annotations

import re

import pytest

from tandem import SamplingParams
from tests.engine.test_kv_transfer import engine, prompts_for, run

CODES = "[A-Z]{2}-[0-9]{2}"


@pytest.mark.parametrize("params", [dict(temperature=0), dict(temperature=1.0, seed=7, n=3, top_k=50)])
def test_random_weights_still_follow_the_constraint(tiny_model_dirs, params):
    e = engine(tiny_model_dirs["llama"], None)
    prompts = prompts_for(4, [5, 30])
    for i, ids in enumerate(prompts):
        e.add_request(f"r{i}", ids, SamplingParams(max_tokens=40, structured_outputs={"regex": CODES}, **params))
    e.add_request("free", prompts[0], SamplingParams(max_tokens=12, temperature=0))  # in the same batches
    done = run(e)
    texts = [o.text for i in range(len(prompts)) for o in done[f"r{i}"].outputs]
    assert len(texts) == len(prompts) * params.get("n", 1)
    assert all(re.fullmatch(CODES, t) for t in texts), texts
    assert all(o.finish_reason == "stop" for i in range(len(prompts)) for o in done[f"r{i}"].outputs)
    free = engine(tiny_model_dirs["llama"], None)
    free.add_request("alone", prompts[0], SamplingParams(max_tokens=12, temperature=0))
    assert run(free)["alone"].outputs[0].token_ids == done["free"].outputs[0].token_ids  # no mask leaked


def test_resumed_sequences_keep_their_grammar(tiny_model_dirs):
    e = engine(tiny_model_dirs["llama"], None)
    tok = e.tokenizer
    choices = {"choice": ["hello world", "goodbye moon"]}
    resume = tok.encode("goodbye", add_special_tokens=False)
    prompt = prompts_for(5, [20])[0]
    e.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=20, structured_outputs=choices),
                  resume_token_ids=resume)
    out = run(e)["r"].outputs[0]
    assert out.token_ids[:len(resume)] == resume  # the output carries the resumed tokens, then goes on
    assert tok.decode(out.token_ids, skip_special_tokens=True) == "goodbye moon"
    with pytest.raises(ValueError, match="breaks the request's structured_outputs"):
        e.add_request("bad", prompt, SamplingParams(temperature=0, max_tokens=20, structured_outputs=choices),
                      resume_token_ids=tok.encode("zebra", add_special_tokens=False))


def test_a_constraint_that_does_not_compile_is_the_requests_error(tiny_model_dirs):
    e = engine(tiny_model_dirs["llama"], None)
    with pytest.raises(ValueError, match="structured_outputs json could not be compiled"):
        e.add_request("r", [1, 2, 3], SamplingParams(structured_outputs={"json": {"type": "nonsense"}}))
    assert "r" not in e.groups


def test_logprobs_are_of_what_the_grammar_allows(tiny_model_dirs):
    """As vLLM reports them: the masked distribution's, so every top token is one the grammar allowed."""
    e = engine(tiny_model_dirs["llama"], None)
    e.add_request("r", prompts_for(6, [12])[0], SamplingParams(temperature=0, max_tokens=10, logprobs=3,
                                                               structured_outputs={"regex": "[0-9]{3}"}))
    out = run(e)["r"].outputs[0]
    assert re.fullmatch("[0-9]{3}", out.text)
    # ranks past the allowed tokens are -inf: whatever topk picks among them carries no probability
    tops = [e.tokenizer.decode([t]) for step in out.logprobs for t, lp in step.items()
            if lp.logprob > float("-inf") and t not in e.eos_token_ids]
    assert len(tops) >= 3 and all(re.fullmatch("[0-9]+", t) for t in tops), tops


def test_choices_beyond_ascii_and_min_tokens_past_the_end(tiny_model_dirs):
    e = engine(tiny_model_dirs["llama"], None)
    prompt = prompts_for(7, [9])[0]
    e.add_request("emoji", prompt, SamplingParams(temperature=0, max_tokens=20,
                                                  structured_outputs={"choice": ["ok 😀", "no 🙃"]}))
    # min_tokens longer than any choice: once the grammar is complete only its EOS is left, and that is banned
    e.add_request("min", prompt, SamplingParams(temperature=0, max_tokens=20, min_tokens=15,
                                                structured_outputs={"choice": ["yes", "no"]}))
    done = run(e)
    assert done["emoji"].outputs[0].text in ("ok 😀", "no 🙃")
    assert done["min"].outputs[0].text in ("yes", "no") and done["min"].outputs[0].finish_reason == "stop"


def test_a_refused_resume_leaves_nothing_behind(tiny_model_dirs):
    e = engine(tiny_model_dirs["llama"], None)
    tok = e.tokenizer
    choices = SamplingParams(temperature=0, max_tokens=20, structured_outputs={"choice": ["yes", "no"]})
    whole = tok.encode("yes", add_special_tokens=False) + [e.eos_token_ids[0]]  # the grammar is over
    with pytest.raises(ValueError, match="complete the structured_outputs"):
        e.add_request("done", [1, 2, 3], choices, resume_token_ids=whole)
    assert "done" not in e.groups and not e.has_unfinished_requests()
    e.add_request("done", [1, 2, 3], choices)  # the id is free
    assert run(e)["done"].outputs[0].text in ("yes", "no")


def test_a_constraint_after_a_marker_lets_the_output_run_free_until_then(tiny_model_dirs):
    """`after`: what a reasoning model thinks is its own; the answer after the marker follows the constraint."""
    e = engine(tiny_model_dirs["llama"], None)
    tok = e.tokenizer
    prompt = prompts_for(7, [16])[0]
    e.add_request("free", prompt, SamplingParams(temperature=0, max_tokens=12))
    free = run(e)["free"].outputs[0].token_ids
    # the marker: a token the free run writes that the tokenizer encodes alone to the same id
    at = next(i for i in range(2, len(free)) if tok.encode(tok.decode([free[i]]), add_special_tokens=False) == [free[i]]
              and free[i] not in free[:i])
    marker = tok.decode([free[at]])
    spec = {"choice": ["yes", "no"], "after": marker}
    e.add_request("after", prompt, SamplingParams(temperature=0, max_tokens=12, structured_outputs=spec))
    e.add_request("before", prompt, SamplingParams(temperature=0, max_tokens=12,
                                                   structured_outputs={"choice": ["yes", "no"]}))
    done = run(e)
    out = done["after"].outputs[0]
    assert out.token_ids[:at + 1] == free[:at + 1]  # unmasked up to and including the marker
    assert tok.decode(out.token_ids[at + 1:], skip_special_tokens=True) in ("yes", "no")
    assert out.finish_reason == "stop"
    assert done["before"].outputs[0].text in ("yes", "no")  # without `after`, from the first token
    e.add_request("never", prompt, SamplingParams(temperature=0, max_tokens=6,
                                                  structured_outputs={"regex": "[0-9]+", "after": "\u2603\u2603"}))
    assert run(e)["never"].outputs[0].token_ids == free[:6]  # a marker never written: nothing is masked


@pytest.mark.parametrize("after", ["", 3, ["</think>"]])
def test_after_must_be_a_text(tiny_model_dirs, after):
    e = engine(tiny_model_dirs["llama"], None)
    with pytest.raises(ValueError, match="after"):
        e.add_request("r", [1, 2, 3], SamplingParams(structured_outputs={"regex": "[0-9]", "after": after}))
