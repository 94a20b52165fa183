"""--reasoning-parser (reasoning.py): a reply's <think> part split off as the message's reasoning, streamed or
not, in chat completions and the Responses API. The tiny model's replies are held to a text by a choice
constraint, so the server sees exactly what a thinking model would write."""
from __future__ import annotations

import json

import openai
import pytest

from tandem.cli import parse_args
from tandem.server.config import ServerConfig
from tandem.server.launch import server_config
from tandem.server.reasoning import Thinking
from tests.server.test_tool_parsers import HERMES, TOOLS, streamed_calls

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
OPENS = CHATML.replace("assistant\n{% endif %}", "assistant\n<think>\n{% endif %}")  # DeepSeek-R1's way
NO_THINK = CHATML.replace("assistant\n{% endif %}", "assistant\n<think>\n\n</think>\n\n{% endif %}")  # Qwen3's off
ASK = [{"role": "user", "content": "What is 2 + 2?"}]
LONG_THOUGHT = "Two plus two: count on from two, three, four. So it is four, surely, without a doubt at all."


@pytest.fixture(scope="module")
def servers(tiny_engine, serve):
    """One server per chat template, all with the deepseek_r1 reader (and one without any)."""
    made = {name: serve(tiny_engine, ServerConfig(chat_template=t, reasoning_parser="deepseek_r1"))
            for name, t in (("chatml", CHATML), ("opens", OPENS), ("hermes", HERMES))}
    made["no_think"] = serve(tiny_engine, ServerConfig(chat_template=NO_THINK, reasoning_parser="qwen3"))
    made["plain"] = serve(tiny_engine, ServerConfig(chat_template=CHATML))
    return made


def _ask(server, reply: str, stream: bool = False, **kwargs):
    kwargs.setdefault("max_tokens", 120)
    return server.openai().chat.completions.create(
        model=server.model, messages=ASK, temperature=0, stream=stream,
        extra_body={"structured_outputs": {"choice": [reply], "after": None}}, **kwargs)


def _joined(chunks) -> tuple[str, str, list[str]]:
    """A stream's reasoning and content, joined; and which came in what order ('r' / 'c' per piece)."""
    reasoning, content, order = "", "", []
    for chunk in chunks:
        delta = chunk.choices[0].delta
        think = getattr(delta, "reasoning", None)
        assert think == getattr(delta, "reasoning_content", None)  # the alias carries the same text
        if think:
            reasoning, order = reasoning + think, order + ["r"]
        if delta.content:
            content, order = content + delta.content, order + ["c"]
    return reasoning, content, order


# ---- the parser alone -------------------------------------------------------------------------------

@pytest.mark.parametrize("opened, text, reasoning, content", [
    (False, "<think>Let me see.</think>\n\nIt is 4.", "Let me see.", "It is 4."),
    (True, "Let me see.</think>  \n It is 4.", "Let me see.", "It is 4."),
    (True, "<think>Again.</think>4", "Again.", "4"),  # a reply that re-opens the prompt's block
    (False, "It is 4. <think>no</think>", None, "It is 4. <think>no</think>"),  # opened mid-reply: content
    (False, "<think>cut off mid-thou", "cut off mid-thou", None),
    (True, "cut off</thi", "cut off</thi", None),
    (False, "<thi", None, "<thi"),
    (False, "<think></think>\n\nJust 4.", None, "Just 4."),
    (True, "A</think>  ", "A", None),
])
def test_split(opened, text, reasoning, content):
    assert Thinking(opened).split(text) == (reasoning, content)


def test_the_prompt_opens_the_block_only_when_it_ends_with_think():
    assert Thinking.for_prompt("<|im_start|>assistant\n<think>\n").opened
    assert not Thinking.for_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n").opened
    assert not Thinking.for_prompt("<|im_start|>assistant\n").opened


def test_prefixes_hold_back_what_may_still_change():
    t = Thinking(False)
    assert t.scan("<thi", False).start is None and t.scan("<thi", False).content is None  # undecided yet
    assert t.scan("<thi", True).content == 0
    assert t.scan("Hello", False).content == 0
    opened = Thinking(True)
    assert opened.scan("abc</thi", False).end == 3  # a partial </think> is not reasoning yet
    assert opened.scan("abc</thi", True).end == len("abc</thi")
    assert opened.scan("abc<", False, hold=2).end == 2  # a stop string's start is held back too
    assert opened.scan("abc</think>\n", False).content is None  # more whitespace may come
    assert opened.scan("abc</think>\nX", False).content == len("abc</think>\n")


@pytest.mark.parametrize("opened, text", [
    (False, "<think>a < b </ c </thin k</think>\n\n x </think>"), (True, "no close <</think"),
    (True, "x</think>\n\n\n"), (False, "plain <think> text"), (False, "<think>"),
])
def test_stepping_through_every_prefix_adds_up_to_the_split(opened, text):
    t, sent, reasoning, content = Thinking(opened), 0, "", ""
    for n in range(len(text) + 1):
        piece, sent, now = t.step(text[:n], n == len(text), 0, sent)
        assert "</think>" not in piece and not now.startswith("</think>")
        assert text[:n].endswith(now) and now.startswith(content)  # content, once begun, only grows
        reasoning, content = reasoning + piece, now
    want_reasoning, want_content = t.split(text)
    assert (reasoning or None, content or None) == (want_reasoning, want_content)


def test_the_flag_reaches_the_server_config():
    assert server_config(parse_args(["serve", "--reasoning-parser", "qwen3"])[1]).reasoning_parser == "qwen3"
    assert server_config(parse_args(["serve"])[1]).reasoning_parser is None
    with pytest.raises(SystemExit):
        parse_args(["serve", "--reasoning-parser", "granite"])
    with pytest.raises(ValueError, match="reasoning_parser"):
        ServerConfig(reasoning_parser="granite")


# ---- chat completions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("server, reply, reasoning, content", [
    ("chatml", "<think>Two and two.</think>\n\nThe answer is 4.", "Two and two.", "The answer is 4."),
    ("opens", "Hmm, 2 + 2 < 5.</think>\n\nIt is 4.", "Hmm, 2 + 2 < 5.", "It is 4."),
    ("chatml", "No thinking here.", None, "No thinking here."),
    ("no_think", "Just 4.", None, "Just 4."),
    ("plain", "<think>Two.</think>4", None, "<think>Two.</think>4"),  # no parser: as before
])
def test_reasoning_is_split_off_streamed_or_not(servers, server, reply, reasoning, content):
    server = servers[server]
    message = _ask(server, reply).choices[0].message
    assert (message.reasoning, message.reasoning_content, message.content) == (reasoning, reasoning, content)
    got_reasoning, got_content, order = _joined(_ask(server, reply, stream=True))
    assert (got_reasoning, got_content) == (reasoning or "", content)
    assert order == sorted(order, key="rc".index)  # all reasoning before any content


def test_calls_are_read_from_the_content_only(servers):
    fake = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    reply = (f"<think>Not {fake}, the weather.</think>\n\n"
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    server = servers["hermes"]
    choice = _ask(server, reply, tools=TOOLS).choices[0]
    assert choice.message.reasoning == f"Not {fake}, the weather."
    assert choice.message.content is None and choice.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    chunks = list(_ask(server, reply, stream=True, tools=TOOLS))
    calls = streamed_calls([c.choices[0] for c in chunks if c.choices])
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    reasoning, content, _ = _joined(chunks)
    assert (reasoning, content) == (choice.message.reasoning, "")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_reply_cut_while_thinking_is_all_reasoning(servers):
    server = servers["opens"]
    choice = _ask(server, LONG_THOUGHT + "</think>\n\n4", max_tokens=8).choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    assert choice.message.reasoning and LONG_THOUGHT.startswith(choice.message.reasoning)
    reasoning, content, _ = _joined(_ask(server, LONG_THOUGHT + "</think>\n\n4", stream=True, max_tokens=8))
    assert (reasoning, content) == (choice.message.reasoning, "")


def test_stop_strings_cut_the_content_not_the_reasoning_hold_back(servers):
    server = servers["chatml"]
    reply = "<think>Think, then stop.</think>\n\nIt is 4. STOP here"
    message = _ask(server, reply, stop=["STOP"]).choices[0].message
    assert (message.reasoning, message.content) == ("Think, then stop.", "It is 4. ")
    assert _joined(_ask(server, reply, stream=True, stop=["STOP"]))[:2] == ("Think, then stop.", "It is 4. ")


def test_a_constraint_holds_the_answer_not_the_thinking(servers):
    """A prompt that opened a think block: response_format constrains what follows </think> (the engine's
    `after`, tests/engine/test_structured.py), so the thinking runs as it would unconstrained."""
    ask = dict(model=servers["opens"].model, messages=ASK, temperature=0, max_tokens=10)
    free = servers["opens"].openai().chat.completions.create(**ask).choices[0].message
    held = servers["opens"].openai().chat.completions.create(response_format={"type": "json_object"},
                                                              **ask).choices[0].message
    assert held.reasoning == free.reasoning and held.reasoning and held.content is None
    # where no think block is open the constraint holds from the first token, as without a parser
    plain = servers["chatml"].openai().chat.completions.create(response_format={"type": "json_object"}, **{
        **ask, "model": servers["chatml"].model}).choices[0].message
    assert plain.reasoning is None and plain.content.lstrip().startswith("{")


# ---- the Responses API ---------------------------------------------------------------------------------

def _respond(server, reply: str, stream: bool = False, **kwargs):
    kwargs.setdefault("max_output_tokens", 120)
    return server.openai().responses.create(model=server.model, input="What is 2 + 2?", temperature=0,
                                            stream=stream,
                                            extra_body={"structured_outputs": {"choice": [reply], "after": None}},
                                            **kwargs)


def test_responses_put_reasoning_in_its_own_item_streamed_or_not(servers):
    server, reply = servers["opens"], "Two and two.</think>\n\nIt is 4."
    whole = _respond(server, reply)
    assert [item.type for item in whole.output] == ["reasoning", "message"]
    thought = whole.output[0]
    assert thought.id.startswith("rs_") and thought.summary == [] and thought.status == "completed"
    assert [(c.type, c.text) for c in thought.content] == [("reasoning_text", "Two and two.")]
    assert whole.output_text == "It is 4."
    events = list(_respond(server, reply, stream=True))
    assert events[-1].type == "response.completed"
    strip = lambda items: [{k: v for k, v in i.model_dump().items() if k != "id"} for i in items]
    assert strip(events[-1].response.output) == strip(whole.output)
    mine = [e for e in events if getattr(e, "output_index", None) == 0]
    kinds = [e.type for e in mine]
    assert kinds[:2] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-3:] == ["response.reasoning_text.done", "response.content_part.done", "response.output_item.done"]
    assert set(kinds[2:-3]) == {"response.reasoning_text.delta"}
    assert "".join(e.delta for e in mine[2:-3]) == mine[-3].text == "Two and two."
    assert mine[-1].item.id == events[-1].response.output[0].id
    first_text = next(i for i, e in enumerate(events) if e.type == "response.output_text.delta")
    assert events.index(mine[-1]) < first_text  # the reasoning item closed before the message began


def test_a_response_cut_while_thinking_is_an_incomplete_reasoning_item(servers):
    response = _respond(servers["opens"], LONG_THOUGHT + "</think>4", max_output_tokens=8)
    assert response.status == "incomplete" and [i.type for i in response.output] == ["reasoning"]
    assert response.output[0].status == "incomplete" and LONG_THOUGHT.startswith(response.output[0].content[0].text)


def test_reasoning_input_items_are_accepted_and_left_out_of_the_prompt(servers):
    server = servers["opens"]
    client = server.openai()
    hi = {"role": "user", "content": "Hi"}
    thought = {"type": "reasoning", "id": "rs_1", "summary": [],
               "content": [{"type": "reasoning_text", "text": "A long train of thought " * 5}]}
    with_it = client.responses.create(model=server.model, input=[thought, hi], max_output_tokens=2)
    without = client.responses.create(model=server.model, input=[hi], max_output_tokens=2)
    assert with_it.usage.input_tokens == without.usage.input_tokens
    # a stored response's reasoning item is in the follow-up's history: that continues too
    first = _respond(server, "Two.</think>4")
    assert first.output[0].type == "reasoning"
    follow = client.responses.create(model=server.model, input="And 3 + 3?", previous_response_id=first.id,
                                     max_output_tokens=2)
    assert follow.status in ("completed", "incomplete")


def test_other_unknown_input_items_are_still_refused(servers):
    with pytest.raises(openai.BadRequestError, match="reasoning are"):
        servers["opens"].openai().responses.create(model=servers["opens"].model, max_output_tokens=2,
                                                   input=[{"type": "computer_call", "id": "c"}])


def test_usage_counts_the_reasoning_tokens(servers):
    reply = "Hmm, 2 + 2 < 5.</think>\n\nIt is 4."
    usage = _ask(servers["opens"], reply).usage
    thought = usage.completion_tokens_details.reasoning_tokens
    assert 0 < thought < usage.completion_tokens  # the think block's tokens, not the answer's
    chunks = list(_ask(servers["opens"], reply, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == thought
    assert _respond(servers["opens"], reply).usage.output_tokens_details.reasoning_tokens == thought
    cut = _ask(servers["opens"], LONG_THOUGHT + "</think>4", max_tokens=8).usage
    assert cut.completion_tokens_details.reasoning_tokens == cut.completion_tokens == 8  # all of it thinking
    assert _ask(servers["chatml"], "No thinking here.").usage.completion_tokens_details.reasoning_tokens == 0
    assert _ask(servers["plain"], "<think>Two.</think>4").usage.completion_tokens_details is None


@pytest.mark.parametrize("opened, pieces, want", [
    (True, ["a", "b", "</think>", "c", "d"], 3),
    (True, ["a", "b</th", "ink>c", "d"], 3),  # the token that completes </think> counts, content in it or not
    (False, ["<think>", "x", "</think>", "\n", "y"], 3),
    (True, ["still", " going"], 2),  # no close: all of it
    (False, ["no", " block"], 0),
])
def test_reasoning_tokens_are_those_up_to_the_close(opened, pieces, want):
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    assert Thinking(opened).tokens("".join(pieces), list(range(len(pieces))), decode) == want
