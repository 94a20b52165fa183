"""Structured outputs (vLLM's `structured_outputs`): a sequence's output held to a JSON schema, any JSON
object, a regular expression, one of a list of strings, or an EBNF grammar, with xgrammar.

A constraint's lifecycle: `SamplingParams.structured_outputs` names exactly one kind (`check_spec`,
no xgrammar needed) -> the engine compiles it when the request arrives (`GrammarBook.compile`; xgrammar
caches compiled grammars; a schema or pattern it cannot compile is the request's ValueError) -> each
sequence of the request gets its own matcher -> every sampling step masks the tokens its matcher does
not allow (`mask`, before the draw) -> each appended token advances the matcher, and one that completes
the grammar (its end token, the model's EOS) finishes the sequence (engine._append).

With `after` (a text, e.g. `</think>`) the constraint holds only once the output has written it: until then
the matcher (`After`) masks nothing and only watches for the text's token ids, so a reasoning model thinks
freely and its answer follows the constraint (the server sets it under --reasoning-parser). The text is
matched as the tokenizer encodes it alone: the think tags of DeepSeek-R1 and Qwen3 are single tokens.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

KINDS = ("json", "json_object", "regex", "choice", "grammar")
OPTIONS = ("disable_any_whitespace", "after")  # vLLM's: JSON without whitespace between its tokens; ours
CACHE_BYTES = 512 << 20  # compiled grammars kept for reuse (vLLM's default too)


_SHAPES = ("a dict with exactly one of json (a schema: dict or string), json_object (true), regex (a string), "
           "choice (a list of strings), grammar (an EBNF string), and optionally disable_any_whitespace and "
           "after (a non-empty string the constraint starts after)")


def check_spec(spec: Any) -> str | None:
    """What `spec` should have been, when it is not one constraint of KINDS; else None."""
    if not isinstance(spec, dict) or set(spec) - set(KINDS) - set(OPTIONS):
        return _SHAPES
    given = [k for k in KINDS if spec.get(k) not in (None, False)]
    if len(given) != 1 or not (spec.get("after") is None or isinstance(spec["after"], str) and spec["after"]):
        return _SHAPES
    kind, value = given[0], spec[given[0]]
    ok = {"json": isinstance(value, (dict, str)) or value is True, "json_object": value is True,
          "regex": isinstance(value, str) and bool(value), "grammar": isinstance(value, str) and bool(value),
          "choice": isinstance(value, list) and bool(value) and all(isinstance(c, str) for c in value)}[kind]
    return None if ok else _SHAPES


class GrammarBook:
    """A model's compiler: its tokenizer's vocabulary, padded to the model's, ended by its EOS ids. Cheap to
    make: xgrammar and the vocabulary's tables are loaded on the first constraint (a quarter second)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self._args = (tokenizer, vocab_size, list(stop_token_ids))
        self._compiler = None

    @property
    def compiler(self) -> Any:
        if self._compiler is None:  # two threads at once only build it twice
            import xgrammar as xgr

            tokenizer, vocab_size, stop_ids = self._args
            if tokenizer is None:
                raise ValueError("structured_outputs needs a tokenizer (this engine has skip_tokenizer_init)")
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids or None)
            self._compiler = xgr.GrammarCompiler(info, cache_limit_bytes=CACHE_BYTES)
        return self._compiler

    def compile(self, spec: dict | None) -> Any:
        """The compiled constraint (None for none); ValueError naming it when it cannot be compiled."""
        if spec is None:
            return None
        compiler = self.compiler
        kind = next(k for k in KINDS if spec.get(k) not in (None, False))
        value = spec[kind]
        compact = bool(spec.get("disable_any_whitespace"))
        try:
            if kind == "json_object" or (kind == "json" and value is True):  # an object, as OpenAI promises
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=not compact)
            if kind == "json":
                return compiler.compile_json_schema(value if isinstance(value, str) else json.dumps(value),
                                                         any_whitespace=not compact)
            if kind == "regex":
                return compiler.compile_regex(value)
            if kind == "choice":
                # literals as JSON strings, but not \u-escaped: xgrammar reads an escaped surrogate pair as two
                return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                              for c in value))
            return compiler.compile_grammar(value)
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError and others for bad input
            raise ValueError(f"structured_outputs {kind} could not be compiled: {exc}") from None

    def matcher(self, compiled: Any, spec: dict) -> Any:
        """A sequence's matcher for the compiled `spec`."""
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(compiled)
        marker = self._args[0].encode(spec["after"], add_special_tokens=False) if spec.get("after") else []
        return After(matcher, marker) if marker else matcher


class After:
    """A matcher that holds nothing until the output has written `marker` (token ids), then its inner one."""

    def __init__(self, inner: Any, marker: Sequence[int]) -> None:
        self.inner, self.marker = inner, list(marker)
        self.tail: list[int] = []  # the output's last tokens, while waiting
        self.waiting = True

    def accept_token(self, token: int) -> bool:
        if not self.waiting:
            return self.inner.accept_token(token)
        self.tail = (self.tail + [token])[-len(self.marker):]
        self.waiting = self.tail != self.marker
        return True

    def fill_next_token_bitmask(self, bitmask: Any, row: int) -> None:
        self.inner.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return not self.waiting and self.inner.is_terminated()

    def is_completed(self) -> bool:
        return not self.waiting and self.inner.is_completed()


def mask(logits: torch.Tensor, matchers: list[Any]) -> None:
    """-inf, in place, for every token row i's matcher does not allow next (rows with None: untouched)."""
    rows = [i for i, m in enumerate(matchers) if m is not None and not getattr(m, "waiting", False)]
    if not rows:
        return
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(matchers), logits.shape[1])
    for i in rows:
        matchers[i].fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
