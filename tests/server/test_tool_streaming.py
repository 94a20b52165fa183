"""Tool calls streamed as they grow (call_stream.CallStream): a call's id and name in the first chunk that can
tell its name, its arguments in the first chunk that makes them whole, the pieces joining to the non-streamed
arguments. First each parser's `begun` over every prefix of replies, then real streams through the client."""
from __future__ import annotations

import json
import random

import pytest

from tandem.server.config import ServerConfig
from tandem.server.tool_choice import ForcedCalls
from tandem.server.call_stream import CallStream
from tandem.server.tool_parsers import HermesParser, Llama3JsonParser, MistralParser, PythonicParser
from tests.server import test_tool_choice as forced
from tests.server.test_tool_parsers import HERMES, HERMES_REPLY, LLAMA3_REPLY, TOOLS, _ask, streamed_calls

NAMES = {"get_weather", "get_time"}
REPLIES = [
    (HermesParser(NAMES), HERMES_REPLY),
    (HermesParser(NAMES), '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\":  \\"UTC\\"}"}</tool_call>'),
    (HermesParser(NAMES), '<tool_call>{"arguments": {"city": "Paris"}, "name": "get_weather"}'),  # name last, unclosed
    (Llama3JsonParser(NAMES), LLAMA3_REPLY),
    (Llama3JsonParser(NAMES), '<|python_tag|>{"name":"get_time","parameters":{"n":1.50,"e":1e2, "s":"\\u00e9"}}'),
    (MistralParser(NAMES), '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}},{"name": "get_time", '
                           '"arguments": {}}]'),
    (MistralParser(NAMES), 'So: [TOOL_CALLS]get_weather[ARGS]{"q": "[TOOL_CALLS]x"}[TOOL_CALLS]get_time[CALL_ID]'
                           'a1b2c3d4e[ARGS]{"zone": "UTC"}'),
    (PythonicParser(NAMES), '[get_weather(city="Paris)", days=(3), alts=["a,b", {"k": (1, 2)}]), get_time()]'),
    (PythonicParser(NAMES), '<|python_start|>[get_time(zone="UTC" )]<|python_end|>'),
    (ForcedCalls({"type": "function", "function": {"name": "get_time"}}), ' {"zone": "UTC", "offset": 12}'),
    (ForcedCalls("required"), '[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
                              '{"name": "get_time", "parameters": {"zone": "UTC"}}]'),
]


def _stream(parser, text: str, cuts: list[int]) -> tuple[list[tuple[int | None, dict]], list[dict] | None]:
    """CallStream over `text` read up to each of `cuts`, then finished: (cut, delta) pairs (None: the finish's)
    and the calls it ended with (None: the reply did not parse)."""
    stream, deltas = CallStream(parser), []
    for n in cuts:
        deltas += [(n, d) for d in stream.update(text[:n])]
    content, calls = parser.parse(text)
    last = stream.finish(calls) if calls else None
    deltas += [(None, d) for d in last or []]
    return deltas, (stream.final if last is not None else None)


def _joined(deltas) -> list[dict]:
    calls: list[dict] = []
    for _, d in deltas:
        if d["index"] == len(calls):
            calls.append({"id": d["id"], "type": d["type"], "function": dict(d["function"])})
        else:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
            calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
    return calls


@pytest.mark.parametrize("parser, text", REPLIES)
def test_every_prefix_begins_the_parsed_calls(parser, text):
    """What `begun` shows of any prefix is a beginning of what the whole reply parses to: the same names, the
    start of each arguments string; pieces join to the parsed calls, whole ones as soon as they close."""
    _, calls = parser.parse(text)
    assert calls, text
    deltas, final = _stream(parser, text, list(range(len(text) + 1)))
    assert _joined(deltas) == final
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in final] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls]
    for n in range(len(text) + 1):
        for got, want in zip(parser.begun(text[:n]), calls):
            assert got.name == want["function"]["name"] and want["function"]["arguments"].startswith(got.arguments)
    assert all(at is not None for at, _ in deltas)  # each call went out whole once its text closed it


def test_names_go_out_before_their_arguments_and_model_ids_are_kept():
    deltas, final = _stream(HermesParser(NAMES), HERMES_REPLY, list(range(len(HERMES_REPLY) + 1)))
    at = [n for n, _ in deltas]
    assert at == [HERMES_REPLY.index('"get_weather"') + 13, HERMES_REPLY.index('}}') + 2,
                  HERMES_REPLY.index('"get_time"') + 10, HERMES_REPLY.rindex('}}') + 2]
    assert [d["function"] for _, d in deltas[::2]] == [{"name": "get_weather", "arguments": ""},
                                                       {"name": "get_time", "arguments": ""}]
    mistral = 'x[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{"zone": "UTC"}'
    deltas, final = _stream(MistralParser(NAMES), mistral, list(range(len(mistral) + 1)))
    assert deltas[0][0] == mistral.index("{") + 1 and final[0]["id"] == "a1b2c3d4e"
    assert len(deltas[0][1]["id"]) == 9
    named = ForcedCalls({"type": "function", "function": {"name": "get_time"}})
    assert [(c.name, c.arguments) for c in named.begun("")] == [("get_time", "")]  # named before the first token
    assert [(c.name, c.arguments) for c in named.begun('{"offset": 12')] == [("get_time", "")]
    assert [(c.name, c.arguments) for c in named.begun('12')] == [("get_time", "")]  # a number may still grow


@pytest.mark.parametrize("parser, text", [
    (HermesParser(NAMES), '<tool_call>{"name": "get_weather", "arguments": {"city": "Par'),  # cut
    (HermesParser(NAMES), '<tool_call>{"name": "get_weather", "arguments": {}} junk</tool_call>'),
    (HermesParser(NAMES), '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "rm", '
                          '"arguments": {}}</tool_call>'),  # the second is not a tool: the whole reply is text
    (Llama3JsonParser(NAMES), '{"name": "get_time", "parameters": {}}; and then some'),
    (MistralParser(NAMES), '[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"} and more'),
    (PythonicParser(NAMES), '[get_time(zone="UTC"), get_weather(city=open("x"))]'),
    (ForcedCalls("required"), '[{"name": "get_weather", "parameters": {"city": "Pa'),
])
def test_a_reply_that_does_not_parse_ends_as_text(parser, text):
    """Its calls may have begun; finish says they did not end (the stream then sends the rest as content)."""
    assert parser.parse(text) == (text, [])
    deltas, final = _stream(parser, text, list(range(len(text) + 1)))
    assert final is None and deltas  # something had begun: the name at least


def test_begun_never_fails_and_stays_a_beginning_on_mangled_replies():
    """Random drops and insertions into the replies: begun never raises, and whenever the mangled reply
    parses, what any prefix showed begins its calls."""
    rng, parsed = random.Random(7), 0
    for _ in range(400):
        parser, text = rng.choice(REPLIES)
        chars = list(text)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(chars))
            if rng.random() < 0.5:
                del chars[at]
            else:
                chars.insert(at, rng.choice('{}[]()",:; \\a1'))
        mangled = "".join(chars)
        deltas, final = _stream(parser, mangled, list(range(len(mangled) + 1)))
        _, calls = parser.parse(mangled)
        if calls:
            parsed += 1
            assert final is not None and _joined(deltas) == final, mangled
            assert [c["function"]["arguments"] for c in final] == [c["function"]["arguments"] for c in calls]
    assert parsed > 20  # the mangling left enough replies that parse


# ---- through the server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hermes_server(tiny_engine, serve):
    return serve(tiny_engine, ServerConfig(chat_template=HERMES))


def _text_by_chunk(chunks) -> list[str]:
    """The reply's text as far as each chunk had it (its tokens' logprobs, one entry a token)."""
    out, text = [], ""
    for c in chunks:
        text += "".join(t.token for t in (c.logprobs.content if c.logprobs else []))
        out.append(text)
    return out


def test_calls_stream_as_they_grow(hermes_server):
    """Each call's name goes out in the chunk that completes it, its arguments in the chunk that closes them,
    the pieces join to the non-streamed reply's calls, and the content is what it was."""
    whole = _ask(hermes_server, HERMES_REPLY).choices[0]
    chunks = [c.choices[0] for c in _ask(hermes_server, HERMES_REPLY, stream=True, logprobs=True) if c.choices]
    texts = _text_by_chunk(chunks)
    calls = streamed_calls(chunks)
    assert [(c.type, c.function.name, c.function.arguments) for c in calls] == [
        (c.type, c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("chatcmpl-tool-") for c in calls)
    for call, name_end, args_end in zip(calls, ['"get_weather"', '"get_time"'], ['"Paris"}}', '"UTC"}}']):
        assert call.named_at == next(k for k, t in enumerate(texts) if name_end in t)
        assert call.done_at == next(k for k, t in enumerate(texts) if args_end in t)
        assert call.named_at < call.done_at  # the model wrote this call over several chunks
    assert calls[0].done_at < calls[1].named_at < len(chunks) - 1  # the first call was whole before the second began
    assert "".join(c.delta.content or "" for c in chunks) == whole.message.content == "Let me check. "
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["tool_calls"]


def test_stop_strings_still_hold_back_the_arguments(hermes_server):
    """A stop string that may be starting inside a call holds its arguments back until it cannot."""
    stop = '"Paris"}}\n</tool_call>\nNO'  # the reply has all of it but the last two letters
    whole = _ask(hermes_server, HERMES_REPLY, stop=[stop]).choices[0]
    chunks = [c.choices[0] for c in _ask(hermes_server, HERMES_REPLY, stream=True, logprobs=True, stop=[stop])
              if c.choices]
    calls = streamed_calls(chunks)
    assert [c.function.arguments for c in calls] == [c.function.arguments for c in whole.message.tool_calls]
    texts = _text_by_chunk(chunks)
    assert calls[0].done_at == next(k for k, t in enumerate(texts) if '"Paris"}}\n</tool_call>\n<' in t)


def test_a_call_cut_by_max_tokens_ends_as_the_non_streamed_text(hermes_server):
    """The call began (its name went out), then max_tokens cut it: the reply does not parse, so as in the
    non-streamed reply all of its text is content, and the finish reason is "length". Whether the name went out
    first depends on timing: under load the engine's last steps reach the stream as one update, and a call
    that begins in the update that ends the reply is never sent (CallStream's prefixes are tested alone)."""
    chunks = [c.choices[0] for c in _ask(hermes_server, HERMES_REPLY, stream=True, logprobs=True) if c.choices]
    tokens = [t.token for c in chunks if c.logprobs for t in c.logprobs.content]
    named = next(n for n in range(len(tokens)) if '"get_weather"' in "".join(tokens[:n]))
    assert '"Paris"}}' not in "".join(tokens[:named + 2])
    kwargs = dict(max_completion_tokens=named + 2)  # over _ask's max_tokens
    whole = _ask(hermes_server, HERMES_REPLY, **kwargs).choices[0]
    assert whole.finish_reason == "length" and not whole.message.tool_calls
    chunks = [c.choices[0] for c in _ask(hermes_server, HERMES_REPLY, stream=True, **kwargs) if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == whole.message.content
    assert [c.function.name for c in streamed_calls(chunks)] in ([], ["get_weather"])  # it had begun
    assert chunks[-1].finish_reason == "length"


def test_n_choices_stream_their_own_calls(hermes_server):
    chunks = [c.choices[0] for c in _ask(hermes_server, HERMES_REPLY, stream=True, n=2)]
    for i in range(2):
        calls = streamed_calls([c for c in chunks if c.index == i])
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})]


def test_responses_stream_function_calls_as_they_grow(hermes_server):
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": {"type": "object"}} for t in TOOLS]
    kwargs = dict(model=hermes_server.model, input="Weather in Paris, and the time in UTC?", tools=tools,
                  max_output_tokens=120, temperature=0, extra_body={"structured_outputs": {"choice": [HERMES_REPLY]}})
    whole = hermes_server.openai().responses.create(**kwargs)
    events = list(hermes_server.openai().responses.create(stream=True, **kwargs))
    final = events[-1].response
    assert events[-1].type == "response.completed"
    strip = lambda items: [{k: v for k, v in i.model_dump().items() if k not in ("id", "call_id")} for i in items]
    assert strip(final.output) == strip(whole.output)  # the streamed response is the non-streamed one
    at = {}
    for index, item in enumerate(final.output[1:], start=1):
        mine = [e for e in events if getattr(e, "output_index", None) == index]
        assert [e.type for e in mine] == ["response.output_item.added", "response.function_call_arguments.delta",
                                          "response.function_call_arguments.done", "response.output_item.done"]
        assert (mine[0].item.name, mine[0].item.arguments, mine[0].item.status) == (item.name, "", "in_progress")
        assert mine[1].delta == mine[2].arguments == item.arguments and mine[3].item.call_id == item.call_id
        at[index] = [events.index(e) for e in mine]
    assert at[1][1] < at[2][0]  # the first call's arguments went out before the second call began


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_calls_stream_as_they_grow(smol, tool_choice):
    """A forced call's name goes out before its arguments are whole (a named function's with the first token),
    and the streamed calls are the non-streamed ones."""
    kwargs = dict(model=smol.model, messages=forced.ASK, tools=forced.TOOLS, tool_choice=tool_choice, max_tokens=120,
                  temperature=0)
    whole = smol.openai().chat.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in smol.openai().chat.completions.create(stream=True, **kwargs) if c.choices]
    calls = streamed_calls(chunks)
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert all(c.named_at < c.done_at for c in calls) and chunks[-1].finish_reason == "tool_calls"
    if isinstance(tool_choice, dict):
        assert calls[0].named_at == 1  # the first chunk after the role's


def test_a_responses_call_cut_by_max_output_tokens_ends_as_the_non_streamed_response(hermes_server):
    chunks = [c.choices[0] for c in _ask(hermes_server, HERMES_REPLY, stream=True, logprobs=True) if c.choices]
    tokens = [t.token for c in chunks if c.logprobs for t in c.logprobs.content]
    named = next(n for n in range(len(tokens)) if '"get_weather"' in "".join(tokens[:n]))
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": {"type": "object"}} for t in TOOLS]
    kwargs = dict(model=hermes_server.model, input="Weather in Paris, and the time in UTC?", tools=tools,
                  max_output_tokens=named + 2, temperature=0,
                  extra_body={"structured_outputs": {"choice": [HERMES_REPLY]}})
    whole = hermes_server.openai().responses.create(**kwargs)
    events = list(hermes_server.openai().responses.create(stream=True, **kwargs))
    assert whole.status == events[-1].response.status == "incomplete"
    assert [i.type for i in whole.output] == [i.type for i in events[-1].response.output] == ["message"]
    assert events[-1].response.output_text == whole.output_text
    began = [e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
    # it had begun, unless the update that showed its name also ended the reply (timing: see the chat test)
    assert [e.item.name for e in began] in ([], ["get_weather"])
    ended = [e for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert [(e.output_index, e.item.status) for e in ended] == [(b.output_index, "incomplete") for b in began]
