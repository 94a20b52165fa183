"""The model's own tool calls under tool_choice "auto" (tool_parsers.py): hermes `<tool_call>` blocks and
Llama 3's JSON calls parsed into the message's tool_calls, streamed or not, the parser picked from the chat
template or named by the server. The tiny model's replies are held to a call's text by a choice constraint,
so the server sees exactly what a model that calls tools would write."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tandem.server.config import ServerConfig
from tandem.server.tool_parsers import HermesParser, Llama3JsonParser, MistralParser, PythonicParser, pick

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
ASK = [{"role": "user", "content": "Weather in Paris, and the time in UTC?"}]
# ChatML that shows the model its tools and the hermes call syntax
HERMES = ("{% if tools %}<|im_start|>system\nCall tools as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>:"
          "{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HERMES_REPLY = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>')
LLAMA3_REPLY = '{"name": "get_time", "parameters": {"zone": "UTC; or GMT"}}; {"name": "get_weather", "parameters": {}}'


def _names_and_args(calls) -> list[tuple[str, dict]]:
    assert all(c.type == "function" and c.id.startswith("chatcmpl-tool-") for c in calls)
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def streamed_calls(chunks) -> list[SimpleNamespace]:
    """The calls a stream's choice chunks carry, joined as a client joins them (each call's first piece has its
    index, id, type and name, later pieces its index and the next part of its arguments), with the chunks that
    brought each call's name (`named_at`) and the last piece of its arguments (`done_at`)."""
    calls: list[SimpleNamespace] = []
    for at, chunk in enumerate(chunks):
        for piece in chunk.delta.tool_calls or []:
            if piece.index == len(calls):
                assert piece.id and piece.type == "function" and piece.function.name, piece
                calls.append(SimpleNamespace(id=piece.id, type=piece.type, named_at=at, done_at=at,
                                             function=SimpleNamespace(name=piece.function.name, arguments="")))
            else:  # the id and name came once, in the call's first piece
                assert piece.index < len(calls) and piece.id is None and piece.function.name is None, piece
            if piece.function.arguments:
                calls[piece.index].function.arguments += piece.function.arguments
                calls[piece.index].done_at = at
    return calls


def _ask(server, reply: str, stream: bool = False, **kwargs):
    """A chat request whose reply is held to `reply`."""
    kwargs.setdefault("tools", TOOLS)
    extra = {"structured_outputs": {"choice": [reply]}, **kwargs.pop("extra_body", {})}
    return server.openai().chat.completions.create(model=server.model, messages=ASK, max_tokens=120, temperature=0,
                                                   stream=stream, extra_body=extra, **kwargs)


@pytest.mark.parametrize("text, content, calls", [
    (HERMES_REPLY, "Let me check. ", [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})]),
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("f", '{"a": 1}')]),
    ("No tools needed.", "No tools needed.", []),
    ('<tool_call>{"name": "f", "arguments": {"a": ', '<tool_call>{"name": "f", "arguments": {"a": ', []),  # cut
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    ('<tool_call>{"name": "f"}</tool_call>', '<tool_call>{"name": "f"}</tool_call>', []),  # no arguments
    ('<tool_call>{"name": "rm", "arguments": {}}</tool_call>', '<tool_call>{"name": "rm", "arguments": {}}</tool_call>',
     []),  # not one of the tools
])
def test_hermes_parse(text, content, calls):
    got_content, got = HermesParser({"get_weather", "get_time", "f"}).parse(text)
    assert got_content == content
    assert [(c["function"]["name"], c["function"]["arguments"] if isinstance(want, str) else
             json.loads(c["function"]["arguments"])) for c, (_, want) in zip(got, calls)] == calls


@pytest.mark.parametrize("text, calls", [
    (LLAMA3_REPLY, [("get_time", {"zone": "UTC; or GMT"}), ("get_weather", {})]),
    (' <|python_tag|>{"name": "f", "arguments": {"x": [1]}}', [("f", {"x": [1]})]),
    ('The answer is {"name": "f"}', []),
    ('{"name": "f", "parameters": {}} and then some text', []),
    ('{"name": "Bob", "age": 3}', []),  # JSON with a name is not a call
])
def test_llama3_json_parse(text, calls):
    content, got = Llama3JsonParser({"get_weather", "get_time", "f"}).parse(text)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert content == (None if calls else text)


def test_mistral_parse():
    parser = MistralParser({"get_weather", "get_time"})
    content, calls = parser.parse('Checking. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                                  '{"name": "get_time", "arguments": {}}]')
    assert content == "Checking. " and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in calls)  # as Mistral's templates want them back
    for text in ('[TOOL_CALLS]{"name": "get_time", "arguments": {}}', "[TOOL_CALLS][]", "[TOOL_CALLS][{\"name\"",
                 '[TOOL_CALLS][{"name": "rm", "arguments": {}}]', "Plain text."):
        assert parser.parse(text) == (text, [])
    assert parser.content_end("Checking. [TOOL_") == len("Checking. ")


def test_mistral_v11_and_v13_parse():
    """v11+ tokenizers write each call as [TOOL_CALLS]name[ARGS]{...}; v13 adds [CALL_ID]id, which is kept."""
    parser = MistralParser({"get_weather", "get_time"})
    content, calls = parser.parse('Checking. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}')
    assert content == "Checking. "
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in calls)
    _, calls = parser.parse('[TOOL_CALLS]get_weather[ARGS]{"q": "[TOOL_CALLS]x"} [TOOL_CALLS]get_time[ARGS]{}')
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"q": "[TOOL_CALLS]x"}, {}]  # a marker in a string
    _, (call,) = parser.parse('[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{"zone": "UTC"}')
    assert call["id"] == "a1b2c3d4e" and json.loads(call["function"]["arguments"]) == {"zone": "UTC"}
    for text in ('[TOOL_CALLS]rm[ARGS]{"path": "/"}', '[TOOL_CALLS]get_time[ARGS]{"zone": ', "[TOOL_CALLS]get_time",
                 '[TOOL_CALLS]get_time[ARGS]{} and more', '[TOOL_CALLS]get_time[ARGS]["UTC"]'):
        assert parser.parse(text) == (text, []), text


@pytest.mark.parametrize("text, calls", [
    ('[get_weather(city="Paris", days=3, units=None), get_time()]',
     [("get_weather", {"city": "Paris", "days": 3, "units": None}), ("get_time", {})]),
    ('<|python_start|>[get_time(zone="UTC", alts=["GMT", "Z"])]<|python_end|>', [("get_time", {"zone": "UTC", "alts": ["GMT", "Z"]})]),
    ('[get_weather(city=open("/etc/passwd"))]', None),  # only literals: nothing is evaluated
    ('[remove(path="/")]', None),  # not one of the tools
    ('[get_time("UTC")]', None),  # positional arguments name nothing
    ("Sure: [get_time()]", None),
    ("[get_time(]", None),
])
def test_pythonic_parse(text, calls):
    content, got = PythonicParser(["get_weather", "get_time"]).parse(text)
    if calls is None:
        assert (content, got) == (text, [])
    else:
        assert content is None and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert [PythonicParser(()).content_end(t) for t in ("", " [", "<|py", "Sure", "  Hello [")] == [0, 0, 0, 4, 9]


def test_streams_hold_back_only_what_may_be_a_call():
    hermes, llama3 = HermesParser(()), Llama3JsonParser(())
    assert hermes.content_end("Let me check. <tool") == len("Let me check. ")
    assert hermes.content_end("Let me check. <tool_call>{") == len("Let me check. ")
    assert hermes.content_end("a < b") == len("a < b")
    assert hermes.content_end("\n <tool") == hermes.content_end("\n ") == 0  # whitespace alone is no content yet
    assert [llama3.content_end(t) for t in ("", " {", "<|pyt", "Sure", "  Hello {")] == [0, 0, 0, 4, 9]


def test_a_special_marker_is_kept_in_the_text(tiny_model_dirs):
    """A tokenizer whose <tool_call> is a special token (Hermes 2 Pro's) would drop it from decoded text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    assert not HermesParser(()).strips_its_markers(tok) and not Llama3JsonParser(()).strips_its_markers(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    assert HermesParser(()).strips_its_markers(tok)


def test_the_template_picks_the_parser():
    assert pick("auto", HERMES).name == "hermes"
    assert pick("auto", "{{ '<|python_tag|>' }}").name == "llama3_json"
    assert pick("auto", "{{ '[AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS]' }}").name == "mistral"
    assert pick("auto", "{{ '<|python_start|>' }}").name == "pythonic"
    assert pick("auto", "{{ messages }}") is None and pick("none", HERMES) is None
    assert pick("llama3_json", HERMES).name == "llama3_json"
    with pytest.raises(ValueError, match="tool_call_parser must be one of"):
        ServerConfig(tool_call_parser="xlam")


@pytest.fixture(scope="module")
def hermes_server(tiny_engine, serve):
    return serve(tiny_engine, ServerConfig(chat_template=HERMES))


def test_hermes_calls_become_tool_calls(hermes_server):
    choice = _ask(hermes_server, HERMES_REPLY).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check. "
    assert _names_and_args(choice.message.tool_calls) == [("get_weather", {"city": "Paris"}),
                                                         ("get_time", {"zone": "UTC"})]
    auto = _ask(hermes_server, HERMES_REPLY, tool_choice="auto").choices[0]  # OpenAI's default, said aloud
    assert auto.finish_reason == "tool_calls" and len(auto.message.tool_calls) == 2


def test_hermes_calls_streamed(hermes_server):
    chunks = [c.choices[0] for c in _ask(hermes_server, HERMES_REPLY, stream=True, logprobs=True) if c.choices]
    text = "".join(c.delta.content or "" for c in chunks)
    assert text == "Let me check. "  # streamed as it came, never a piece of the calls
    calls = streamed_calls(chunks)
    assert _names_and_args(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})]
    assert chunks[-1].finish_reason == "tool_calls"
    tokens = "".join(t.token for c in chunks if c.logprobs for t in c.logprobs.content)
    assert tokens.startswith(HERMES_REPLY)  # every token's logprobs, the calls' among them (then EOS's)


@pytest.mark.parametrize("kwargs", [dict(tool_choice="none"), dict(tools=None)])
def test_replies_stay_text_when_no_call_is_allowed(hermes_server, kwargs):
    choice = _ask(hermes_server, HERMES_REPLY, **kwargs).choices[0]
    assert choice.finish_reason == "stop" and choice.message.content == HERMES_REPLY
    assert not choice.message.tool_calls


def test_the_request_template_or_the_server_setting_decides(tiny, tiny_engine, serve):
    plain = _ask(tiny, HERMES_REPLY).choices[0]  # the tokenizer's template shows no tools: text
    assert plain.message.content == HERMES_REPLY and not plain.message.tool_calls
    own = _ask(tiny, HERMES_REPLY, extra_body={"chat_template": HERMES}).choices[0]
    assert len(own.message.tool_calls) == 2
    off = serve(tiny_engine, ServerConfig(chat_template=HERMES, tool_call_parser="none"))
    assert _ask(off, HERMES_REPLY).choices[0].message.content == HERMES_REPLY


def test_llama3_json_calls(tiny_engine, serve):
    server = serve(tiny_engine, ServerConfig(tool_call_parser="llama3_json"))
    choice = _ask(server, LLAMA3_REPLY).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert _names_and_args(choice.message.tool_calls) == [("get_time", {"zone": "UTC; or GMT"}), ("get_weather", {})]
    chunks = [c.choices[0] for c in _ask(server, LLAMA3_REPLY, stream=True) if c.choices]
    assert not "".join(c.delta.content or "" for c in chunks)
    assert [(c.function.name, c.function.arguments) for c in streamed_calls(chunks)] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert chunks[-1].finish_reason == "tool_calls"
    text = _ask(server, "Paris is sunny today.").choices[0]
    assert text.message.content == "Paris is sunny today." and not text.message.tool_calls


def test_mistral_calls(tiny_engine, serve):
    server = serve(tiny_engine, ServerConfig(tool_call_parser="mistral"))
    reply = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    choice = _ask(server, reply).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert _names_and_args_any_id(choice.message.tool_calls) == [("get_weather", {"city": "Paris"})]
    v11 = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'  # Mistral Small 3.1+, Devstral, Magistral
    chunks = [c.choices[0] for c in _ask(server, v11, stream=True) if c.choices]
    assert not "".join(c.delta.content or "" for c in chunks) and chunks[-1].finish_reason == "tool_calls"
    assert _names_and_args_any_id(streamed_calls(chunks)) == [("get_weather", {"city": "Paris"})]


def _names_and_args_any_id(calls) -> list[tuple[str, dict]]:
    assert all(c.type == "function" and len(c.id) == 9 for c in calls)
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def test_pythonic_calls(tiny_engine, serve):
    server = serve(tiny_engine, ServerConfig(tool_call_parser="pythonic"))
    reply = '[get_weather(city="Paris"), get_time(zone="UTC")]'
    choice = _ask(server, reply).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert _names_and_args(choice.message.tool_calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})]
    chunks = [c.choices[0] for c in _ask(server, reply, stream=True) if c.choices]
    assert not "".join(c.delta.content or "" for c in chunks)
    assert _names_and_args(streamed_calls(chunks)) == _names_and_args(choice.message.tool_calls)
    assert chunks[-1].finish_reason == "tool_calls"
