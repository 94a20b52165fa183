"""The reasoning part of a reply that thinks inside `<think>...</think>` (vLLM's --reasoning-parser).

`deepseek_r1` (DeepSeek-R1 and its distills, QwQ) and `qwen3` share one reading: the reply is in its reasoning
part from its start if the rendered prompt ends with `<think>` (DeepSeek-R1's and Qwen3-thinking's templates put
it there) or the reply itself starts with `<think>` (stripped); the reasoning ends at the first `</think>`
(stripped, with the whitespace right after it) and the rest is the content. A reply that opened no think block
is all content (Qwen3 with enable_thinking=False renders an empty `<think>\\n\\n</think>` into the prompt, which
does not end with `<think>`). A reply still thinking when it ended (cut by max_tokens) is all reasoning, with no
content, for both names: so a streamed reply, whose reasoning went out as it came, reassembles to the
non-streamed one.

`Thinking.scan(text, final)` reads a reply or, while it streams, its prefix: how much of it is surely
reasoning (a possible partial `</think>` at the end is held back), and where its content begins once that is
known; `Thinking.step` is what a stream sends of it next.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tandem.server.call_stream import held_prefix

REASONING_PARSERS = ("deepseek_r1", "qwen3")
OPEN, CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Scan:
    """A reply read so far: reasoning is text[start:end] (None: the reply has no reasoning part, or it cannot
    be told yet); content is text[content:] once it has begun (None: not yet, or never)."""
    start: int | None
    end: int
    content: int | None


@dataclass(frozen=True)
class Thinking:
    """One request's reasoning reader: `opened` when its prompt ended with `<think>`."""
    opened: bool

    @classmethod
    def for_prompt(cls, prompt: str) -> "Thinking":
        return cls(prompt.rstrip().endswith(OPEN))

    def scan(self, text: str, final: bool, hold: int = 0) -> Scan:
        """`text` read as the whole reply (`final`) or a prefix of it; `hold` more characters at its end are
        held back from the reasoning too (what a stop string may still cut)."""
        if not final and len(text) < len(OPEN) and OPEN.startswith(text):
            return Scan(None, 0, None)  # "<thi" may open a think block or be content: wait for more
        if text.startswith(OPEN):
            start = len(OPEN)  # a reply that opens its own block (or re-opens the prompt's): the tag goes
        elif self.opened:
            start = 0
        else:
            return Scan(None, 0, 0)
        close = text.find(CLOSE, start)
        if close < 0:  # still thinking; a reply that ends so is all reasoning
            end = len(text) if final else len(text) - max(held_prefix(text, CLOSE), hold)
            return Scan(start, max(start, end), None)
        after = close + len(CLOSE)
        content = after + len(text[after:]) - len(text[after:].lstrip())
        if content == len(text) and not final:
            return Scan(start, close, None)  # more whitespace may come, all of it stripped
        return Scan(start, close, content)

    def split(self, text: str) -> tuple[str | None, str | None]:
        """A finished reply as (reasoning, content): None for a part it does not have (or that is empty)."""
        scan = self.scan(text, True)
        reasoning = text[scan.start:scan.end] if scan.start is not None else None
        content = text[scan.content:] if scan.content is not None else None
        if scan.start is None:
            return None, text  # no think block: the whole reply, empty or not, as today
        return reasoning or None, content or None

    def tokens(self, text: str, token_ids: list[int], decode: Callable[[list[int]], str]) -> int:
        """How many of a finished reply's tokens went to its reasoning, think tags included: the fewest whose
        text reaches past `</think>` (all of them for a reply still thinking at its end; none without a block)."""
        scan = self.scan(text, True)
        if scan.start is None:
            return 0
        if scan.content is None and text.find(CLOSE, scan.start) < 0:
            return len(token_ids)
        reach = text.find(CLOSE, scan.start) + len(CLOSE)
        low, high = 1, len(token_ids)  # decode of a prefix is monotone in length: bisect on it
        while low < high:
            mid = (low + high) // 2
            if len(decode(token_ids[:mid])) >= reach:
                high = mid
            else:
                low = mid + 1
        return high

    def step(self, text: str, final: bool, hold: int, sent: int) -> tuple[str, int, str]:
        """For a stream that has sent the reasoning up to `sent` of `text`: the reasoning to send now, where
        that leaves it, and the content so far ("" until it begins)."""
        scan = self.scan(text, final, hold)
        piece = ""
        if scan.start is not None:
            piece, sent = text[max(scan.start, sent):scan.end], max(sent, scan.end)
        return piece, sent, text[scan.content:] if scan.content is not None else ""
