"""Structured outputs through the OpenAI API on the embedded SmolLM2: OpenAI's response_format (JSON
schema, any JSON object), vLLM's structured_outputs and guided_* fields (regex, choice, grammar), in
chat and completions, streamed or not, sampled and n > 1. Every output is checked against its constraint."""
from __future__ import annotations

import asyncio
import json
import re

import jsonschema

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pet"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
                         "pet": {"enum": ["cat", "dog", "none"]}}}
ASK = [{"role": "user", "content": "Describe a made-up person as JSON with a name, an age and a pet."}]


def test_json_schema_in_chat_sampled_and_n_2(smol):
    r = smol.openai().chat.completions.create(
        model=smol.model, messages=ASK, max_tokens=80, temperature=0.9, seed=3, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert len(r.choices) == 2
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_any_json_object_streamed(smol):
    stream = smol.openai().chat.completions.create(model=smol.model, messages=ASK, max_tokens=80, temperature=0,
                                                   stream=True, response_format={"type": "json_object"})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)
    # an object, as OpenAI promises, never a bare array or value, whatever the model leans to
    r = smol.openai().completions.create(model=smol.model, prompt="A JSON list of three numbers:", max_tokens=40,
                                         temperature=1.0, seed=2, n=4, extra_body={"response_format": {"type": "json_object"}})
    for choice in r.choices:
        assert choice.text.lstrip().startswith("{"), choice.text


def test_regex_choice_and_grammar_in_completions(smol):
    client = smol.openai()
    prompt = "A product code, then a colour, then an answer:"
    r = client.completions.create(model=smol.model, prompt=prompt, max_tokens=20, temperature=1.0, seed=5, n=3,
                                  extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}})
    assert all(re.fullmatch("[A-Z]{2}-[0-9]{3}", c.text) for c in r.choices), [c.text for c in r.choices]
    r = client.completions.create(model=smol.model, prompt=prompt, max_tokens=10, temperature=0,
                                  extra_body={"guided_choice": ["crimson", "teal", "ochre"]})
    assert r.choices[0].text in ("crimson", "teal", "ochre") and r.choices[0].finish_reason == "stop"
    grammar = 'root ::= "answer: " ("yes" | "no") "."'
    stream = client.completions.create(model=smol.model, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                       extra_body={"structured_outputs": {"grammar": grammar}})
    assert "".join(c.choices[0].text for c in stream) in ("answer: yes.", "answer: no.")


def test_unconstrained_requests_beside_constrained_ones_are_untouched(smol):
    """Requests at once share batches: a constrained row's mask reaches no other row."""
    plain = dict(model=smol.model, prompt="The capital of France is", max_tokens=12, temperature=0)
    alone = smol.openai().completions.create(**plain).choices[0].text

    async def together():
        client = smol.async_openai()
        return await asyncio.gather(
            client.completions.create(**plain),
            client.completions.create(model=smol.model, prompt="The capital of France is", max_tokens=12,
                                      temperature=0, extra_body={"guided_choice": ["up", "down"]}),
            client.completions.create(**plain))

    first, constrained, last = asyncio.run(together())
    assert constrained.choices[0].text in ("up", "down")
    assert first.choices[0].text == last.choices[0].text == alone != constrained.choices[0].text
