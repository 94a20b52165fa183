"""/v1/completions through the official openai client (sync and async) against a live server."""
from __future__ import annotations

import asyncio

import openai
import pytest

GREEDY = dict(temperature=0, max_tokens=8, extra_body={"ignore_eos": True})


def _stream_text(stream) -> tuple[dict[int, str], dict[int, str], list]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    chunks = list(stream)
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    return texts, reasons, chunks


def test_prompt_forms_and_usage(tiny):
    client = tiny.openai()
    tok = tiny.client.tokenizer
    text = "The quick brown fox"
    ids = tok.encode(text)
    single = client.completions.create(model=tiny.model, prompt=text, **GREEDY)
    assert single.object == "text_completion" and single.model == tiny.model and single.id.startswith("cmpl-")
    assert len(single.choices) == 1 and single.choices[0].finish_reason == "length"
    assert single.usage.prompt_tokens == len(ids)
    assert single.usage.completion_tokens == 8 and single.usage.total_tokens == len(ids) + 8
    # the same prompt as token ids gives the same greedy text
    by_ids = client.completions.create(model=tiny.model, prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == single.choices[0].text
    many = client.completions.create(model=tiny.model, prompt=[text, "Hello"], **GREEDY)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == single.choices[0].text
    assert many.usage.prompt_tokens == len(ids) + len(tok.encode("Hello"))
    assert many.usage.completion_tokens == 16
    many_ids = client.completions.create(model=tiny.model, prompt=[ids, tok.encode("Hello")], **GREEDY)
    assert [c.text for c in many_ids.choices] == [c.text for c in many.choices]


def test_n_seed_and_sampling_extras(tiny):
    client = tiny.openai()
    kw = dict(model=tiny.model, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=7,
              extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True})
    a = client.completions.create(n=3, **kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert a.usage.completion_tokens == 36
    b = client.completions.create(n=3, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices], "a seeded request must repeat"
    c = client.completions.create(n=3, **{**kw, "seed": 8})
    assert [x.text for x in c.choices] != [x.text for x in a.choices]
    # several prompts with n: choice index = prompt index * n + sample index
    d = client.completions.create(model=tiny.model, prompt=["a", "b"], n=2, **GREEDY)
    assert sorted(x.index for x in d.choices) == [0, 1, 2, 3]


def test_logprobs_and_echo(tiny):
    client = tiny.openai()
    prompt = "Paris is the capital of"
    n_prompt = len(tiny.client.tokenizer.encode(prompt))
    r = client.completions.create(model=tiny.model, prompt=prompt, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    if "\ufffd" not in "".join(lp.tokens):  # a character split over tokens shows per token as U+FFFD
        assert "".join(lp.tokens) == r.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(chosen, abs=1e-4), "greedy picks the most likely token"
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    e = client.completions.create(model=tiny.model, prompt=prompt, echo=True, logprobs=1, **GREEDY)
    assert e.choices[0].text == prompt + r.choices[0].text
    elp = e.choices[0].logprobs
    assert len(elp.tokens) == n_prompt + 8
    assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None  # nothing predicts token 0
    assert all(v is not None for v in elp.token_logprobs[1:])
    assert elp.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-4)
    echo_only = client.completions.create(model=tiny.model, prompt=prompt, echo=True, **GREEDY)
    assert echo_only.choices[0].text == prompt + r.choices[0].text and echo_only.choices[0].logprobs is None


def test_stop_strings_tokens_and_extras(tiny):
    client = tiny.openai()
    base = client.completions.create(model=tiny.model, prompt="Numbers:", temperature=0, max_tokens=40,
                                     extra_body={"ignore_eos": True}).choices[0]
    stop = base.text[12:15]
    cut = base.text.find(stop)
    r = client.completions.create(model=tiny.model, prompt="Numbers:", temperature=0, max_tokens=40, stop=[stop],
                                  extra_body={"ignore_eos": True}).choices[0]
    assert r.finish_reason == "stop" and r.text == base.text[:cut]
    assert r.model_extra["stop_reason"] == stop
    inc = client.completions.create(model=tiny.model, prompt="Numbers:", temperature=0, max_tokens=40, stop=stop,
                                    extra_body={"ignore_eos": True, "include_stop_str_in_output": True}).choices[0]
    assert inc.text == base.text[:cut + len(stop)]
    # stop_token_ids: with every id a stop token, the first sampled token stops (text without it,
    # unless include_stop_str_in_output)
    every = list(range(len(tiny.client.tokenizer)))
    for include in (False, True):
        st = client.completions.create(model=tiny.model, prompt="Numbers:", temperature=0, max_tokens=40,
                                       extra_body={"ignore_eos": True, "stop_token_ids": every,
                                                   "include_stop_str_in_output": include})
        assert st.choices[0].finish_reason == "stop" and st.usage.completion_tokens == 1
        assert isinstance(st.choices[0].model_extra["stop_reason"], int)
        assert base.text.startswith(st.choices[0].text) if include else st.choices[0].text == ""
    # min_tokens with max_tokens: exactly that many tokens; priority and request_id are accepted
    m = client.completions.create(model=tiny.model, prompt="Numbers:", temperature=0, max_tokens=5,
                                  extra_body={"min_tokens": 5, "priority": 3, "request_id": "my-id-1"})
    assert m.usage.completion_tokens == 5 and m.id == "cmpl-my-id-1"


def test_streaming_reassembles_to_full_text(smol):
    client = smol.openai()
    kw = dict(model=smol.model, prompt="The three primary colors are", temperature=0, max_tokens=24)
    full = client.completions.create(**kw)
    texts, reasons, chunks = _stream_text(client.completions.create(stream=True, **kw))
    assert texts[0] == full.choices[0].text and reasons[0] == full.choices[0].finish_reason
    assert len(chunks) > 3, "tokens should arrive as separate chunks"
    # with usage and stop strings that must never leak into the stream
    stop = full.choices[0].text[10:14]
    full_stop = client.completions.create(stop=[stop, "zzz-never"], **kw)
    assert full_stop.choices[0].finish_reason == "stop"
    texts, reasons, chunks = _stream_text(client.completions.create(
        stream=True, stop=[stop, "zzz-never"], stream_options={"include_usage": True}, **kw))
    assert texts[0] == full_stop.choices[0].text and reasons[0] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full_stop.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full_stop.usage.prompt_tokens


def test_streaming_stop_holdback_on_noise(tiny):
    """Random-weight text (odd bytes, multi-token characters): stop strings at many positions."""
    client = tiny.openai()
    kw = dict(model=tiny.model, prompt="xyz", temperature=0, max_tokens=60, extra_body={"ignore_eos": True})
    base = client.completions.create(**kw).choices[0].text
    for start in (3, 17, 31):
        stop = base[start:start + 4]
        full = client.completions.create(stop=stop, **kw).choices[0]
        texts, reasons, _ = _stream_text(client.completions.create(stream=True, stop=stop, **kw))
        assert texts[0] == full.text == base[:base.find(stop)]
        assert reasons[0] == full.finish_reason == "stop"


def test_streaming_n_echo_logprobs(tiny):
    client = tiny.openai()
    kw = dict(model=tiny.model, prompt=["Hi", "Yo"], temperature=0, max_tokens=6, n=2, logprobs=2, echo=True,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    texts, reasons, chunks = _stream_text(client.completions.create(stream=True, **kw))
    assert texts == {c.index: c.text for c in full.choices}
    assert set(reasons.values()) == {"length"} and len(reasons) == 4
    tokens: dict[int, list[str]] = {}
    for c in chunks:
        for ch in c.choices:
            if ch.logprobs:
                tokens.setdefault(ch.index, []).extend(ch.logprobs.tokens)
    assert tokens == {c.index: c.logprobs.tokens for c in full.choices}


def test_suffix_is_refused(tiny):
    with pytest.raises(openai.BadRequestError) as e:
        tiny.openai().completions.create(model=tiny.model, prompt="a", suffix="b", max_tokens=2)
    assert "suffix" in e.value.body["message"] and e.value.body["param"] == "suffix"


def test_async_client(tiny):
    async def run():
        client = tiny.async_openai()
        full = await client.completions.create(model=tiny.model, prompt="Async", **GREEDY)
        text = ""
        async for chunk in await client.completions.create(model=tiny.model, prompt="Async", stream=True, **GREEDY):
            text += "".join(c.text for c in chunk.choices)
        await client.close()
        return full.choices[0].text, text

    full, streamed = asyncio.run(run())
    assert full == streamed and full
