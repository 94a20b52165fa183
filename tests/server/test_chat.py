"""/v1/chat/completions: templates, roles, content parts, streaming, logprobs, vLLM's extras."""
from __future__ import annotations

import asyncio

import openai
import pytest

from tandem.server.config import ServerConfig
from tandem.server.serving_chat import content_format

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name one primary color."}]
NOISE = dict(temperature=0, max_tokens=6, extra_body={"ignore_eos": True})


def _tokenize(server, **body) -> list[int]:
    r = server.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _detok(server, ids: list[int]) -> str:
    return server.post("/detokenize", json={"tokens": ids}).json()["prompt"]


def test_chat_real_text_and_usage(smol):
    r = smol.openai().chat.completions.create(model=smol.model, messages=CHAT, temperature=0, max_tokens=24)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == smol.model
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    prompt_ids = _tokenize(smol, messages=CHAT)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert _detok(smol, prompt_ids).endswith("<|im_start|>assistant\n")


def test_streaming_reassembles_with_role_and_usage(smol):
    client = smol.openai()
    kw = dict(model=smol.model, messages=CHAT, temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert text == full.choices[0].message.content
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_skip_special_tokens_on_a_stop_token(smol):
    """The end-of-turn token, made a stop token and kept in the output, shows as text only when
    skip_special_tokens is false."""
    eos = smol.client.tokenizer.convert_tokens_to_ids("<|im_end|>")
    texts = {}
    for skip in (True, False):
        r = smol.openai().chat.completions.create(
            model=smol.model, messages=[{"role": "user", "content": "Say hi."}], temperature=0, max_tokens=48,
            extra_body={"ignore_eos": True, "stop_token_ids": [eos], "include_stop_str_in_output": True,
                        "skip_special_tokens": skip})
        assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == eos
        texts[skip] = r.choices[0].message.content
    assert texts[False] == texts[True] + "<|im_end|>"


def test_content_parts_equal_strings_and_roles(tiny):
    client = tiny.openai()
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
             {"role": "user", "content": [{"type": "text", "text": "Name one primary"},
                                          {"type": "text", "text": "color."}]}]
    as_text = [CHAT[0], {"role": "user", "content": "Name one primary\ncolor."}]
    a = client.chat.completions.create(model=tiny.model, messages=parts, **NOISE)
    b = client.chat.completions.create(model=tiny.model, messages=as_text, **NOISE)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    convo = CHAT + [{"role": "assistant", "content": "Red."},
                    {"role": "tool", "content": "42", "tool_call_id": "call_1"},
                    {"role": "user", "content": "And another?"}]
    r = client.chat.completions.create(model=tiny.model, messages=convo, **NOISE)
    assert r.usage.completion_tokens == 6
    text = _detok(tiny, _tokenize(tiny, messages=convo))
    for role in ("system", "user", "assistant", "tool"):
        assert f"<|im_start|>{role}\n" in text
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=tiny.model, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert "image_url" in e.value.body["message"]


def test_generation_prompt_and_continue_final_message(tiny):
    client = tiny.openai()
    with_prompt = _tokenize(tiny, messages=CHAT)
    without = _tokenize(tiny, messages=CHAT, add_generation_prompt=False)
    assert with_prompt[:len(without)] == without and len(with_prompt) > len(without)
    r = client.chat.completions.create(model=tiny.model, messages=CHAT, **{
        **NOISE, "extra_body": {"ignore_eos": True, "add_generation_prompt": False}})
    assert r.usage.prompt_tokens == len(without)
    partial = CHAT + [{"role": "assistant", "content": "The color"}]
    ids = _tokenize(tiny, messages=partial, continue_final_message=True, add_generation_prompt=False)
    assert _detok(tiny, ids).endswith("<|im_start|>assistant\nThe color")
    chat = client.chat.completions.create(model=tiny.model, messages=partial, **{**NOISE, "extra_body": {
        "ignore_eos": True, "continue_final_message": True, "add_generation_prompt": False}})
    completion = client.completions.create(model=tiny.model, prompt=ids, **NOISE)
    assert chat.choices[0].message.content == completion.choices[0].text
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=tiny.model, messages=partial, max_tokens=2,
                                       extra_body={"continue_final_message": True})
    assert "add_generation_prompt" in e.value.body["message"]


def test_request_chat_template_and_kwargs(tiny):
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}{{ reply_prefix }}{% endif %}")
    kwargs = {"reply_prefix": "ANSWER:"}
    ids = _tokenize(tiny, messages=CHAT, chat_template=template, chat_template_kwargs=kwargs)
    assert _detok(tiny, ids) == "[system] You are terse.\n[user] Name one primary color.\nANSWER:"
    r = tiny.openai().chat.completions.create(model=tiny.model, messages=CHAT, **{**NOISE, "extra_body": {
        "ignore_eos": True, "chat_template": template, "chat_template_kwargs": kwargs}})
    assert r.usage.prompt_tokens == len(ids)
    for bad, field in (({"tokenize": True}, "tokenize"), ({"add_generation_prompt": False}, "add_generation_prompt")):
        with pytest.raises(openai.BadRequestError) as e:
            tiny.openai().chat.completions.create(model=tiny.model, messages=CHAT, max_tokens=2,
                                                  extra_body={"chat_template_kwargs": bad})
        assert field in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        tiny.openai().chat.completions.create(model=tiny.model, messages=CHAT, max_tokens=2,
                                              extra_body={"chat_template": "{% for %}"})
    assert "chat template" in e.value.body["message"]


def test_logprobs_and_top_logprobs(tiny):
    client = tiny.openai()
    r = client.chat.completions.create(model=tiny.model, messages=CHAT, logprobs=True, top_logprobs=3, **NOISE)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)  # greedy
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
        assert entry.bytes == list(entry.token.encode("utf-8", errors="replace"))
    plain = client.chat.completions.create(model=tiny.model, messages=CHAT, logprobs=True, **NOISE)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    none = client.chat.completions.create(model=tiny.model, messages=CHAT, **NOISE)
    assert none.choices[0].logprobs is None
    streamed = [e for c in client.chat.completions.create(model=tiny.model, messages=CHAT, logprobs=True,
                                                          top_logprobs=3, stream=True, **NOISE)
                for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=tiny.model, messages=CHAT, top_logprobs=2, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=tiny.model, messages=CHAT, logprobs=True, top_logprobs=21, max_tokens=2)


def test_n_streams_and_async(tiny):
    async def run():
        client = tiny.async_openai()
        kw = dict(model=tiny.model, messages=CHAT, n=3, temperature=0.9, seed=11, max_tokens=8,
                  extra_body={"ignore_eos": True})
        full = await client.chat.completions.create(**kw)
        texts: dict[int, str] = {}
        async for chunk in await client.chat.completions.create(stream=True, **kw):
            for ch in chunk.choices:
                texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
        await client.close()
        return full, texts

    full, texts = asyncio.run(run())
    assert full.usage.completion_tokens == 24
    assert texts == {c.index: c.message.content for c in full.choices}  # seeded: same samples


def test_server_template_role_and_openai_content_format(tiny_engine, serve):
    template = ("{% for m in messages %}{{ m['role'] }}:{% for part in m['content'] %}<{{ part['text'] }}>"
                "{% endfor %}{{ '\\n' }}{% endfor %}")
    assert content_format(template, "auto") == "openai"
    assert content_format(tiny_engine.tokenizer.chat_template, "auto") == "string"
    server = serve(tiny_engine, ServerConfig(chat_template=template, response_role="bot"))
    ids = _tokenize(server, messages=[{"role": "user", "content": "hi"},
                                      {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                   {"type": "text", "text": "b"}]}])
    assert _detok(server, ids) == "user:<hi>\nuser:<a><b>\n"
    r = server.openai().chat.completions.create(model=server.model, messages=CHAT, **NOISE)
    assert r.choices[0].message.role == "bot"
