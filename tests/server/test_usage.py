"""usage.prompt_tokens_details.cached_tokens (OpenAI's field; Responses' input_tokens_details): the prompt
tokens whose KV the prefix cache held, whole blocks of 16, in every route, streamed or not."""
from __future__ import annotations

import secrets


def _prompt() -> str:
    """A prompt no earlier test sent (the engine is shared), over 3 blocks of the tiny model's tokens."""
    return f"Session {secrets.token_hex(8)}: " + "the quick brown fox jumps over the lazy dog " * 8


def test_a_repeated_prompt_reports_its_cached_tokens(tiny):
    client, prompt = tiny.openai(), _prompt()
    kwargs = dict(model=tiny.model, max_tokens=2, temperature=0)
    first = client.completions.create(prompt=prompt, **kwargs).usage
    again = client.completions.create(prompt=prompt, **kwargs).usage
    assert first.prompt_tokens_details.cached_tokens == 0
    cached = again.prompt_tokens_details.cached_tokens
    assert cached % 16 == 0 and again.prompt_tokens - 16 < cached < again.prompt_tokens
    streamed = list(client.completions.create(prompt=[prompt, prompt], stream=True,
                                              stream_options={"include_usage": True}, **kwargs))[-1].usage
    assert streamed.prompt_tokens_details.cached_tokens == 2 * cached  # a sum over the request's prompts


def test_chat_and_responses_report_them_too(tiny):
    client, prompt = tiny.openai(), _prompt()
    ask = dict(model=tiny.model, messages=[{"role": "user", "content": prompt}], max_tokens=2, temperature=0)
    # the template's opening may be cached from earlier requests; the new message is not
    first = client.chat.completions.create(**ask).usage.prompt_tokens_details.cached_tokens
    usage = client.chat.completions.create(**ask).usage
    assert first < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **ask))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens_details.cached_tokens
    response = client.responses.create(model=tiny.model, input=prompt, max_output_tokens=2, temperature=0)
    assert response.usage.input_tokens == usage.prompt_tokens
    assert response.usage.input_tokens_details.cached_tokens == usage.prompt_tokens_details.cached_tokens
